"""How sensitive is one-shot merging to the scale λ and the prior δ? UGM vs task arithmetic.

The paper claims UGM is much less sensitive to its scaling than task arithmetic. Per seed
and δ the clients fine-tune once (as in ``simulations.one_shot``); then every λ is merged
with α_t = λ·n_t/Σn by task arithmetic (θ + Σ α_t Δ_t; λ = 1 is FedAvg) and by UGM.

    python -m simulations.sensitivity                       # configs/sensitivity.yaml
    python -m simulations.sensitivity scales=[0.5,1,2] prior_delta=[0.1] seeds=[0]

Writes ``sensitivity.json`` (``{"accuracy": {method: {δ: {λ: [one per seed]}}},
"config": ...}``), ``sensitivity.png`` and prints two tables (test accuracy %, mean over
seeds, with the spread max − min over λ) to stdout.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from fl_ugm.merge import task_arithmetic, ugm_merge
from simulations import tasks
from simulations.one_shot import DEFAULT_CONFIG, Merges, load_config, prior_deltas, run_seed
from simulations.runner import figure, plain, progress, save_figure, write_json

SENSITIVITY_CONFIG = DEFAULT_CONFIG.parent / "sensitivity.yaml"
METHODS = ("task-arithmetic", "fedugm")


def scaled_merges(scales: Sequence[float]) -> Merges:
    """Task arithmetic and UGM at α_t = λ·n_t/Σn for every λ in ``scales``."""

    def merges(base, deltas, fishers, sizes, prior_delta):
        shares = [n / sum(sizes) for n in sizes]
        out = {}
        for scale in scales:
            alphas = [scale * share for share in shares]
            out[f"task-arithmetic@scale={scale:g}"] = task_arithmetic(base, deltas, alphas=alphas)
            out[f"fedugm@scale={scale:g}"] = ugm_merge(
                base, deltas, fishers, alphas=alphas, prior_precision=prior_delta
            )
        return out

    return merges


def collect(per_seed, deltas, scales) -> dict[str, dict[str, dict[str, list[float]]]]:
    """accuracy[method][δ][λ] = one test accuracy per seed."""
    table: dict = {}
    for method in METHODS:
        table[method] = {}
        for delta in deltas:
            suffix = f"@delta={delta:g}" if len(deltas) > 1 else ""
            table[method][f"{delta:g}"] = {
                f"{scale:g}": [r[f"{method}@scale={scale:g}{suffix}"].accuracy for r in per_seed]
                for scale in scales
            }
    return table


def format_tables(accuracy, scales) -> str:
    lines = []
    for method, by_delta in accuracy.items():
        lines += [f"\n{method}: test accuracy (%), mean over seeds; rows δ, columns λ", "",
                  "| δ \\ λ | " + " | ".join(f"{s:g}" for s in scales) + " | spread |",
                  "|---" * (len(scales) + 2) + "|"]
        for delta, by_scale in by_delta.items():
            means = [100 * statistics.fmean(v) for v in by_scale.values()]
            cells = " | ".join(f"{m:.1f}" for m in means)
            lines.append(f"| {delta} | {cells} | {max(means) - min(means):.1f} |")
    return "\n".join(lines)


def plot(accuracy, scales, path: Path) -> None:
    fig, ax = figure()
    for method, style in zip(METHODS, ("--", "-"), strict=True):
        for delta, by_scale in accuracy[method].items():
            means = [100 * statistics.fmean(v) for v in by_scale.values()]
            ax.plot(scales, means, style, marker="o", label=f"{method}, δ={delta}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("λ (α_t = λ·n_t/Σn)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("One-shot merging: sensitivity to λ and δ (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config(argv, paths=(DEFAULT_CONFIG, SENSITIVITY_CONFIG), doc=__doc__)
    scales = [float(s) for s in cfg.scales]
    deltas = prior_deltas(cfg)
    torch.set_num_threads(cfg.threads)
    inputs, labels = tasks.load_task(cfg.task)
    per_seed = []
    for seed in cfg.seeds:
        per_seed.append(run_seed(cfg, int(seed), inputs, labels, scaled_merges(scales)))
        progress(f"[seed {seed}] done")
    accuracy = collect(per_seed, deltas, scales)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sensitivity.json", {"accuracy": accuracy, "config": plain(cfg)})
    plot(accuracy, scales, out / "sensitivity.png")
    print(format_tables(accuracy, scales))
    progress(f"\nwritten: {out / 'sensitivity.json'}, {out / 'sensitivity.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
