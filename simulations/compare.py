"""Compare Flower's FedAvg and FedProx with FedUGM on identical non-IID partitions, on Ray.

    python -m simulations.compare                                   # multi-round (default)
    python -m simulations.compare configs/compare_one_shot.yaml     # one-shot merging
    python -m simulations.compare dirichlet-alpha=0.5 seeds=[0] out=results/a05
    python -m simulations.compare --help                            # every key, with defaults

Each (seed, strategy) is one Flower simulation (Ray backend, one CPU per client) of the app
in ``simulations.flower_app``; the server evaluates the global model on the held-out test
split before training and after every round.

Config: the app's run config (``[tool.flwr.app.config]`` in pyproject.toml), then
``configs/adversaries.yaml`` and ``configs/compare.yaml``, then an optional overlay YAML,
then ``key=value`` overrides. Writes to ``out``: ``rounds.csv`` (strategy, seed, round,
accuracy, loss, seconds), ``summary.json`` (``{"strategies": {name: {"final_accuracy":
[one per seed], "rounds_to_fedavg_final": [...], "seconds": [...]}}, "config": {...}}``)
and ``accuracy_vs_round.png``; prints a table.
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from simulations.runner import (
    CONFIGS,
    figure,
    load_config,
    mean_std,
    plain,
    progress,
    quiet_flower_console,
    save_figure,
    simulate,
    simulation_layers,
    write_json,
)

COMPARE_CONFIG = CONFIGS / "compare.yaml"
#: line style and marker per strategy, so coinciding curves stay visible
STYLES = {"fedavg": ("-", "o"), "fedprox": ("--", "s"), "fedugm": ("-", "^"),
          "task-arithmetic": (":", "x"), "fisher-averaging": ("-.", "d")}


def rounds_to_reach(accuracy: list[float], target: float) -> int | None:
    """First round (1-based; index 0 is the initial model) with accuracy ≥ target."""
    for round_index, value in enumerate(accuracy[1:], start=1):
        if value >= target:
            return round_index
    return None


def summarize(histories: dict[str, list[dict]]) -> dict[str, dict[str, list]]:
    """Per strategy: final accuracy, rounds to FedAvg's final accuracy (same seed), seconds."""
    fedavg_final = {h["seed"]: h["accuracy"][-1] for h in histories.get("fedavg", [])}
    summary = {}
    for name, runs in histories.items():
        summary[name] = {
            "final_accuracy": [h["accuracy"][-1] for h in runs],
            "final_loss": [h["loss"][-1] for h in runs],
            "rounds_to_fedavg_final": [
                rounds_to_reach(h["accuracy"], fedavg_final[h["seed"]])
                if h["seed"] in fedavg_final else None for h in runs
            ],
            "seconds": [h["seconds"][-1] for h in runs],
        }
    return summary


def format_table(summary: dict, num_rounds: int) -> str:
    """Markdown table; the rounds column lists one value per seed ("—": not reached)."""
    lines = ["| strategy | final accuracy (%) | rounds to FedAvg's final, per seed | "
             "wall s / run |", "|---|---|---|---|"]
    for name, s in summary.items():
        rounds = " / ".join("—" if r is None else str(r) for r in s["rounds_to_fedavg_final"])
        lines.append(f"| {name} | {mean_std(s['final_accuracy'], 100)} | {rounds} | "
                     f"{statistics.fmean(s['seconds']):.1f} |")
    lines.append(f"\nmean ± std over seeds; rounds: the first round at which the strategy "
                 f"reaches FedAvg's round-{num_rounds} accuracy of the same seed (—: not within "
                 f"{num_rounds} rounds).")
    return "\n".join(lines)


def plot(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, ax = figure()
    for order, (name, runs) in enumerate(histories.items()):
        acc = 100 * np.array([h["accuracy"] for h in runs])
        mean, std = acc.mean(0), acc.std(0)
        rounds = np.arange(len(mean))
        style, marker = STYLES.get(name, ("-", "."))
        # each later curve thinner, with smaller hollow markers: coinciding curves stay visible
        (line,) = ax.plot(rounds, mean, style, marker=marker, label=name,
                          linewidth=max(3.0 - 0.6 * order, 1.0),
                          markersize=max(9 - 2 * order, 4), markerfacecolor="none")
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15, color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}\nlines: mean over seeds; bands: ± 1 std", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv,
                      simulation_layers(COMPARE_CONFIG), prog="compare", doc=__doc__)
    quiet_flower_console()
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    histories: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    runs = [(seed, name) for seed in cfg.seeds for name in cfg.strategies]
    start = time.perf_counter()
    for done, (seed, name) in enumerate(runs, start=1):
        run_config = {**plain(cfg, "strategies", "seeds"), "strategy": str(name),
                      "seed": int(seed), "out": str(out / "histories")}
        histories[str(name)].append(simulate(run_config, label=f"[{done}/{len(runs)}] {name}"))

    with open(out / "rounds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "seed", "round", "accuracy", "loss", "seconds"])
        for name, runs_of in histories.items():
            for h in runs_of:
                for r, (a, lo, s) in enumerate(zip(h["accuracy"], h["loss"], h["seconds"],
                                                   strict=True)):
                    writer.writerow([name, h["seed"], r, f"{a:.4f}", f"{lo:.4f}", f"{s:.2f}"])
    summary = summarize(histories)
    write_json(out / "summary.json", {"strategies": summary, "config": plain(cfg),
                                      "wall_time_s": time.perf_counter() - start})
    title = (f"{cfg.task}, {cfg['num-clients']} clients, {cfg.partition} "
             f"{cfg['dirichlet-alpha']}, {len(cfg.seeds)} seeds")
    plot(histories, out / "accuracy_vs_round.png", title)
    print(format_table(summary, int(cfg["num-server-rounds"])))
    progress(f"\n{len(runs)} simulations in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
