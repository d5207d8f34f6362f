"""Compare Flower's FedAvg, FedProx, FedAvgM, FedAdam with FedUGM on identical partitions, on Ray.

    python -m simulations.compare                                   # multi-round (default)
    python -m simulations.compare configs/compare_one_shot.yaml     # one-shot merging
    python -m simulations.compare configs/fmnist.yaml               # Fashion-MNIST, tuned
    python -m simulations.compare configs/fmnist.yaml configs/fmnist_quick.yaml
    python -m simulations.compare dirichlet-alpha=0.5 seeds=[0] out=results/a05
    python -m simulations.compare --help                            # every key, with defaults

Each (seed, strategy) is one Flower simulation (Ray backend, one CPU per client) of the app
in ``simulations.flower_app``; the server evaluates the global model on the held-out test
split before training and after every round.

Config: the app's run config (``[tool.flwr.app.config]`` in pyproject.toml), then
``configs/adversaries.yaml`` and ``configs/compare.yaml``, then an optional overlay YAML,
then ``key=value`` overrides. With ``lr-grid=[...]`` each strategy first gets its settings
chosen on the validation split (``server-examples``): every lr of the grid, crossed with the
strategy's own ``tune`` grids (e.g. FedProx's ``proximal-mu``), one run at each of the
``selection-seeds``, scored by their mean (:func:`select_settings`); then ``seeds`` run at
the chosen setting, scored on the test split. A run's score is its mean accuracy over the
last ``score-rounds`` rounds (1: the final round); ``report-rounds=[1, 3, 5]`` adds the
accuracy after each of these rounds to the table (the fine-tuning regime's horizons).
``reuse-runs=true`` reads back every run whose history and run config are already in
``out`` (:func:`run_once`).
Writes to ``out``: ``rounds.csv`` (strategy, seed, round, accuracy, loss, seconds),
``summary.json`` (``{"strategies": {name: :func:`summarize`'s entry}, "selection": ...,
"config": {...}}``) and ``accuracy_vs_round.png``; prints a table.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.runner import (
    CONFIGS,
    app_run_config,
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


#: The method the comparisons are about; every other strategy is a baseline.
METHOD = "fedugm"


def score(accuracy: Sequence[float], last_rounds: int) -> float:
    """A run's score: its mean accuracy over the last ``last_rounds`` rounds (1: the final
    round). At a large lr accuracy swings by points from round to round, and a mean over
    the tail ranks settings and methods by where they have settled, not by one draw."""
    if last_rounds < 1:
        raise ValueError(f"score-rounds={last_rounds}; give 1 (final round) or more.")
    tail = list(accuracy[1:])[-last_rounds:] or list(accuracy)  # index 0: the initial model
    return statistics.fmean(tail)


def rounds_to_reach(accuracy: Sequence[float], target: float) -> int | None:
    """First round (1-based; index 0 is the initial model) with accuracy ≥ target."""
    for round_index, value in enumerate(accuracy[1:], start=1):
        if value >= target:
            return round_index
    return None


def seconds_per_round(seconds: Sequence[float]) -> float:
    """The median wall time of one round (training + evaluation), from the cumulative
    ``seconds`` of a history; the median leaves out the first round's worker start-up."""
    return statistics.median(b - a for a, b in itertools.pairwise(seconds)) \
        if len(seconds) > 1 else float("nan")


