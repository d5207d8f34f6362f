"""The fl_ugm Flower app: one ServerApp (strategy chosen by the run config), one ClientApp.

Run it with Flower's own tooling (``flwr run .`` against the local simulation connection in
``$FLWR_HOME/config.toml``, see the README, or against a SuperLink), or through
:func:`make_apps`, which bakes a config into fresh app objects for
``flwr.simulation.run_simulation`` (``simulations.compare``, ``simulations.unlearn``).

Run config keys (defaults in ``pyproject.toml`` ``[tool.flwr.app.config]``): ``strategy``
(fedavg | fedprox | fedugm | task-arithmetic [α_t = 1] | fisher-averaging),
``num-server-rounds``, ``local-epochs``, ``batch-size``, ``lr``, ``optimizer``,
``prior-delta`` (FedUGM's δ), ``proximal-mu`` (FedProx's μ), ``fisher``, ``alpha``,
``scale``, ``task``, ``model``, ``partition``, ``dirichlet-alpha``, ``classes-per-client``,
``num-clients``, ``seed``, ``test-examples``, ``server-examples`` and ``pretrain-epochs`` (>
0: the server pretrains the initial model on its own split, the one-shot setting), ``out``
(a directory for ``history-<strategy>-seed<seed>.json``; empty: don't write), ``ledger``
(FedUGM's ledger directory for client removal; empty: none), ``exclude-clients`` (partition
ids that do not train, e.g. "0,3"), ``backdoor-client``/``backdoor-target`` (that
partition's data carries a trigger relabelled to the target; -1: none),
``init-from``/``save-final`` (safetensors paths of the initial and final global state;
empty: none), ``remove-client`` (after training, remove that client id with
``FedUGM.remove``, ``removal-mode`` offline | online, then ``repair-rounds`` rounds without
it; the report goes to the history and ``out/removal-<id>.json``; with
``num-server-rounds=0`` this is a removal-only run on an existing ``ledger``),
``fisher-clip`` (FedUGM's Fisher-inflation defence; 0: off), ``attack-client``/``attack``/
``attack-scale`` (that partition sends hostile replies, see :func:`attack`; -1: none),
``resume`` (continue the run recorded in ``ledger`` after a crash, see
:func:`resume_point`). Clients
identify themselves by ``node_config["client-id"]`` if set, else their ``partition-id``.

Every client gets partition ``node_config["partition-id"]`` of the same seeded split, so all
strategies see identical data, unless its ``node_config["data-path"]`` names its own data
file (a deployment, see docs/deployment.md).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from safetensors.torch import load_file, save_file

from fl_ugm.client import handle_evaluate, handle_query, handle_train, train_classifier
from fl_ugm.ledger import write_atomically
from fl_ugm.strategy import FedUGM
from simulations import tasks

STRATEGIES = ("fedavg", "fedprox", "fedugm", "task-arithmetic", "fisher-averaging")


@functools.lru_cache(maxsize=4)
def experiment_data(
    task: str, seed: int, test: float, server: float, num_clients: int, scheme: str,
    dirichlet_alpha: float, classes_per_client: int,
) -> tuple[torch.Tensor, torch.Tensor, tasks.Split, list[np.ndarray]]:
    """(inputs, labels, split, client partitions as indices into the client pool); cached
    per process so a Ray worker loads and partitions the data once."""
    inputs, labels = tasks.load_task(task)
    split = tasks.split_indices(len(labels), test=test, server=server, seed=seed)
    parts = tasks.partition(labels[split.clients], num_clients, scheme, seed,
                            alpha=dirichlet_alpha, classes_per_client=classes_per_client)
    return inputs, labels, split, parts


def experiment_for(cfg: Mapping[str, Any]):
    """The cached experiment data for a run config (see :func:`experiment_data`)."""
    return experiment_data(
        str(cfg["task"]), int(cfg["seed"]), float(cfg["test-examples"]),
        float(cfg["server-examples"]), int(cfg["num-clients"]), str(cfg["partition"]),
        float(cfg["dirichlet-alpha"]), int(cfg["classes-per-client"]),
    )  # fmt: skip


def fresh_model(cfg: Mapping[str, Any], inputs: torch.Tensor) -> torch.nn.Module:
    """The run's model, initialised from its seed."""
    torch.manual_seed(int(cfg["seed"]))
    return tasks.build_model(str(cfg["model"]), inputs.shape[1], 10)


