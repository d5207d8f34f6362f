"""Compare Flower's FedAvg and FedProx with FedUGM on identical non-IID partitions, on Ray.

    python -m simulations.compare                                   # multi-round (default)
    python -m simulations.compare configs/compare_one_shot.yaml     # one-shot merging
    python -m simulations.compare dirichlet-alpha=0.5 seeds=[0] out=results/a05

Each (seed, strategy) is one Flower simulation (``flwr.simulation.run_simulation``, Ray
backend, one CPU per client) of the app in ``simulations.flower_app``; the server evaluates
the global model on the held-out test split before training and after every round.

Config: the app's run config (``[tool.flwr.app.config]`` in pyproject.toml), then
``configs/compare.yaml``, then an optional overlay YAML, then ``key=value`` overrides; an
unknown key is an error. Writes to ``out``: ``rounds.csv`` (strategy, seed, round,
accuracy, loss, seconds), ``summary.json`` (``{"strategies": {name: {"final_accuracy":
[one per seed], "rounds_to_fedavg_final": [...], "seconds": [...]}}, "config": {...}}``)
and ``accuracy_vs_round.png``; prints a table.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

ROOT = Path(__file__).resolve().parent.parent
COMPARE_CONFIG = ROOT / "configs" / "compare.yaml"
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def load_config(argv: Sequence[str], overlay: Path | None = None) -> DictConfig:
    """Run config < compare.yaml < ``overlay`` < YAML given as first arg < key=value."""
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    layers = [OmegaConf.create(app), OmegaConf.load(COMPARE_CONFIG)]
    if overlay is not None:
        layers.append(OmegaConf.load(overlay))
    args = list(argv)
    if args and args[0].endswith((".yaml", ".yml")):
        layers.append(OmegaConf.load(args.pop(0)))
    default = OmegaConf.merge(*layers)
    OmegaConf.set_struct(default, True)
    try:
        return OmegaConf.merge(default, OmegaConf.from_cli(args))
    except ConfigKeyError as err:
        known = ", ".join(sorted(str(k) for k in default))
        raise SystemExit(f"compare: unknown config key {err.key!r}; known keys: {known}") from None


def quiet_flower_console() -> None:
    """Show only Flower's warnings and errors: our own progress lines are the log here."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.WARNING)


def run_one(cfg: DictConfig, strategy: str, seed: int, out: Path) -> dict:
    """One Flower simulation on Ray; returns the history the ServerApp wrote."""
    from flwr.simulation import run_simulation

    from simulations.flower_app import make_apps

    run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                  if k not in ("strategies", "seeds")}
    run_config.update({"strategy": strategy, "seed": seed, "out": str(out / "histories")})
    server_app, client_app = make_apps(run_config)
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=int(cfg["num-clients"]),
        backend_config={"client_resources": {"num_cpus": 1},
                        "init_args": {"logging_level": "ERROR", "log_to_driver": False}},
    )  # fmt: skip
    path = out / "histories" / f"history-{strategy}-seed{seed}.json"
    if not path.exists():
        raise RuntimeError(f"the {strategy} simulation (seed {seed}) wrote no history; "
                           "see the Flower log above.")
    return json.loads(path.read_text())


def rounds_to_reach(accuracy: list[float], target: float) -> int | None:
    """First round (1-based; index 0 is the initial model) with accuracy ≥ target."""
    for round_index, value in enumerate(accuracy[1:], start=1):
        if value >= target:
            return round_index
    return None


def mean_std(values: list[float], scale: float = 1.0) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.2f} ± {scale * std:.2f}"


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
    lines = ["| strategy | final accuracy (%) | rounds to FedAvg's final | wall s / run |",
             "|---|---|---|---|"]
    for name, s in summary.items():
        reached = [r for r in s["rounds_to_fedavg_final"] if r is not None]
        rounds = (f"{statistics.fmean(reached):.1f} (reached in {len(reached)}/"
                  f"{len(s['rounds_to_fedavg_final'])} seeds)" if reached
                  else f"not within {num_rounds}")
        lines.append(f"| {name} | {mean_std(s['final_accuracy'], 100)} | {rounds} | "
                     f"{statistics.fmean(s['seconds']):.1f} |")
    return "\n".join(lines)


def plot(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in histories.items():
        acc = 100 * np.array([h["accuracy"] for h in runs])
        mean, std = acc.mean(0), acc.std(0)
        rounds = np.arange(len(mean))
        ax.plot(rounds, mean, marker="o", markersize=3, label=name)
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    quiet_flower_console()
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    histories: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    runs = [(seed, name) for seed in cfg.seeds for name in cfg.strategies]
    start = time.perf_counter()
    for done, (seed, name) in enumerate(runs, start=1):
        history = run_one(cfg, str(name), int(seed), out)
        histories[str(name)].append(history)
        print(f"[{done}/{len(runs)}] seed {seed} {name}: final accuracy "
              f"{100 * history['accuracy'][-1]:.2f}% ({time.perf_counter() - start:.0f} s "
              "elapsed)", file=sys.stderr, flush=True)

    with open(out / "rounds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "seed", "round", "accuracy", "loss", "seconds"])
        for name, runs_of in histories.items():
            for h in runs_of:
                for r, (a, lo, s) in enumerate(zip(h["accuracy"], h["loss"], h["seconds"],
                                                   strict=True)):
                    writer.writerow([name, h["seed"], r, f"{a:.4f}", f"{lo:.4f}", f"{s:.2f}"])
    summary = summarize(histories)
    (out / "summary.json").write_text(json.dumps(
        {"strategies": summary, "config": OmegaConf.to_container(cfg, resolve=True),
         "wall_time_s": time.perf_counter() - start}, indent=2) + "\n")
    title = (f"{cfg.task}, {cfg['num-clients']} clients, {cfg.partition} "
             f"{cfg['dirichlet-alpha']}, {len(cfg.seeds)} seeds")
    plot(histories, out / "accuracy_vs_round.png", title)
    print(format_table(summary, int(cfg["num-server-rounds"])))
    print(f"\n{len(runs)} simulations in {time.perf_counter() - start:.0f} s; results in {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