def summarize(histories: dict[str, list[dict]], last_rounds: int = 1,
              report_rounds: Sequence[int] = ()) -> dict[str, dict]:
    """Per strategy: its scores (:func:`score`, one per seed), final accuracy and loss,
    seconds per round, reply bytes per round, rounds to the best baseline's score, and
    ``accuracy_after_round``: ``{k: [accuracy after round k, one per seed]}`` for each k of
    ``report_rounds`` (the few-round horizons of the fine-tuning regime).

    The best baseline is the strategy other than :data:`METHOD` with the highest mean score
    (T); on each strategy's accuracy curve averaged over seeds, ``rounds_to_best_baseline``
    is the first round ≥ T and ``rounds_to_95pct_best_baseline`` the first ≥ 0.95·T (None:
    not reached). The baseline's own rounds to T are the reference for "in ≤ 0.6× its
    rounds"."""
    import numpy as np

    scores = {name: [score(h["accuracy"], last_rounds) for h in runs]
              for name, runs in histories.items()}
    baselines = [n for n in histories if n != METHOD and scores[n]]
    best = max(baselines, key=lambda n: statistics.fmean(scores[n]), default=None)
    target = statistics.fmean(scores[best]) if best else None
    summary = {}
    for name, runs in histories.items():
        curve = np.mean([h["accuracy"] for h in runs], axis=0).tolist()
        sent = [statistics.fmean(r["bytes"] for r in h["replies"]) for h in runs
                if h.get("replies")]
        summary[name] = {
            "score": scores[name],
            "final_accuracy": [h["accuracy"][-1] for h in runs],
            "final_loss": [h["loss"][-1] for h in runs],
            "accuracy_after_round": {k: [h["accuracy"][k] for h in runs] for k in report_rounds},
            "seconds": [h["seconds"][-1] for h in runs],
            "seconds_per_round": statistics.fmean(seconds_per_round(h["seconds"])
                                                  for h in runs),
            "reply_bytes_per_round": statistics.fmean(sent) if sent else None,
            "best_baseline": best,
            "rounds_to_best_baseline": None if best is None else rounds_to_reach(curve, target),
            "rounds_to_95pct_best_baseline":
                None if best is None else rounds_to_reach(curve, 0.95 * target),
        }  # fmt: skip
    return summary


def format_table(summary: dict, num_rounds: int, last_rounds: int = 1) -> str:
    """Markdown table ("—": not reached within the run's rounds, or no baseline to reach)."""
    what = "final accuracy" if last_rounds == 1 else f"accuracy, mean of last {last_rounds} rounds"
    first = next(iter(summary.values()))
    best = first["best_baseline"] or "the best baseline"
    reference = summary.get(best, {}).get("rounds_to_best_baseline")
    after = list(first["accuracy_after_round"])
    lines = [f"| strategy | {what} (%) | "
             + "".join(f"after round {k} (%) | " for k in after)
             + f"rounds to {best}'s score (× {best}'s) | rounds to 95 % of it | s / round | "
             "reply MB / round |", "|---|---|---|---|---|---|" + "---|" * len(after)]

    def cell(value: float | None, spec: str = "") -> str:
        return "—" if value is None else format(value, spec)

    for name, s in summary.items():
        sent = s["reply_bytes_per_round"]
        rounds = s["rounds_to_best_baseline"]
        ratio = f" ({rounds / reference:.2f}×)" if rounds and reference else ""
        lines.append(f"| {name} | {mean_std(s['score'], 100)} | "
                     + "".join(f"{mean_std(a, 100)} | " for a in s["accuracy_after_round"].values())
                     + f"{cell(rounds)}{ratio} | "
                     f"{cell(s['rounds_to_95pct_best_baseline'])} | "
                     f"{s['seconds_per_round']:.2f} | "
                     f"{cell(None if sent is None else sent / 1e6, '.3f')} |")
    lines.append(f"\nmean ± std over seeds; rounds (of {num_rounds}): the first round at which "
                 f"the strategy's accuracy, averaged over seeds, reaches {best}'s mean score, "
                 "or 95 % of it; s / round: median wall time of a round (training + "
                 "evaluation); reply MB / round: the tensor bytes of all the clients' replies "
                 "in a round (10^6 bytes).")
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
    ``tune: {fedprox: {proximal-mu: [0.01, 0.1]}}``), as run-config overrides. The entry
    ``variants`` is one axis of whole settings (e.g. ``[{ugm-server-momentum: 0.5},
    {ugm-server-optimizer: adam, ugm-server-lr: 0.01}]``), for knobs that go together."""
    axes: dict[str, list] = {"lr": [{"lr": float(v)} for v in cfg["lr-grid"]]}
    for key, values in (cfg["tune"].get(name) or {}).items():
        axes[str(key)] = ([dict(v) for v in values] if key == "variants"
                          else [{str(key): v} for v in values])
    return [{k: v for part in parts for k, v in part.items()}
            for parts in itertools.product(*axes.values())]


def check_benchmark_config(cfg) -> None:
    """Stop with a clear message, before any run, when ``strategies`` or a ``tune`` grid
    names an unknown strategy or a key the app's run config does not have, or a
    ``report-rounds`` entry is not a round of the run (a typo would otherwise fail only when
    its run starts, or when the table is printed, possibly an hour into a benchmark)."""
    from simulations.flower_app import STRATEGIES

    rounds = int(cfg["num-server-rounds"])
    outside = [k for k in cfg["report-rounds"] if not 0 <= int(k) <= rounds]
    if outside:
        raise SystemExit(f"compare: report-rounds {outside} are not rounds of this run "
                         f"(0 = the initial model, up to num-server-rounds={rounds}).")

    known = set(app_run_config())
    for name in [*cfg.strategies, *(cfg["tune"] or {})]:
        if name not in STRATEGIES:
            raise SystemExit(f"compare: unknown strategy {name!r}; choose from {STRATEGIES}.")
    for name in cfg["tune"] or {}:
        unknown = {k for setting in setting_grid(cfg, name) for k in setting} - known
        if unknown:
            raise SystemExit(f"compare: tune.{name} varies {sorted(unknown)}, which are not "
                             "run-config keys (`python -m simulations.compare --help` lists "
                             "them).")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def run_once(run_config: dict[str, Any], label: str, reuse: bool) -> dict[str, Any]:
    """One simulation (:func:`simulate`); its run config is saved beside its history. With
    ``reuse`` a history whose saved run config gives the same run (:func:`same_run`) is read
    back instead of run again (``reuse-runs=true``: resume an interrupted benchmark, or add
    a strategy to a finished one, in the same ``out``)."""
    from simulations.flower_app import history_path

    path = history_path(run_config["out"], run_config["strategy"], run_config["seed"])
    saved = path.with_suffix(".config.json")
    if reuse and path.exists() and saved.exists() and same_run(
            json.loads(saved.read_text()), json.loads(json.dumps(run_config))):
        progress(f"{label} (seed {run_config['seed']}): reused {path}")
        return json.loads(path.read_text())
    saved.unlink(missing_ok=True)
    history = simulate(run_config, label=label)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(run_config, indent=1) + "\n")
    return history


def same_run(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a saved run config gives the run ``wanted`` asks for: every saved key has
    the wanted value, and a key the saved run did not know yet (added to the app later)
    has its default value."""
    defaults = app_run_config()
    return all(k in wanted and wanted[k] == v for k, v in saved.items()) and all(
        k in defaults and wanted[k] == defaults[k] for k in set(wanted) - set(saved))


