"""Remove a backdoored client after FL, by each method, and compare with retraining.

    python -m simulations.unlearn                        # configs/unlearn.yaml
    python -m simulations.unlearn seeds=[0] num-server-rounds=10 out=results/unlearn_quick

Per seed: FedUGM trains all clients on Ray (Flower simulation of ``simulations.flower_app``)
with a ledger; the ``backdoor-client`` stamps a trigger on all its examples and relabels them
``backdoor-target``. Then the client is removed by:

* ``none``: keep the trained model;
* ``ta-negation``: θ − α_t Δ_t with its stored delta (task-arithmetic negation);
* ``eq13-offline``: Eq. 13 alone from the ledger (re-centred), without the revert of
  uninformed coordinates (``fl_ugm.removal``), to show what the revert adds;
* ``ugm-offline``: ``FedUGM.remove(mode="offline")`` in a Flower removal run on a copy of
  the ledger (Eq. 13 + revert of the coordinates no remaining client informs);
* ``ugm-online``: ``FedUGM.remove(mode="online")``: the server sends the client the current
  global with a removal instruction; the client fine-tunes and returns Δ_t, F_t;
* ``ugm-repair`` / ``ugm-online-repair``: the same followed by one FL round of the remaining
  clients (``repair-rounds=1``), in the same Flower run;
* ``subtract-applied``: subtract everything the merges added on the client's behalf over all
  its rounds (the ledger's running sum; ``fl_ugm.removal.subtract_applied``);
* ``retrain``: FL from scratch without the client, same rounds (Ray): the gold standard.

For each: test accuracy, accuracy on the removed client's clean data, backdoor attack
success rate (ASR: triggered test images not of the target class that are classified as the
target), L2 distance to the retrained model, seconds of server-side work inside the
Flower run (the strategy's rounds for retraining, ``FedUGM.remove`` for the removals; Ray's
start-up is not counted for either, but the first message to each simulated client pays for
starting its ClientApp, ~10 s on 2 cores, in the retraining's round 1 and in the removal
runs alike), and client trainings (fine-tuning jobs run by clients: the hardware-independent
cost). Writes ``unlearn.json`` (``{"methods": {name: {metric:
[one per seed]}}, "config": {...}}``) and ``unlearn.png`` to ``out``; prints a table.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fl_ugm.ledger import Ledger
from fl_ugm.removal import remove_from_ledger, subtract_applied
from simulations import tasks
from simulations.compare import OFFLINE_ENV, ROOT, load_config, quiet_flower_console
from simulations.flower_app import client_partition, experiment_for, fresh_model, make_apps

UNLEARN_CONFIG = ROOT / "configs" / "unlearn.yaml"
METHODS = ("none", "ta-negation", "eq13-offline", "ugm-offline", "ugm-online", "ugm-repair",
           "ugm-online-repair", "subtract-applied", "retrain")
METRICS = ("test_accuracy", "removed_accuracy", "backdoor_asr", "dist_to_retrain", "seconds",
           "client_trainings")


def simulate(cfg: dict, **overrides) -> tuple[dict[str, torch.Tensor], dict]:
    """One Flower simulation on Ray; returns (final global state, the run's history)."""
    from flwr.simulation import run_simulation

    run_config = {**cfg, **overrides}
    server_app, client_app = make_apps(run_config)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=int(run_config["num-clients"]),
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})
    path = Path(run_config["save-final"])
    history = (Path(run_config["out"])
               / f"history-{run_config['strategy']}-seed{int(run_config['seed'])}.json")
    if not (path.exists() and history.exists()):
        raise RuntimeError(f"the simulation wrote no final model to {path} or no history to "
                           f"{history}; see the log above.")
    return load_file(str(path)), json.loads(history.read_text())


def client_trainings(history: dict) -> int:
    """Fine-tuning jobs the clients ran in a Flower run: replies over all its train rounds."""
    return sum(len(r["nodes"]) for r in history["replies"])


def removal_run(cfg: dict, ledger_dir: Path, client: int, mode: str, work: Path):
    """A removal-only Flower run (no training rounds) on a copy of the ledger: FedUGM.remove
    then one repair round. Returns (removed state, repaired state, report, repair trainings)."""
    ledger_copy = work / f"ledger-{mode}"
    shutil.rmtree(ledger_copy, ignore_errors=True)
    shutil.copytree(ledger_dir, ledger_copy)
    repaired, history = simulate(cfg, **{
        "num-server-rounds": 0, "ledger": str(ledger_copy), "remove-client": str(client),
        "removal-mode": mode, "repair-rounds": 1, "out": str(work / mode),
        "save-final": str(work / f"{mode}-repair.safetensors")})  # fmt: skip
    report = history["removal"]
    _, removed = Ledger(ledger_copy).global_state(report["removal_round"])
    return removed, repaired, report, client_trainings(history)


def task_arithmetic_negation(state, ledger: Ledger, client: int):
    record = ledger.client(str(client))
    return {**state, **{k: state[k] - record.alpha * record.delta[k] for k in record.fisher}}