def excluded_clients(cfg: Mapping[str, Any]) -> set[int]:
    """Partition ids listed in ``exclude-clients`` ("0,3"): they train in no round."""
    text = str(cfg.get("exclude-clients", "")).strip()
    return {int(part) for part in text.split(",") if part.strip()}


def client_partition(cfg: Mapping[str, Any], partition_id: int, *, poisoned: bool = True):
    """This client's (inputs, labels). The ``backdoor-client`` (if ≥ 0) gets every example
    stamped with the trigger and relabelled ``backdoor-target`` (unless ``poisoned=False``:
    its clean data)."""
    inputs, labels, split, parts = experiment_for(cfg)
    if not 0 <= partition_id < len(parts):
        raise ValueError(
            f"partition-id {partition_id} is outside the run config's num-clients="
            f"{len(parts)}; give every SuperNode a partition-id below num-clients."
        )
    index = torch.as_tensor(split.clients[parts[partition_id]], dtype=torch.long)
    x, y = inputs[index], labels[index]
    if poisoned and partition_id == int(cfg.get("backdoor-client", -1)):
        x, y = tasks.add_trigger(x), torch.full_like(y, int(cfg.get("backdoor-target", 0)))
    return x, y


def build_strategy(cfg: Mapping[str, Any], num_clients: int) -> Strategy:
    """Flower's own FedAvg/FedProx, or FedUGM (with its UGM or a baseline merge rule)."""
    full = num_clients - len(excluded_clients(cfg))
    common = {
        "fraction_train": float(cfg.get("fraction-train", 1.0)),
        "fraction_evaluate": 0.0,  # we report centralized test accuracy
        "min_train_nodes": full if float(cfg.get("fraction-train", 1.0)) >= 1 else 2,
        "min_available_nodes": num_clients,
    }
    name = str(cfg["strategy"])
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=float(cfg["proximal-mu"]), **common)
    if name in ("fedugm", "task-arithmetic", "fisher-averaging"):
        # task arithmetic as in the paper: α_t = 1 for every client
        alpha = "ones" if name == "task-arithmetic" else str(cfg["alpha"])
        return FedUGM(
            prior_precision=float(cfg["prior-delta"]), alpha=alpha,
            scale=float(cfg["scale"]), fisher=str(cfg["fisher"]),
            merge="ugm" if name == "fedugm" else name, ledger=str(cfg.get("ledger", "")) or None,
            fisher_clip=float(cfg.get("fisher-clip", 3.0)) or None,
            **common,
        )  # fmt: skip
    raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}.")


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float = 120.0) -> None:
    """Wait until ``expected`` SuperNodes are connected; fail clearly instead of forever."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {connected} SuperNode(s) connected after {timeout_s:.0f} s but the run "
                f"config has num-clients={expected}. Start {expected} SuperNodes, or for the "
                "local simulation set options.num-supernodes = "
                f"{expected} in $FLWR_HOME/config.toml ([superlink.local-simulation]), or run "
                f"with --run-config 'num-clients={connected}'."
            )
        time.sleep(0.5)


def run_server(grid: Grid, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp's work: initial model, strategy.start, centralized test evaluation."""
    torch.set_num_threads(1)
    wait_for_nodes(grid, int(cfg["num-clients"]))
    inputs, labels, split, _ = experiment_for(cfg)
    x_test, y_test = inputs[split.test], labels[split.test]
    model = fresh_model(cfg, inputs)
    if cfg.get("init-from"):
        model.load_state_dict(load_file(str(cfg["init-from"])))
    elif int(cfg["pretrain-epochs"]) > 0:
        train_classifier(model, inputs[split.server], labels[split.server],
                         epochs=int(cfg["pretrain-epochs"]), batch_size=int(cfg["batch-size"]),
                         lr=float(cfg["lr"]), seed=int(cfg["seed"]),
                         optimizer=str(cfg["optimizer"]))
    history: dict[str, Any] = {"strategy": cfg["strategy"], "seed": int(cfg["seed"]),
                               "accuracy": [], "loss": [], "seconds": [], "replies": []}
    start = time.perf_counter()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = tasks.evaluate(model, x_test, y_test)
        history["accuracy"].append(result.accuracy)
        history["loss"].append(result.loss)
        history["seconds"].append(time.perf_counter() - start)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy = build_strategy(cfg, int(cfg["num-clients"]))
    removed = str(cfg.get("remove-client", "")).strip()
    if removed and not (isinstance(strategy, FedUGM) and strategy.ledger is not None):
        raise ValueError("remove-client needs strategy=fedugm and a ledger directory (ledger=).")
    _record_replies(strategy, history)
    train_config = ConfigRecord({
        "local-epochs": int(cfg["local-epochs"]), "lr": float(cfg["lr"]),
        "batch-size": int(cfg["batch-size"]), "optimizer": str(cfg["optimizer"]),
    })  # fmt: skip
    arrays = ArrayRecord(model.state_dict())
    rounds = int(cfg["num-server-rounds"])
    if rounds > 0 and getattr(strategy, "ledger", None) is not None:
        rounds, arrays = resume_point(strategy, cfg, rounds, arrays, history)
    if rounds > 0:
        arrays = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                                train_config=train_config, evaluate_fn=central_evaluate).arrays
    if removed:
        arrays, history["removal"] = strategy.remove(
            grid, removed, mode=str(cfg.get("removal-mode", "offline")),
            repair_rounds=int(cfg.get("repair-rounds", 0)), train_config=train_config,
            evaluate_fn=central_evaluate)  # fmt: skip
    if cfg.get("save-final"):
        final = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        write_atomically(Path(str(cfg["save-final"])),
                         lambda tmp: save_file(final, str(tmp)))
    if cfg.get("out"):
        out = Path(str(cfg["out"]))
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"history-{cfg['strategy']}-seed{int(cfg['seed'])}.json"
        path.write_text(json.dumps(history, indent=1) + "\n")
        log(20, "history written to %s", path)
        if removed:
            report = out / f"removal-{removed}.json"
            report.write_text(json.dumps(history["removal"], indent=1) + "\n")
            log(20, "removal report written to %s", report)
    return history


