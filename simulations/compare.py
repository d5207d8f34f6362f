"""Compare Flower's FedAvg, FedProx, FedAvgM, FedAdam with FedUGM on identical partitions, on Ray.

    python -m simulations.compare                                   # multi-round (default)
    python -m simulations.compare configs/compare_one_shot.yaml     # one-shot merging
    python -m simulations.compare dirichlet-alpha=0.5 seeds=[0] out=results/a05
    python -m simulations.compare --help                            # every key, with defaults

Each (seed, strategy) is one Flower simulation (Ray backend, one CPU per client) of the app
in ``simulations.flower_app``; the server evaluates the global model on the held-out test
split before training and after every round.

Config: the app's run config (``[tool.flwr.app.config]`` in pyproject.toml), then
``configs/adversaries.yaml`` and ``configs/compare.yaml``, then an optional overlay YAML,
then ``key=value`` overrides. With ``lr-grid=[...]`` each strategy first gets its settings
chosen on the validation split (``server-examples``): every lr of the grid, crossed with the
strategy's own ``tune`` grids (e.g. FedProx's ``proximal-mu``), one run each at
``selection-seed`` (:func:`select_settings`); then ``seeds`` run at the chosen setting,
scored on the test split. Writes to ``out``: ``rounds.csv`` (strategy, seed, round,
accuracy, loss, seconds), ``summary.json`` (``{"strategies": {name: {"final_accuracy":
[one per seed], "rounds_to_fedavg_final": [...], "seconds": [...], "reply_bytes_per_round":
[...]}}, "config": {...}}``; reply bytes: the tensors of all replies of a round, summed)
and ``accuracy_vs_round.png``; prints a table.
"""

from __future__ import annotations

import csv
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
          "fedavgm": ("--", "v"), "fedadam": (":", "P"),
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
            "reply_bytes_per_round": [
                statistics.fmean(r["bytes"] for r in h["replies"]) if h.get("replies") else None
                for h in runs
            ],
        }
    return summary


def format_table(summary: dict, num_rounds: int) -> str:
    """Markdown table; the rounds column lists one value per seed ("—": not reached)."""
    lines = ["| strategy | final accuracy (%) | rounds to FedAvg's final, per seed | "
             "wall s / run | reply MB / round |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        rounds = " / ".join("—" if r is None else str(r) for r in s["rounds_to_fedavg_final"])
        sent = [b for b in s["reply_bytes_per_round"] if b is not None]
        megabytes = f"{statistics.fmean(sent) / 1e6:.3f}" if sent else "—"
        lines.append(f"| {name} | {mean_std(s['final_accuracy'], 100)} | {rounds} | "
                     f"{statistics.fmean(s['seconds']):.1f} | {megabytes} |")
    lines.append(f"\nmean ± std over seeds; rounds: the first round at which the strategy "
                 f"reaches FedAvg's round-{num_rounds} accuracy of the same seed (—: not within "
                 f"{num_rounds} rounds); reply MB / round: the tensor bytes of all the "
                 "clients' replies in a round (10^6 bytes).")
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


def setting_grid(cfg, name: str) -> list[dict[str, Any]]:
    """Every setting a strategy is tried at: ``lr-grid`` × its ``tune`` grids (e.g.
    ``tune: {fedprox: {proximal-mu: [0.01, 0.1]}}``), as run-config overrides."""
    axes = {"lr": [float(v) for v in cfg["lr-grid"]]}
    axes.update({str(k): list(v) for k, v in (cfg["tune"].get(name) or {}).items()})
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def select_settings(cfg, base: dict, out: Path) -> dict[str, dict]:
    """Per strategy, the setting of :func:`setting_grid` with the best final accuracy on the
    VALIDATION split (``evaluate-on=validation``: the ``server-examples`` split, never the
    test set), one run each at ``selection-seed``; ties go to the smaller lr, then to the
    earlier setting. Returns ``{strategy: {"chosen": {key: value}, "validation": [{**setting,
    "accuracy": a}, ...], "mean_over_lr_grid": m}}``; ``m`` averages, over the lr grid, the
    best accuracy at each lr (how forgiving the method is of its learning rate)."""
    runs = [(name, setting) for name in cfg.strategies for setting in setting_grid(cfg, name)]
    selection: dict[str, dict] = {}
    for done, (name, setting) in enumerate(runs, start=1):
        tag = " ".join(f"{k}={v:g}" for k, v in setting.items())
        run_config = {**base, **setting, "strategy": str(name), "evaluate-on": "validation",
                      "seed": int(cfg["selection-seed"]),
                      "out": str(out / "selection" / tag.replace(" ", "_"))}
        history = simulate(run_config, label=f"[select {done}/{len(runs)}] {name} {tag}")
        entry = selection.setdefault(str(name), {"validation": []})
        entry["validation"].append({**setting, "accuracy": history["accuracy"][-1]})
    for entry in selection.values():
        scored = entry["validation"]
        best = max(scored, key=lambda r: (r["accuracy"], -r["lr"], -scored.index(r)))
        entry["chosen"] = {k: v for k, v in best.items() if k != "accuracy"}
        per_lr: dict[float, float] = {}
        for r in scored:
            per_lr[r["lr"]] = max(per_lr.get(r["lr"], 0.0), r["accuracy"])
        entry["mean_over_lr_grid"] = statistics.fmean(per_lr.values())
    return selection


def format_selection(selection: dict[str, dict], seed: int) -> str:
    lines = [f"settings chosen on the validation split (seed {seed}):",
             "| strategy | validation accuracy (%) per setting | chosen | mean over the lr "
             "grid (%) |", "|---|---|---|---|"]
    for name, entry in selection.items():
        cells = ", ".join(
            " ".join(f"{k} {v:g}" for k, v in r.items() if k != "accuracy")
            + f": {100 * r['accuracy']:.2f}" for r in entry["validation"])
        chosen = " ".join(f"{k} {v:g}" for k, v in entry["chosen"].items())
        lines.append(f"| {name} | {cells} | {chosen} | {100 * entry['mean_over_lr_grid']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv,
                      simulation_layers(COMPARE_CONFIG), prog="compare", doc=__doc__)
    quiet_flower_console()
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = plain(cfg, "strategies", "seeds", "lr-grid", "tune", "selection-seed")
    selection = select_settings(cfg, base, out) if cfg["lr-grid"] else {}
    histories: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    runs = [(seed, name) for seed in cfg.seeds for name in cfg.strategies]
    for done, (seed, name) in enumerate(runs, start=1):
        run_config = {**base, "strategy": str(name), "seed": int(seed),
                      "out": str(out / "histories")}
        if selection:
            run_config.update(selection[str(name)]["chosen"])
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
                                      "selection": selection,
                                      "wall_time_s": time.perf_counter() - start})
    skew = f" {cfg['dirichlet-alpha']}" if cfg.partition == "dirichlet" else ""
    title = (f"{cfg.task}, {cfg['num-clients']} clients, {cfg.partition}{skew}, "
             f"{len(cfg.seeds)} seeds")
    plot(histories, out / "accuracy_vs_round.png", title)
    if selection:
        print(format_selection(selection, int(cfg["selection-seed"])) + "\n")
    print(format_table(summary, int(cfg["num-server-rounds"])))
    progress(f"\n{len(runs)} simulations in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
