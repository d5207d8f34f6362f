"""Cost of the diagonal Fisher as a multiple of one training epoch (MNIST-sized inputs).

    python benchmarks/bench_fisher.py [--examples 5000] [--batch-size 64] [--repeats 7]
                                      [--device cuda]

For an MLP (784-128-10), a small CNN and a fine-tuning head (EfficientNet-Lite0's: a 1x1
conv 320->1280 + BatchNorm + a 1280->10 classifier on frozen 320x1x1 backbone features,
the image case of README "Fine-tuning cases"), times on the same data and batch size:
one SGD training epoch; ``diagonal_fisher`` (sampled, empirical, and exact: one backward
pass per class; closed-form per-example squares for Linear/Conv2d); a plain
``torch.func.vmap(grad)`` Fisher as the reference implementation; and a training epoch
that also feeds :class:`TrainingFisher`. Inputs are random tensors of MNIST shape (the
head: of the backbone's output shape): the cost does not depend on the values.
"""

from __future__ import annotations

import argparse

import torch
from _measure import interleaved_medians
from torch import nn
from torch.func import functional_call, grad, vmap

from fl_ugm.fisher import TrainingFisher, diagonal_fisher, iterate_batches


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip


def head() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(),
        nn.Flatten(), nn.Linear(1280, 10),
    )  # fmt: skip


def train_epoch(model, x, y, batch_size, fisher: TrainingFisher | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for xb, yb in iterate_batches(x, y, batch_size):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        if fisher is not None:
            fisher.update(xb.shape[0])
        opt.step()


def vmap_fisher(model, x, y, batch_size) -> dict[str, torch.Tensor]:
    """Reference: per-example gradients of every parameter with vmap(grad), squared, summed
    (eval mode, as diagonal_fisher: BatchNorm uses its running statistics)."""
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for xb, yb in iterate_batches(x, y, batch_size):
        for k, g in per_example(params, xb, yb).items():
            total[k] += (g**2).sum(0)
    model.train()
    return total


def bench_model(name: str, model: nn.Module, x, y, bs: int, repeats: int, sync) -> str:
    """One table row: epoch seconds, then each method as a multiple of the epoch.

    The methods run interleaved, ``repeats`` rounds, so slow phases of a shared machine hit
    them alike; each figure is the median over rounds.
    """
    gen = torch.Generator(device=x.device).manual_seed(0)
    methods = {
        "epoch": lambda: train_epoch(model, x, y, bs),
        "sampled": lambda: diagonal_fisher(
            model, iterate_batches(x, y, bs), kind="sampled", generator=gen),
        "empirical": lambda: diagonal_fisher(model, iterate_batches(x, y, bs), kind="empirical"),
        "exact": lambda: diagonal_fisher(model, iterate_batches(x, y, bs), kind="exact"),
        "vmap": lambda: vmap_fisher(model, x, y, bs),
        "cheap": lambda: train_epoch(model, x, y, bs, TrainingFisher(model)),
    }
    med = interleaved_medians(methods, repeats, sync)
    epoch = med["epoch"]
    return (f"{name:5} {epoch:13.3f} {med['sampled'] / epoch:8.2f}x "
            f"{med['empirical'] / epoch:8.2f}x {med['exact'] / epoch:8.2f}x "
            f"{med['vmap'] / epoch:9.2f}x "
            f"{100 * (med['cheap'] / epoch - 1):+13.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.examples, 1, 28, 28, device=device)
    features = torch.randn(args.examples, 320, 1, 1, device=device)
    y = torch.randint(0, 10, (args.examples,), device=device)
    bs = args.batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, {where}, "
          f"{args.examples} examples, batch {bs}, median of {args.repeats}")
    print(f"{'model':5} {'train epoch s':>13} {'sampled':>9} {'empirical':>9} {'exact':>9} "
          f"{'vmap(grad)':>10} {'TrainingFisher':>14}")
    for name, build, x in (("mlp", mlp, images), ("cnn", cnn, images),
                           ("head", head, features)):
        print(bench_model(name, build().to(device), x, y, bs, args.repeats, sync))
    print("columns after the first: time / one training epoch; TrainingFisher: added to an epoch")


if __name__ == "__main__":
    main()