def resume_point(strategy: FedUGM, cfg: Mapping[str, Any], rounds: int, arrays: ArrayRecord,
                 history: dict[str, Any]) -> tuple[int, ArrayRecord]:
    """(rounds still to run, arrays to start from) for a FedUGM run with a ledger. A ledger
    that already holds rounds is continued only with ``resume=true`` (a run killed after
    round R resumes at R + 1 and ends after ``num-server-rounds`` in all)."""
    done = strategy.ledger.rounds()
    if not done:
        return rounds, arrays
    if not cfg.get("resume", False):
        raise ValueError(
            f"the ledger {strategy.ledger.directory} already holds rounds up to {done[-1]}; "
            "pass resume=true to continue that run, or give an empty ledger directory."
        )
    completed, arrays = strategy.resume_from_ledger()
    history["resumed_from_round"] = completed
    log(20, "resuming from round %d of %d (ledger %s)", completed, rounds,
        strategy.ledger.directory)
    return max(rounds - completed, 0), arrays


def _record_replies(strategy: Strategy, history: dict[str, Any]) -> None:
    """Log, per round, which nodes replied and with which records (for tests and audits)."""
    aggregate_train = strategy.aggregate_train

    def recording(server_round: int, replies):
        replies = list(replies)
        history["replies"].append({
            "round": server_round,
            "nodes": sorted(r.metadata.src_node_id for r in replies if not r.has_error()),
            "errors": sum(r.has_error() for r in replies),
            "records": sorted({k for r in replies if not r.has_error() for k in r.content}),
        })  # fmt: skip
        return aggregate_train(server_round, replies)

    strategy.aggregate_train = recording


