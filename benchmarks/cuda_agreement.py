"""On a GPU: diagonal_fisher and ugm_merge give on CUDA what they give on the CPU.

    python benchmarks/cuda_agreement.py        # needs torch with CUDA and a visible GPU

Prints, per case, the largest relative difference between the CUDA and the CPU result
(the same weights, data and targets: empirical Fishers, and for the categorical cases
exact ones too, so no sampling is involved; per tensor, max |gpu − cpu| / max |cpu|, the
worst tensor named), twice: with PyTorch's CUDA defaults (cuDNN convolutions may use TF32,
10-bit mantissas, on Ampere and later) and with TF32 off. Exits with status 1 if any
difference with TF32 off exceeds 1e-4. CI never has a GPU; this is run by hand where one
is lent (BENCHMARKS.md records the card and figures).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fl_ugm.fisher import diagonal_fisher, iterate_batches
from fl_ugm.merge import ugm_merge

TOLERANCE = 1e-4


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
                        ) -> tuple[float, str]:
    """(largest per-tensor max |a − b| / max |b|, the tensor it is in)."""
    return max((float((a[k].cpu() - b[k].cpu()).abs().max() / b[k].abs().max().clamp_min(1e-30)),
                k) for k in b)


class Tagger(nn.Module):
    """Embedding + Linear over tokens: token-level categorical with padding (label -100)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 7)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(input_ids)))


def cases():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(320, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6(),
                         nn.Flatten(), nn.Linear(256, 10))
    head[1].running_mean.uniform_(-0.5, 0.5)
    features, labels = torch.randn(300, 320, 1, 1), torch.randint(0, 10, (300,))
    yield "categorical, conv+BatchNorm head", head, features, labels, "categorical"
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.LayerNorm(8 * 14 * 14), nn.Linear(8 * 14 * 14, 10))
    yield ("categorical, CNN + LayerNorm (vmap)", cnn, torch.randn(200, 1, 28, 28),
           torch.randint(0, 10, (200,)), "categorical")
    regressor = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    yield ("gaussian regression", regressor, torch.randn(256, 12), torch.randn(256, 3),
           "gaussian")
    tokens, targets = torch.randint(0, 50, (64, 20)), torch.randint(0, 7, (64, 20))
    targets[:, 15:] = -100  # padding
    yield "token-categorical with padding", Tagger(), tokens, targets, "token-categorical"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible; nothing to compare", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    worst = 0.0
    for name, model, x, y, likelihood in cases():
        # the exact Fisher (one backward pass per class) is for categorical likelihoods
        for kind in ("empirical", "exact") if likelihood == "categorical" else ("empirical",):
            model.cpu()
            cpu = diagonal_fisher(model, iterate_batches(x, y, 64), kind=kind,
                                  likelihood=likelihood)
            model.to(device)
            cells = []
            for tf32 in (torch.backends.cudnn.allow_tf32, False):
                torch.backends.cudnn.allow_tf32 = tf32
                gpu = diagonal_fisher(model, iterate_batches(x.to(device), y.to(device), 64),
                                      kind=kind, likelihood=likelihood)
                assert all(v.device.type == "cuda" for v in gpu.values())
                difference, key = relative_difference(gpu, cpu)
                cells.append(f"{difference:.2e} ({key})")
            torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
            worst = max(worst, difference)
            print(f"diagonal_fisher {kind:9}, {name:38} CUDA defaults {cells[0]:22} "
                  f"TF32 off {cells[1]}")

    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(1000, 300, generator=gen), "b": torch.randn(300, generator=gen)}
    deltas = [{k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
              for _ in range(8)]
    fishers = [{k: torch.rand(v.shape, generator=gen) * 100 for k, v in base.items()}
               for _ in range(8)]
    alphas = [1 / 8] * 8
    cpu = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=0.1)
    on = lambda p: {k: v.to(device) for k, v in p.items()}  # noqa: E731
    gpu = ugm_merge(on(base), [on(d) for d in deltas], [on(f) for f in fishers], alphas=alphas,
                    prior_precision=0.1)
    difference, _ = relative_difference(gpu, cpu)
    worst = max(worst, difference)
    print(f"ugm_merge (CUDA torch path vs CPU numba kernel){'':8} max relative difference "
          f"{difference:.2e}")
    verdict = "OK" if worst <= TOLERANCE else "FAIL"
    print(f"worst with TF32 off {worst:.2e} (tolerance {TOLERANCE:g}): {verdict}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
