"""Remove a backdoored client after FL, by each method, and compare with retraining.

    python -m simulations.unlearn                        # configs/unlearn.yaml
    python -m simulations.unlearn seeds=[0] num-server-rounds=10 out=results/unlearn_quick

Per seed: FedUGM trains all clients on Ray (Flower simulation of ``simulations.flower_app``)
with a ledger; the ``backdoor-client`` stamps a trigger on all its examples and relabels them
``backdoor-target``. Then the client is removed by:

* ``none``: keep the trained model;
* ``ta-negation``: θ − α_t Δ_t with its stored delta (task-arithmetic negation);
* ``ugm-offline``: ``fl_ugm.removal.remove_from_ledger`` (Eq. 13, ledger only, re-centred);
* ``ugm-online``: the client fine-tunes from the current model under the prior δ and sends a
  fresh Δ_t, F_t; Eq. 13 with the others' stored Fishers (done in-process here, with the same
  training and Fisher code the ClientApp runs);
* ``ugm-repair``: ``ugm-offline`` followed by one FL round of the remaining clients (Ray);
* ``subtract-applied``: subtract everything the merges added on the client's behalf over all
  its rounds (the ledger's running sum; ``fl_ugm.removal.subtract_applied``);
* ``applied-repair``: ``subtract-applied`` followed by one FL round of the remaining clients;
* ``retrain``: FL from scratch without the client, same rounds (Ray): the gold standard.

For each: test accuracy, accuracy on the removed client's clean data, backdoor attack
success rate (ASR: triggered test images not of the target class that are classified as the
target), L2 distance to the retrained model, and seconds. Writes ``unlearn.json``
(``{"methods": {name: {metric: [one per seed]}}, "config": {...}}``) and ``unlearn.png`` to
``out``; prints a table.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fl_ugm.client import train_classifier
from fl_ugm.fisher import diagonal_fisher, iterate_batches
from fl_ugm.ledger import Ledger
from fl_ugm.merge import remove_client
from fl_ugm.removal import fisher_of_others, remove_from_ledger, subtract_applied
from simulations import tasks
from simulations.compare import OFFLINE_ENV, ROOT, load_config, quiet_flower_console
from simulations.flower_app import client_partition, experiment_for, fresh_model, make_apps

UNLEARN_CONFIG = ROOT / "configs" / "unlearn.yaml"
METHODS = ("none", "ta-negation", "ugm-offline", "ugm-online", "ugm-repair",
           "subtract-applied", "applied-repair", "retrain")
METRICS = ("test_accuracy", "removed_accuracy", "backdoor_asr", "dist_to_retrain", "seconds")


def simulate(cfg: dict, **overrides) -> dict[str, torch.Tensor]:
    """One Flower simulation on Ray; returns the final global state."""
    from flwr.simulation import run_simulation

    run_config = {**cfg, **overrides}
    server_app, client_app = make_apps(run_config)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=int(run_config["num-clients"]),
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})
    path = Path(run_config["save-final"])
    if not path.exists():
        raise RuntimeError(f"the simulation wrote no final model to {path}; see the log above.")
    return load_file(str(path))


def online_removal(cfg: dict, state, ledger: Ledger, client: int, seed: int):
    """The removed client fine-tunes from ``state`` (its own, poisoned data) under the prior
    δ and sends Δ, F; Eq. 13 with Σ_{s≠t} α_s F_s from the ledger."""
    x, y = client_partition(cfg, client)
    model = fresh_model(cfg, x)
    model.load_state_dict(state)
    train_classifier(model, x, y, epochs=int(cfg["local-epochs"]),
                     batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]), seed=seed,
                     optimizer=str(cfg["optimizer"]), prox_precision=float(cfg["prior-delta"]))
    fisher = diagonal_fisher(model, iterate_batches(x, y, 256), kind=str(cfg["fisher"]),
                             generator=torch.Generator().manual_seed(seed))
    delta = {k: p.detach() - state[k] for k, p in model.named_parameters()}
    rest = fisher_of_others(ledger, str(client), state)
    removed = remove_client({k: state[k] for k in fisher}, delta, fisher, rest,
                            alpha=ledger.client(str(client)).alpha,
                            prior_precision=float(cfg["prior-delta"]))
    return {**state, **removed}


def repair_round(cfg: dict, state, client: int, stem: Path) -> dict[str, torch.Tensor]:
    """One FL round of the remaining clients (Ray) starting from ``state``."""
    start_path = stem.with_suffix(".start.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(start_path))
    return simulate(cfg, **{"init-from": str(start_path), "num-server-rounds": 1,
                            "pretrain-epochs": 0, "exclude-clients": str(client),
                            "save-final": str(stem.with_suffix(".safetensors"))})


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
    seconds, states = {}, {}

    def log(message: str) -> None:
        print(f"[seed {seed}] {message}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    states["none"] = simulate(cfg, **{"ledger": str(ledger_dir),
                                      "save-final": str(work / "full.safetensors")})
    seconds["none"] = 0.0
    training = time.perf_counter() - start
    log(f"trained with the backdoored client in {training:.0f} s")

    start = time.perf_counter()
    states["retrain"] = simulate(cfg, **{"exclude-clients": str(client),
                                         "save-final": str(work / "retrain.safetensors")})
    seconds["retrain"] = time.perf_counter() - start
    log(f"retrained without it in {seconds['retrain']:.0f} s")

    ledger = Ledger(ledger_dir)
    start = time.perf_counter()
    states["ta-negation"] = task_arithmetic_negation(states["none"], ledger, client)
    seconds["ta-negation"] = time.perf_counter() - start
    start = time.perf_counter()
    states["ugm-offline"], _ = remove_from_ledger(ledger, str(client))
    seconds["ugm-offline"] = time.perf_counter() - start
    start = time.perf_counter()
    states["ugm-online"] = online_removal(cfg, states["none"], ledger, client, seed)
    seconds["ugm-online"] = time.perf_counter() - start

    start = time.perf_counter()
    states["subtract-applied"], _ = subtract_applied(ledger, str(client))
    seconds["subtract-applied"] = time.perf_counter() - start

    for removed, repaired in (("ugm-offline", "ugm-repair"),
                              ("subtract-applied", "applied-repair")):
        start = time.perf_counter()
        states[repaired] = repair_round(cfg, states[removed], client, work / repaired)
        seconds[repaired] = seconds[removed] + time.perf_counter() - start
    log("removed by every method")

    return {
        name: {**evaluate(cfg, states[name], states["retrain"], client),
               "seconds": seconds[name]}
        for name in METHODS
    }


def format_table(results: dict[str, dict[str, list[float]]]) -> str:
    def cell(values: list[float], scale: float) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.fmean(values):.2f} ± {scale * std:.2f}"

    lines = ["| method | test acc (%) | removed client clean acc (%) | backdoor ASR (%) | "
             "L2 to retrain | seconds |", "|---|---|---|---|---|---|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | {cell(metrics['test_accuracy'], 100)} | "
                     f"{cell(metrics['removed_accuracy'], 100)} | "
                     f"{cell(metrics['backdoor_asr'], 100)} | "
                     f"{cell(metrics['dist_to_retrain'], 1)} | {cell(metrics['seconds'], 1)} |")
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