def run_client_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    torch.set_num_threads(1)
    partition_id = int(context.node_config["partition-id"])
    if partition_id in excluded_clients(cfg):
        raise ValueError(f"partition {partition_id} is excluded from this run (exclude-clients).")
    x, y = client_data(cfg, context)
    train = msg.content.config_records["config"]
    server_round = int(train.get("server-round", 0))
    reply = handle_train(
        msg, fresh_model(cfg, x), x, y,
        epochs=int(train.get("local-epochs", cfg["local-epochs"])),
        batch_size=int(train.get("batch-size", cfg["batch-size"])),
        lr=float(train.get("lr", cfg["lr"])),
        optimizer=str(train.get("optimizer", cfg["optimizer"])),
        seed=int(cfg["seed"]) * 100_003 + 1_009 * server_round + partition_id,
        client_id=client_id_of(context),
    )  # fmt: skip
    if partition_id == int(cfg.get("attack-client", -1)):
        attack(reply, msg, str(cfg.get("attack", "inflate")), float(cfg.get("attack-scale", 1e6)))
    return reply


ATTACKS = ("inflate", "flip-inflate", "flip")


def attack(reply: Message, request: Message, kind: str, scale: float) -> None:
    """Make ``reply`` hostile, in place (for the attack benchmark): ``inflate`` multiplies
    the reported Fisher by ``scale``; ``flip-inflate`` also sends −Δ (to FedAvg: θ − Δ);
    ``flip`` sends −Δ with the honest Fisher. A plain FedAvg reply has no Fisher, so
    ``inflate`` leaves it honest."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {ATTACKS}.")
    records = reply.content.array_records
    if "fisher" in records and kind != "flip":
        fisher = records["fisher"].to_torch_state_dict()
        reply.content["fisher"] = ArrayRecord({k: v * scale for k, v in fisher.items()})
    if kind == "inflate":
        return
    if "delta" in records:
        delta = records["delta"].to_torch_state_dict()
        reply.content["delta"] = ArrayRecord({k: -v for k, v in delta.items()})
    else:
        sent = request.content.array_records["arrays"].to_torch_state_dict()
        trained = records["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({
            k: 2 * sent[k] - v if v.is_floating_point() else v for k, v in trained.items()})


def client_data(cfg: Mapping[str, Any], context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """This SuperNode's (inputs, labels): the safetensors file ``node_config["data-path"]``
    (tensors ``inputs``, float32 [n, features], and ``labels``, int64 [n]; see
    ``simulations.export_partitions``) if set, else partition ``partition-id`` of the run's
    packaged dataset."""
    path = context.node_config.get("data-path")
    if not path:
        return client_partition(cfg, int(context.node_config["partition-id"]))
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"node_config data-path {path!r} is not a file on this "
                                "SuperNode's host.")
    tensors = load_file(str(path))
    if set(tensors) != {"inputs", "labels"} or len(tensors["inputs"]) != len(tensors["labels"]):
        raise ValueError(f"{path} must hold exactly 'inputs' [n, features] and 'labels' [n] "
                         f"(found {sorted(tensors)}).")
    return tensors["inputs"].float(), tensors["labels"].long()


def client_id_of(context: Context) -> str:
    """This SuperNode's stable client id: ``node_config["client-id"]``, else its partition."""
    return str(context.node_config.get("client-id", context.node_config["partition-id"]))


def run_client_evaluate(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    torch.set_num_threads(1)
    x, y = client_data(cfg, context)
    return handle_evaluate(msg, fresh_model(cfg, x), x, y)


def make_apps(overrides: Mapping[str, Any] | None = None) -> tuple[ServerApp, ClientApp]:
    """Fresh ServerApp and ClientApp; ``overrides`` take precedence over the run config."""
    fixed = dict(overrides or {})
    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**context.run_config, **fixed})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return run_client_train(msg, context, {**context.run_config, **fixed})

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return run_client_evaluate(msg, context, {**context.run_config, **fixed})

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, client_id_of(context))

    return server_app, client_app


_apps = make_apps()
# `flwr run` finds the components by static analysis: it needs plain `name = ...` assignments.
server_app = _apps[0]
client_app = _apps[1]