def selection_seeds(cfg) -> list[int]:
    """``selection-seeds`` as a list (one seed may be given as a number)."""
    raw = cfg["selection-seeds"]
    seeds = [int(raw)] if isinstance(raw, int) else [int(s) for s in raw]
    if not seeds:
        raise SystemExit("compare: selection-seeds is empty; give the seeds of the "
                         "selection runs, e.g. selection-seeds=[100].")
    return seeds


def select_settings(cfg, base: dict, out: Path) -> dict[str, dict]:
    """Per strategy, the setting of :func:`setting_grid` with the best :func:`score` (mean
    accuracy of the last ``score-rounds`` rounds) on the VALIDATION split
    (``evaluate-on=validation``: the ``server-examples`` split, never the test set),
    averaged over one run at each of ``selection-seeds`` (several seeds: a choice between
    settings a few tenths apart is not one draw's luck); ties go to the smaller lr, then to
    the earlier setting. Returns ``{strategy: {"chosen": {key: value}, "validation":
    [{**setting, "accuracy": mean, "per_seed": [a, ...]}, ...], "mean_over_lr_grid": m}}``;
    ``m`` averages, over the lr grid, the best mean score at each lr (how forgiving the
    method is of its learning rate)."""
    seeds = selection_seeds(cfg)
    runs = [(name, setting, seed) for name in cfg.strategies
            for setting in setting_grid(cfg, name) for seed in seeds]
    per_seed: dict[str, dict[str, tuple[dict, list[float]]]] = {}
    for done, (name, setting, seed) in enumerate(runs, start=1):
        tag = " ".join(f"{k}={_value(v)}" for k, v in setting.items())
        run_config = {**base, **setting, "strategy": str(name), "evaluate-on": "validation",
                      "seed": seed, "out": str(out / "selection" / tag.replace(" ", "_"))}
        history = run_once(run_config, f"[select {done}/{len(runs)}] {name} {tag}",
                           bool(cfg["reuse-runs"]))
        per_seed.setdefault(str(name), {}).setdefault(tag, (setting, []))[1].append(
            score(history["accuracy"], int(cfg["score-rounds"])))
    selection: dict[str, dict] = {}
    for name, settings in per_seed.items():
        scored = [{**setting, "accuracy": statistics.fmean(accuracies), "per_seed": accuracies}
                  for setting, accuracies in settings.values()]
        best = max(scored, key=lambda r: (r["accuracy"], -r["lr"], -scored.index(r)))
        per_lr: dict[float, float] = {}
        for r in scored:
            per_lr[r["lr"]] = max(per_lr.get(r["lr"], 0.0), r["accuracy"])
        selection[name] = {"validation": scored, "chosen": _setting(best),
                           "mean_over_lr_grid": statistics.fmean(per_lr.values())}
    return selection


