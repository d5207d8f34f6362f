"""ugm_merge against a plain in-place weighted average of the same deltas.

    python benchmarks/bench_merge.py [--clients 20] [--params 5000000] [--repeats 7]
                                     [--device cuda]

Times (median of interleaved repeats) and peak extra memory (resident-set high-water mark
above the inputs, measured in a fresh subprocess per method) for:

* ``plain average``: ``acc = base.clone(); acc.add_(delta_t, alpha=w_t)`` per tensor, the
  baseline (reads one delta per client);
* ``weighted_average``: fl_ugm's FedAvg arithmetic (the same loop plus validation);
* ``ugm_merge``: the fused numba kernel (reads a delta and a Fisher per client);
* ``ugm_merge torch``: the per-tensor torch fallback (one op per client and tensor).

The model is a dict of float32 tensors shaped like a small MLP/transformer block. With
``--device cuda`` every tensor lives on the GPU (``ugm_merge`` then takes its torch path),
the clocks wait for the GPU, and the peak extra memory is CUDA's allocator high-water mark.
"""

from __future__ import annotations

import argparse

import torch
from _measure import interleaved_medians, peak_growth_in_subprocess, report_peak_growth

from fl_ugm.merge import ugm_merge, weighted_average


def shapes_for(num_params: int) -> dict[str, tuple[int, ...]]:
    """Layer shapes summing to about ``num_params`` (square-ish matrices, biases, a norm)."""
    width = int((num_params / 4) ** 0.5)
    return {
        "embed.weight": (width, width),
        "block.attn.weight": (width, width),
        "block.attn.bias": (width,),
        "block.mlp.up.weight": (width, width),
        "block.mlp.up.bias": (width,),
        "block.mlp.down.weight": (width, width),
        "block.norm.weight": (width,),
        "head.bias": (10,),
    }


def make_inputs(num_clients: int, num_params: int):
    gen = torch.Generator().manual_seed(0)
    shapes = shapes_for(num_params)

    def model(positive: bool = False):
        return {
            k: (torch.rand(s, generator=gen) if positive else torch.randn(s, generator=gen))
            for k, s in shapes.items()
        }

    base = model()
    deltas = [model() for _ in range(num_clients)]
    fishers = [model(positive=True) for _ in range(num_clients)]
    weights = [float(n) for n in range(1, num_clients + 1)]
    total = sum(weights)
    return base, deltas, fishers, [w / total for w in weights]


def plain_average(base, deltas, alphas):
    out = {}
    for key, theta in base.items():
        acc = theta.clone()
        for alpha, delta in zip(alphas, deltas, strict=True):
            acc.add_(delta[key], alpha=alpha)
        out[key] = acc
    return out


METHODS = {
    "plain average": lambda b, d, f, a: plain_average(b, d, a),
    "weighted_average": lambda b, d, f, a: weighted_average(b, d, alphas=a),
    "ugm_merge": lambda b, d, f, a: ugm_merge(b, d, f, alphas=a, prior_precision=0.1),
    "ugm_merge torch": lambda b, d, f, a: ugm_merge(
        b, d, f, alphas=a, prior_precision=0.1, backend="torch"
    ),
}


def to_device(inputs, device: torch.device):
    base, deltas, fishers, alphas = inputs
    move = lambda params: {k: v.to(device) for k, v in params.items()}  # noqa: E731
    return move(base), [move(d) for d in deltas], [move(f) for f in fishers], alphas


def cuda_peak_growth(run) -> int:
    """Bytes the CUDA allocator's high-water mark rose above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def measure_memory(method: str, clients: int, params: int) -> None:
    """Subprocess entry: print the peak RSS growth while running ``method`` once."""
    inputs = make_inputs(clients, params)
    METHODS[method](*make_inputs(1, 1000))  # import/compile outside the measurement
    report_peak_growth(lambda: METHODS[method](*inputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--params", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        measure_memory(args.memory_of, args.clients, args.params)
        return

    device = torch.device(args.device)
    base, deltas, fishers, alphas = to_device(make_inputs(args.clients, args.params), device)
    model_bytes = sum(t.numel() * t.element_size() for t in base.values())
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; K = {args.clients} "
          f"clients x {model_bytes // 4:,} float32 parameters ({model_bytes / 2**20:.1f} MiB)")
    methods = dict(METHODS)
    if device.type != "cpu":
        del methods["ugm_merge torch"]  # "auto" is the torch path off the CPU
    calls = {name: (lambda fn=fn: fn(base, deltas, fishers, alphas))
             for name, fn in methods.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = interleaved_medians(calls, args.repeats, sync)

    baseline = medians["plain average"]
    print(f"{'method':18} {'median ms':>10} {'x plain avg':>12} {'peak extra MiB':>15} "
          f"{'x model':>8}")
    for name in methods:
        median = medians[name]
        if device.type == "cuda":
            extra = cuda_peak_growth(calls[name])
        else:
            extra = peak_growth_in_subprocess(__file__, name, args.clients, args.params)
        print(f"{name:18} {1e3 * median:10.1f} {median / baseline:11.2f}x "
              f"{extra / 2**20:15.1f} {extra / model_bytes:7.2f}x")


if __name__ == "__main__":
    main()
