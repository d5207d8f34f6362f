"""Remove a backdoored client after FL, by each method, and compare with retraining.

    python -m simulations.unlearn                        # configs/unlearn.yaml
    python -m simulations.unlearn seeds=[0] num-server-rounds=10 out=results/unlearn_quick
    python -m simulations.unlearn --help                 # every key, with defaults

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
* ``retrain``: FL from scratch without the client, same rounds (Ray; FedUGM never samples
  it, ``exclude-clients``): the gold standard.

For each: test accuracy, accuracy on the removed client's clean data, backdoor attack
success rate (ASR: triggered test images not of the target class that are classified as the
target), L2 distance to the retrained model, seconds of server-side work inside the
Flower run (the strategy's rounds for retraining, ``FedUGM.remove`` for the removals; Ray's
start-up is not counted for either, but the first message to each simulated client pays for
starting its ClientApp, ~10 s on 2 cores, in the retraining's round 1 and in the removal
runs alike), and client trainings (fine-tuning jobs run by clients, counted from the
run's train replies and online-removal requests: the hardware-independent cost). Writes
``unlearn.json`` (``{"methods": {name: {metric: [one per seed]}}, "config": {...}}``) and
``unlearn.png`` to ``out``; prints a table.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl_ugm.ledger import Ledger
from fl_ugm.removal import remove_from_ledger, subtract_applied
from simulations import runner, tasks
from simulations.adversaries import add_trigger
from simulations.flower_app import client_partition, experiment_for, fresh_model
from simulations.runner import mean_std, plain, progress

UNLEARN_CONFIG = runner.CONFIGS / "unlearn.yaml"
METHODS = ("none", "ta-negation", "eq13-offline", "ugm-offline", "ugm-online", "ugm-repair",
           "ugm-online-repair", "subtract-applied", "retrain")
METRICS = ("test_accuracy", "removed_accuracy", "backdoor_asr", "dist_to_retrain", "seconds",
           "client_trainings")


def simulate_to(cfg: dict, label: str, **overrides) -> tuple[dict[str, torch.Tensor], dict]:
    """One Flower simulation on Ray; returns (final global state, the run's history)."""
    run_config = {**cfg, **overrides}
    history = runner.simulate(run_config, label=label)
    return load_file(str(run_config["save-final"])), history


def client_trainings(history: dict, key: str = "replies") -> int:
    """Fine-tuning jobs the clients ran in a Flower run: train replies over all its rounds
    (``key="removal_requests"``: the online-removal requests)."""
    return sum(len(r["nodes"]) for r in history.get(key, []))


def removal_run(cfg: dict, ledger_dir: Path, client: int, mode: str, work: Path):
    """A removal-only Flower run (no training rounds) on a copy of the ledger: FedUGM.remove
    then one repair round. Returns (removed state, repaired state, report, client trainings
    of the removal, of the repair round)."""
    ledger_copy = work / f"ledger-{mode}"
    shutil.rmtree(ledger_copy, ignore_errors=True)
    shutil.copytree(ledger_dir, ledger_copy)
    repaired, history = simulate_to(cfg, f"{mode} removal + 1 repair round", **{
        "num-server-rounds": 0, "ledger": str(ledger_copy), "remove-client": str(client),
        "removal-mode": mode, "repair-rounds": 1, "out": str(work / mode),
        "save-final": str(work / f"{mode}-repair.safetensors")})  # fmt: skip
    report = history["removal"]
    _, removed = Ledger(ledger_copy).global_state(report["removal_round"])
    return (removed, repaired, report, client_trainings(history, "removal_requests"),
            client_trainings(history))


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
    triggered = tasks.evaluate(model, add_trigger(x_test[keep]),
                               torch.full_like(y_test[keep], target))
    x_clean, y_clean = client_partition(cfg, client)
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

    states["none"], _ = simulate_to(cfg, "FedUGM with the backdoored client", **{
        "ledger": str(ledger_dir), "out": str(work / "train"),
        "save-final": str(work / "full.safetensors")})  # fmt: skip
    seconds["none"] = 0.0
    states["retrain"], history = simulate_to(cfg, "retraining without it", **{
        "exclude-clients": str(client), "out": str(work / "retrain"),
        "save-final": str(work / "retrain.safetensors")})  # fmt: skip
    seconds["retrain"] = history["seconds"][-1]
    trainings["retrain"] = client_trainings(history)

    for mode, name in (("offline", "ugm"), ("online", "ugm-online")):
        removed, repaired, report, removal, repair = removal_run(cfg, ledger_dir, client, mode,
                                                                 work)
        states[f"ugm-{mode}"], states[f"{name}-repair"] = removed, repaired
        seconds[f"ugm-{mode}"] = report["removal_seconds"]
        seconds[f"{name}-repair"] = report["seconds"]
        trainings[f"ugm-{mode}"] = removal  # the removed client's fine-tuning, if online
        trainings[f"{name}-repair"] = removal + repair
        progress(f"[seed {seed}] {mode} removal: {report['removal_seconds']:.2f} s, + 1 repair "
                 f"round {report['seconds']:.2f} s; {100 * report['reverted_fraction']:.1f} % "
                 "of the entries reverted")

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
    lines = ["| method | test acc (%) | removed client clean acc (%) | backdoor ASR (%) | "
             "L2 to retrain | seconds | client trainings |", "|---|---|---|---|---|---|---|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | {mean_std(metrics['test_accuracy'], 100)} | "
                     f"{mean_std(metrics['removed_accuracy'], 100)} | "
                     f"{mean_std(metrics['backdoor_asr'], 100)} | "
                     f"{mean_std(metrics['dist_to_retrain'], 1)} | "
                     f"{mean_std(metrics['seconds'], 1)} | "
                     f"{statistics.fmean(metrics['client_trainings']):.0f} |")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    fig, axes = runner.figure(3, (12, 3.8))
    for ax, metric, label in zip(axes, ("test_accuracy", "backdoor_asr", "dist_to_retrain"),
                                 ("test accuracy (%)", "backdoor ASR (%)", "L2 to retrain"),
                                 strict=True):
        scale = 1.0 if metric == "dist_to_retrain" else 100.0
        means = [scale * statistics.fmean(results[m][metric]) for m in METHODS]
        ax.bar(range(len(METHODS)), means)
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{label}, mean over seeds", fontsize=10)
    runner.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    layers = runner.simulation_layers(runner.CONFIGS / "compare.yaml", UNLEARN_CONFIG)
    cfg = runner.load_config(sys.argv[1:] if argv is None else argv, layers, prog="unlearn",
                             doc=__doc__)
    runner.quiet_flower_console()
    if int(cfg["backdoor-client"]) < 0:
        raise SystemExit("unlearn: set backdoor-client to the partition id to remove.")
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [run_seed(plain(cfg, "strategies", "seeds"), int(seed), out) for seed in cfg.seeds]
    results = {name: {metric: [r[name][metric] for r in per_seed] for metric in METRICS}
               for name in METHODS}
    runner.write_json(out / "unlearn.json", {"methods": results, "config": plain(cfg)})
    plot(results, out / "unlearn.png")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