def _setting(row: dict) -> dict:
    """A validation row without its scores: the run-config overrides of its setting."""
    return {k: v for k, v in row.items() if k not in ("accuracy", "per_seed")}


def format_selection(selection: dict[str, dict], seeds: Sequence[int]) -> str:
    what = f"seed {seeds[0]}" if len(seeds) == 1 else \
        f"mean over seeds {', '.join(map(str, seeds))}"
    lines = [f"settings chosen on the validation split ({what}):",
             "| strategy | validation accuracy (%) per setting | chosen | mean over the lr "
             "grid (%) |", "|---|---|---|---|"]
    for name, entry in selection.items():
        cells = ", ".join(
            " ".join(f"{k} {_value(v)}" for k, v in _setting(r).items())
            + f": {100 * r['accuracy']:.2f}" for r in entry["validation"])
        chosen = " ".join(f"{k} {_value(v)}" for k, v in entry["chosen"].items())
        lines.append(f"| {name} | {cells} | {chosen} | {100 * entry['mean_over_lr_grid']:.2f} |")
    return "\n".join(lines)


def require_task_data(task: str) -> None:
    """Load the task's data once here, so that a missing dataset or package stops the run
    with its install command before any simulation starts (inside Ray the error would be
    one of many client tracebacks), and a feature cache is built once, not per worker."""
    from simulations.tasks import load_task

    try:
        load_task(task)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise SystemExit(f"compare: the data of task {task!r} is not available: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv,
                      simulation_layers(COMPARE_CONFIG), prog="compare", doc=__doc__)
    quiet_flower_console()
    check_benchmark_config(cfg)
    require_task_data(str(cfg.task))
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = plain(cfg, "strategies", "seeds", "lr-grid", "tune", "selection-seeds",
                 "score-rounds", "reuse-runs", "report-rounds")
    last_rounds = int(cfg["score-rounds"])
    selection = select_settings(cfg, base, out) if cfg["lr-grid"] else {}
    histories: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    runs = [(seed, name) for seed in cfg.seeds for name in cfg.strategies]
    for done, (seed, name) in enumerate(runs, start=1):
        run_config = {**base, "strategy": str(name), "seed": int(seed),
                      "out": str(out / "histories")}
        if selection:
            run_config.update(selection[str(name)]["chosen"])
        histories[str(name)].append(run_once(run_config, f"[{done}/{len(runs)}] {name}",
                                             bool(cfg["reuse-runs"])))

    with open(out / "rounds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "seed", "round", "accuracy", "loss", "seconds"])
        for name, runs_of in histories.items():
            for h in runs_of:
                for r, (a, lo, s) in enumerate(zip(h["accuracy"], h["loss"], h["seconds"],
                                                   strict=True)):
                    writer.writerow([name, h["seed"], r, f"{a:.4f}", f"{lo:.4f}", f"{s:.2f}"])
    summary = summarize(histories, last_rounds, [int(k) for k in cfg["report-rounds"]])
    write_json(out / "summary.json", {"strategies": summary, "config": plain(cfg),
                                      "selection": selection,
                                      "wall_time_s": time.perf_counter() - start})
    skew = f" {cfg['dirichlet-alpha']}" if cfg.partition == "dirichlet" else ""
    title = (f"{cfg.task}, {cfg['num-clients']} clients, {cfg.partition}{skew}, "
             f"{len(cfg.seeds)} seeds")
    plot(histories, out / "accuracy_vs_round.png", title)
    if selection:
        print(format_selection(selection, selection_seeds(cfg)) + "\n")
    print(format_table(summary, int(cfg["num-server-rounds"]), last_rounds))
    progress(f"\n{len(runs)} simulations in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