def evaluate(cfg: dict, state, retrained, client: int) -> dict[str, float]:
    inputs, labels, split, _ = experiment_for(cfg)
    model = fresh_model(cfg, inputs)
    model.load_state_dict(state)
    x_test, y_test = inputs[split.test], labels[split.test]
    target = int(cfg["backdoor-target"])
    keep = y_test != target
    triggered = tasks.evaluate(model, tasks.add_trigger(x_test[keep]),
                               torch.full_like(y_test[keep], target))
    x_clean, y_clean = client_partition(cfg, client, poisoned=False)
    params = [k for k, _ in model.named_parameters()]
    distance = torch.sqrt(sum(((state[k] - retrained[k]).double() ** 2).sum() for k in params))
    return {
        "test_accuracy": tasks.evaluate(model, x_test, y_test).accuracy,
        "removed_accuracy": tasks.evaluate(model, x_clean, y_clean).accuracy,
        "backdoor_asr": triggered.accuracy,
        "dist_to_retrain": float(distance),
    }


def run_seed(cfg: dict, seed: int, out: Path) -> dict[str, dict[str, float]]:
    cfg = {**cfg, "seed": seed, "strategy": "fedugm"}
    client = int(cfg["backdoor-client"])
    work = out / f"seed{seed}"
    ledger_dir = work / "ledger"
    shutil.rmtree(ledger_dir, ignore_errors=True)
    seconds, states = {}, {}
    trainings = dict.fromkeys(METHODS, 0)

    def log(message: str) -> None:
        print(f"[seed {seed}] {message}", file=sys.stderr, flush=True)

    states["none"], history = simulate(cfg, **{
        "ledger": str(ledger_dir), "out": str(work / "train"),
        "save-final": str(work / "full.safetensors")})  # fmt: skip
    seconds["none"] = 0.0
    log(f"trained with the backdoored client in {history['seconds'][-1]:.1f} s")
    states["retrain"], history = simulate(cfg, **{
        "exclude-clients": str(client), "out": str(work / "retrain"),
        "save-final": str(work / "retrain.safetensors")})  # fmt: skip
    seconds["retrain"] = history["seconds"][-1]
    trainings["retrain"] = client_trainings(history)
    log(f"retrained without it in {seconds['retrain']:.1f} s")

    for mode, name in (("offline", "ugm"), ("online", "ugm-online")):
        removed, repaired, report, repair = removal_run(cfg, ledger_dir, client, mode, work)
        states[f"ugm-{mode}"], states[f"{name}-repair"] = removed, repaired
        seconds[f"ugm-{mode}"] = report["removal_seconds"]
        seconds[f"{name}-repair"] = report["seconds"]
        trainings[f"ugm-{mode}"] = int(mode == "online")  # the removed client's fine-tuning
        trainings[f"{name}-repair"] = trainings[f"ugm-{mode}"] + repair
        log(f"{mode} removal in {report['removal_seconds']:.2f} s, + 1 repair round: "
            f"{report['seconds']:.2f} s; {100 * report['reverted_fraction']:.1f} % reverted")

    ledger = Ledger(ledger_dir)
    for name, remove in (
        ("ta-negation", lambda: task_arithmetic_negation(states["none"], ledger, client)),
        ("eq13-offline", lambda: remove_from_ledger(ledger, str(client),
                                                    revert_uninformed=False)[0]),
        ("subtract-applied", lambda: subtract_applied(ledger, str(client))[0]),
    ):
        start = time.perf_counter()
        states[name] = remove()
        seconds[name] = time.perf_counter() - start
    return {
        name: {**evaluate(cfg, states[name], states["retrain"], client),
               "seconds": seconds[name], "client_trainings": trainings[name]}
        for name in METHODS
    }


def format_table(results: dict[str, dict[str, list[float]]]) -> str:
    def cell(values: list[float], scale: float) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.fmean(values):.2f} ± {scale * std:.2f}"

    lines = ["| method | test acc (%) | removed client clean acc (%) | backdoor ASR (%) | "
             "L2 to retrain | seconds | client trainings |", "|---|---|---|---|---|---|---|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | {cell(metrics['test_accuracy'], 100)} | "
                     f"{cell(metrics['removed_accuracy'], 100)} | "
                     f"{cell(metrics['backdoor_asr'], 100)} | "
                     f"{cell(metrics['dist_to_retrain'], 1)} | {cell(metrics['seconds'], 1)} | "
                     f"{statistics.fmean(metrics['client_trainings']):.0f} |")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, metric, label in zip(axes, ("test_accuracy", "backdoor_asr", "dist_to_retrain"),
                                 ("test accuracy (%)", "backdoor ASR (%)", "L2 to retrain"),
                                 strict=True):
        scale = 1.0 if metric == "dist_to_retrain" else 100.0
        means = [scale * statistics.fmean(results[m][metric]) for m in METHODS]
        ax.bar(range(len(METHODS)), means)
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=35, ha="right", fontsize=8)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    os.environ.update(OFFLINE_ENV)
    cfg = load_config(sys.argv[1:] if argv is None else argv, overlay=UNLEARN_CONFIG)
    quiet_flower_console()
    if int(cfg["backdoor-client"]) < 0:
        raise SystemExit("unlearn: set backdoor-client to the partition id to remove.")
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
             if k not in ("strategies", "seeds")}
    per_seed = [run_seed(plain, int(seed), out) for seed in cfg.seeds]
    results = {name: {metric: [r[name][metric] for r in per_seed] for metric in METRICS}
               for name in METHODS}
    (out / "unlearn.json").write_text(json.dumps(
        {"methods": results, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=2))
    plot(results, out / "unlearn.png")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
