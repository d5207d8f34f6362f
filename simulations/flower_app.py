"""The fl_ugm Flower app: one ServerApp (strategy chosen by the run config), one ClientApp.

This is the app users deploy (``flwr run .`` against a SuperLink, docs/deployment.md) and
the one every simulation runs (``simulations.runner.simulate``, on Ray). It holds no
adversaries: the simulations plug theirs in through :class:`ClientRole`
(``simulations.adversaries``).

Run config keys (defaults and one-line docs in ``pyproject.toml`` ``[tool.flwr.app.config]``):
``strategy`` (Flower's fedavg | fedprox | fedavgm | fedadam | multikrum | fedtrimmedavg, or
fedugm | fedugm-defaults [``FedUGM()``: no FedUGM key below applies] | task-arithmetic
[α_t = 1] | fisher-averaging | mifa [FedAvg's average + the client memory]),
``krum-malicious`` (MultiKrum's f: it averages the sampled nodes less f) / ``trimmed-beta``
(FedTrimmedAvg's cut per side),
``server-lr`` / ``server-momentum`` (FedAvgM's server learning rate and momentum),
``fedadam-eta`` / ``fedadam-tau`` (FedAdam's server learning
rate and adaptivity), ``ugm-server-lr`` / ``ugm-server-momentum`` (FedUGM's server
momentum on the merged update, ``fl_ugm.server_optimizer``; 1 and 0: none;
``ugm-server-optimizer=adam``: FedAdam's update instead, β₁ = ugm-server-momentum), ``ugm-carry``
(FedUGM's carried precision γ, 0: off), ``ugm-client-memory`` (merge every client's
latest reply, re-centred; true, false or "auto": FedUGM's rule), ``ugm-dual-step`` (ρ of
FedUGM's client dual variables, ``fl_ugm.client_duals``, 0: off),
``num-server-rounds``, ``num-clients``, ``fraction-train``, ``local-epochs``, ``batch-size``,
``lr``, ``optimizer``, ``prior-delta`` (FedUGM's δ), ``proximal-mu`` (FedProx's μ),
``fisher``, ``alpha``, ``scale``, ``fisher-clip``, ``update-screen`` / ``screen-norm-bound``
/ ``screen-min-cosine`` (FedUGM's update screen, ``fl_ugm.robust.UpdateScreen``; 0 and -1
turn its two parts off), the data (``task``, ``model``,
``partition``, ``dirichlet-alpha``, ``classes-per-client``, ``seed``, ``test-examples``,
``server-examples`` and ``pretrain-epochs``: > 0 pretrains the initial model on the server's
own split, the one-shot setting), ``out`` (a directory for the run's history JSON, see
:func:`history_path`), ``ledger`` (FedUGM's ledger directory), ``exclude-clients`` (client
ids FedUGM never samples, e.g. "0,3"), ``init-from`` / ``save-final`` (safetensors files of
the initial and final global), ``remove-client`` / ``removal-method`` / ``removal-mode`` /
``repair-rounds`` (after training, ``FedUGM.remove``; with ``num-server-rounds=0`` a
removal-only run on an existing ledger) and the replay's ``removal-budget`` /
``removal-policy`` / ``removal-calibrate`` (its corrections, with ``removal-mode=online``)
and ``removal-recentring`` / ``removal-shared-rank`` (κ and the rank; -1: the defaults),
``local-seed`` (the clients' local-training seed; -1: ``seed``), ``history-rounds`` /
``history-dtype`` (the ledger's per-round history for replay removal: rounds kept, 0 = all,
and storage dtype), ``keep-globals`` (the ledger's global checkpoints kept),
``resume`` (continue the run recorded in ``ledger``: ``FedUGM(resume=True)``),
``wire-dtype`` (FedUGM's reply dtype for Δ and F: float16, with a scale per tensor, or
float32), ``evaluate-on`` (test | validation: the ``server-examples`` split, to choose
settings without the test set).

Clients identify themselves by ``node_config["client-id"]`` if set, else their
``partition-id``. Every client gets partition ``partition-id`` of the same seeded split, so
all strategies see identical data, unless its ``node_config["data-path"]`` names its own
data file (a deployment).
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedTrimmedAvg,
    MultiKrum,
    Strategy,
)
from safetensors.torch import load_file, save_file

from fl_ugm.client import (
    client_id,
    handle_evaluate,
    handle_query,
    handle_train,
    train_classifier,
)
from fl_ugm.ledger import Ledger, write_atomically
from fl_ugm.protocol import REMOVAL_KEY
from fl_ugm.robust import UpdateScreen
from fl_ugm.roster import ClientRoster
from fl_ugm.strategy import FedUGM
from simulations import tasks

#: Flower's own strategies (FedUGM's options do not apply to them)
FLOWER_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "multikrum", "fedtrimmedavg")
#: FedUGM and the merge baselines it runs itself; ``mifa`` is MIFA (Gu et al., 2021): FedAvg's
#: n-weighted average plus the client memory (``FedUGM(merge="task-arithmetic",
#: client_memory=True)``), to tell the memory's share of a win from the Fisher's.
#: ``fedugm-defaults`` is ``FedUGM()`` as a user writes it: its own defaults, whatever the run
#: config sets for FedUGM (the benchmarks' untuned column).
UGM_STRATEGIES = ("fedugm", "fedugm-defaults", "task-arithmetic", "fisher-averaging", "mifa")
STRATEGIES = (*FLOWER_STRATEGIES, *UGM_STRATEGIES)
#: How long the ServerApp waits for ``num-clients`` SuperNodes before it gives up (seconds).
NODE_WAIT_SECONDS = 60.0


# --------------------------------------------------------------------------- data and model


@functools.lru_cache(maxsize=4)
def experiment_data(
    task: str, seed: int, test: float, server: float, num_clients: int, scheme: str,
    dirichlet_alpha: float, classes_per_client: int,
) -> tuple[torch.Tensor, torch.Tensor, tasks.Split, list[np.ndarray]]:
    """(inputs, labels, split, client partitions as indices into the client pool); cached
    per process so a Ray worker loads and partitions the data once."""
    inputs, labels = tasks.load_task(task)
    split = tasks.split_indices(len(labels), test=test, server=server, seed=seed,
                                official_test=tasks.OFFICIAL_TEST_EXAMPLES.get(task, 0))
    groups = tasks.task_groups(task) if scheme == "topic" else None
    parts = tasks.partition(labels[split.clients], num_clients, scheme, seed,
                            alpha=dirichlet_alpha, classes_per_client=classes_per_client,
                            groups=None if groups is None else groups[split.clients])
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
    task = str(cfg["task"])
    return tasks.build_model(str(cfg["model"]), inputs.shape[1], tasks.NUM_CLASSES[task])


def client_partition(cfg: Mapping[str, Any], partition_id: int) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Partition ``partition_id``'s (inputs, labels) of the run's seeded split."""
    inputs, labels, split, parts = experiment_for(cfg)
    if not 0 <= partition_id < len(parts):
        raise ValueError(
            f"partition-id {partition_id} is outside the run config's num-clients="
            f"{len(parts)}; give every SuperNode a partition-id below num-clients."
        )
    index = torch.as_tensor(split.clients[parts[partition_id]], dtype=torch.long)
    return inputs[index], labels[index]


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


def history_path(out: str | Path, strategy: str, seed: int) -> Path:
    """Where a run with ``out=...`` writes its history JSON."""
    return Path(out) / f"history-{strategy}-seed{int(seed)}.json"


# --------------------------------------------------------------------------- server


def excluded_clients(cfg: Mapping[str, Any]) -> list[str]:
    """Client ids listed in ``exclude-clients`` ("0,3")."""
    return [part.strip() for part in str(cfg.get("exclude-clients", "")).split(",")
            if part.strip()]


def build_strategy(cfg: Mapping[str, Any], num_clients: int) -> Strategy:
    """Flower's own FedAvg/FedProx/FedAvgM/FedAdam/MultiKrum/FedTrimmedAvg, or FedUGM (with
    its UGM or a baseline merge rule)."""
    fraction = float(cfg.get("fraction-train", 1.0))
    common = {
        "fraction_train": fraction,
        "fraction_evaluate": 0.0,  # we report centralized test accuracy
        "min_train_nodes": num_clients if fraction >= 1 else 2,
        "min_available_nodes": num_clients,
    }
    name = str(cfg["strategy"])
    excluded = excluded_clients(cfg)
    if excluded and name in FLOWER_STRATEGIES:
        raise ValueError(f"exclude-clients needs a FedUGM strategy {UGM_STRATEGIES}; "
                         f"Flower's {name} samples every node.")
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=float(cfg["proximal-mu"]), **common)
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=float(cfg["server-lr"]),
                       server_momentum=float(cfg["server-momentum"]), **common)
    if name == "fedadam":
        return FedAdam(eta=float(cfg["fedadam-eta"]), tau=float(cfg["fedadam-tau"]), **common)
    if name == "multikrum":  # averages the sampled nodes less f, as Blanchard et al. do
        malicious = int(cfg["krum-malicious"])
        sampled = max(int(num_clients * fraction), common["min_train_nodes"])
        return MultiKrum(num_malicious_nodes=malicious,
                         num_nodes_to_select=max(sampled - malicious, 1), **common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=float(cfg["trimmed-beta"]), **common)
    if name in UGM_STRATEGIES:
        ledger = None
        if cfg.get("ledger"):
            ledger = Ledger(str(cfg["ledger"]), history_rounds=int(cfg["history-rounds"]),
                            history_dtype=str(cfg["history-dtype"]),
                            keep_globals=int(cfg.get("keep-globals", 3)))
        run = {"ledger": ledger, "excluded_clients": excluded,
               "resume": bool(cfg.get("resume", False)), **common}
        if name == "fedugm-defaults":
            return FedUGM(**run)
        # task arithmetic as in the paper: α_t = 1 for every client
        alpha = "ones" if name == "task-arithmetic" else str(cfg["alpha"])
        memory = cfg.get("ugm-client-memory", "auto")  # "auto": FedUGM's rule
        if name == "mifa" or memory != "auto":
            run["client_memory"] = name == "mifa" or bool(memory)
        return FedUGM(
            prior_precision=float(cfg["prior-delta"]), alpha=alpha,
            scale=float(cfg["scale"]), fisher=str(cfg["fisher"]),
            merge={"fedugm": "ugm", "mifa": "task-arithmetic"}.get(name, name),
            fisher_clip=float(cfg.get("fisher-clip", 3.0)) or None,
            update_screen=update_screen(cfg),
            wire_dtype=str(cfg.get("wire-dtype", "float16")),
            server_lr=float(cfg.get("ugm-server-lr", 1.0)),
            server_momentum=float(cfg.get("ugm-server-momentum", 0.5)),
            carried_precision=float(cfg.get("ugm-carry", 0.0)),
            client_dual_step=float(cfg.get("ugm-dual-step", 0.0)),
            server_optimizer=str(cfg.get("ugm-server-optimizer", "momentum")), **run,
        )  # fmt: skip
    raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}.")


def update_screen(cfg: Mapping[str, Any]) -> UpdateScreen | None:
    """FedUGM's update screen from ``update-screen``, ``screen-norm-bound`` (0: no norm bound)
    and ``screen-min-cosine`` (-1: no cosine screen)."""
    if not cfg.get("update-screen", True):
        return None
    bound = float(cfg.get("screen-norm-bound", 3.0))
    cosine = float(cfg.get("screen-min-cosine", -1.0))
    return UpdateScreen(norm_bound=bound or None, min_cosine=None if cosine == -1 else cosine)


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float = NODE_WAIT_SECONDS) -> None:
    """Wait until ``expected`` SuperNodes are connected; say at once what is missing and
    how to fix it, and fail clearly after ``timeout_s`` instead of waiting forever."""
    started = time.monotonic()
    warned = False
    while (connected := len(list(grid.get_node_ids()))) < expected:
        fix = (f"Start {expected} SuperNodes, or for the local simulation run `flwr run . "
               f"--federation-config 'num-supernodes={expected}'`, or set --run-config "
               f"'num-clients={connected}'.")
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise RuntimeError(f"only {connected} SuperNode(s) connected after {timeout_s:.0f} "
                               f"s but the run config has num-clients={expected}. {fix}")
        if waited > 3 and not warned:
            log(WARNING, "%d of the run config's num-clients=%d SuperNodes are connected; "
                "waiting up to %.0f s. %s", connected, expected, timeout_s, fix)
            warned = True
        time.sleep(0.5)


def reply_bytes(reply: Message) -> int:
    """Bytes of the tensors a reply carries (every ArrayRecord's serialized array data)."""
    return sum(len(array.data) for record in reply.content.array_records.values()
               for array in record.values())


def evaluation_set(cfg: Mapping[str, Any], inputs: torch.Tensor, labels: torch.Tensor,
                   split: tasks.Split) -> tuple[torch.Tensor, torch.Tensor]:
    """What the server scores each round: the test split, or with ``evaluate-on=validation``
    the server's split (``server-examples``, held out from the clients and the test set;
    for choosing settings, so ``pretrain-epochs`` must be 0)."""
    where = str(cfg.get("evaluate-on", "test"))
    if where == "test":
        return inputs[split.test], labels[split.test]
    if where != "validation":
        raise ValueError(f"evaluate-on={where!r}; choose test or validation.")
    if len(split.server) == 0 or int(cfg["pretrain-epochs"]) > 0:
        raise ValueError("evaluate-on=validation scores the server split: set server-examples "
                         "> 0 and pretrain-epochs=0 (a split the server trains on is no "
                         "validation set).")
    return inputs[split.server], labels[split.server]


class RecordingGrid(Grid):
    """A Grid that logs, for every train request it carries, which nodes replied, with which
    records and how many tensor bytes (the history's ``replies``; online-removal requests go
    to ``removal_requests``). Works under any strategy, Flower's own included.

    With ``client_of`` (node id → client id) it also lists the nodes, and returns the
    replies, in client-id order instead of the random node ids' and the arrival order, so
    that a seeded ``random`` samples the same clients in every run of a seed, whatever the
    strategy, and every strategy averages in the same order (a run is reproducible)."""

    def __init__(self, grid: Grid, history: dict[str, Any],
                 client_of: Mapping[int, str] | None = None) -> None:
        self._grid, self._history = grid, history
        self._client_of = dict(client_of or {})

    def _order(self, node_id: int) -> tuple:
        """Sort key: known clients by their id (numerically where it is a number), then
        unknown nodes by node id."""
        client = self._client_of.get(node_id)
        if client is None:
            return (2, node_id, "")
        return (0, int(client), "") if client.isdigit() else (1, 0, client)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = sorted(self._grid.send_and_receive(messages, timeout=timeout),
                         key=lambda reply: self._order(reply.metadata.src_node_id))
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            config = next(iter(messages[0].content.config_records.values()), {})
            kind = "removal_requests" if config.get(REMOVAL_KEY) else "replies"
            self._history.setdefault(kind, []).append({
                "round": int(config.get("server-round", 0)),
                "nodes": sorted(r.metadata.src_node_id for r in replies if not r.has_error()),
                "clients": [self._client_of.get(r.metadata.src_node_id) for r in replies
                            if not r.has_error()],
                "errors": sum(r.has_error() for r in replies),
                "records": sorted({k for r in replies if not r.has_error() for k in r.content}),
                "bytes": sum(reply_bytes(r) for r in replies if not r.has_error()),
            })  # fmt: skip
        return replies

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._grid.get_node_ids(), key=self._order)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)


def run_server(grid: Grid, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp's work: initial model, strategy.start, centralized test evaluation,
    an optional removal, and the history (written to ``out``)."""
    torch.set_num_threads(1)
    wait_for_nodes(grid, int(cfg["num-clients"]))
    inputs, labels, split, _ = experiment_for(cfg)
    x_test, y_test = evaluation_set(cfg, inputs, labels, split)
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
    # Flower samples with the module's ``random``: seeded, over nodes listed in client
    # order, every run of a seed trains the same clients in the same rounds
    roster = ClientRoster()
    roster.discover(grid)
    grid = RecordingGrid(grid, history, {node: c for c, node in roster.node_of.items()})
    random.seed(int(cfg["seed"]))
    start = time.perf_counter()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        # the clients are idle while the server scores the round: use every core
        with tasks.torch_threads(tasks.usable_cores()):
            result = tasks.evaluate(model, x_test, y_test)
        history["accuracy"].append(result.accuracy)
        history["loss"].append(result.loss)
        history["seconds"].append(time.perf_counter() - start)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy = build_strategy(cfg, int(cfg["num-clients"]))
    removed = str(cfg.get("remove-client", "")).strip()
    if removed and not (isinstance(strategy, FedUGM) and strategy.ledger is not None):
        raise ValueError("remove-client needs strategy=fedugm and a ledger directory (ledger=).")
    train_config = ConfigRecord({
        "local-epochs": int(cfg["local-epochs"]), "lr": float(cfg["lr"]),
        "batch-size": int(cfg["batch-size"]), "optimizer": str(cfg["optimizer"]),
    })  # fmt: skip
    arrays = ArrayRecord(model.state_dict())
    rounds = int(cfg["num-server-rounds"])
    if rounds > 0:  # with resume=true, FedUGM continues the ledger's run to `rounds`
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                                train_config=train_config, evaluate_fn=central_evaluate)
        arrays = result.arrays if len(result.arrays) else arrays
        if getattr(strategy, "round_offset", 0):
            history["resumed_from_round"] = strategy.round_offset
        history["train_metrics"] = {str(r): dict(m) for r, m in
                                    result.train_metrics_clientapp.items()}
    if removed:
        replay_options = {"correction_budget": int(cfg.get("removal-budget", 0)),
                          "correction_policy": str(cfg.get("removal-policy", "final")),
                          "calibrate": bool(cfg.get("removal-calibrate", False))}
        if float(cfg.get("removal-recentring", -1)) >= 0:  # -1: the library's default
            replay_options["recentring"] = float(cfg["removal-recentring"])
        if int(cfg.get("removal-shared-rank", -1)) >= 0:
            replay_options["shared_rank"] = int(cfg["removal-shared-rank"])
        arrays, history["removal"] = strategy.remove(
            grid, removed, method=str(cfg["removal-method"]),
            mode=str(cfg.get("removal-mode", "offline")),
            repair_rounds=int(cfg.get("repair-rounds", 0)), train_config=train_config,
            evaluate_fn=central_evaluate,
            **(replay_options if cfg["removal-method"] == "replay" else {}))  # fmt: skip
    if cfg.get("save-final"):
        final = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        write_atomically(Path(str(cfg["save-final"])), lambda tmp: save_file(final, str(tmp)))
    if cfg.get("out"):
        path = history_path(str(cfg["out"]), str(cfg["strategy"]), int(cfg["seed"]))
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(history, indent=1) + "\n"))
        log(INFO, "history written to %s", path)
        if removed:
            report = path.parent / f"removal-{removed}.json"
            report.write_text(json.dumps(history["removal"], indent=1) + "\n")
            log(INFO, "removal report written to %s", report)
    return history


# --------------------------------------------------------------------------- client


class ClientRole:
    """How this app's clients get their data and what they do to their replies: honestly.
    ``simulations.adversaries.Adversary`` overrides both for the attack experiments."""

    def data(self, cfg: Mapping[str, Any], context: Context) -> tuple[torch.Tensor,
                                                                     torch.Tensor]:
        return client_data(cfg, context)

    def tamper(self, cfg: Mapping[str, Any], context: Context, request: Message,
               reply: Message) -> None:
        """Modify ``reply`` in place before it is sent (the honest client does nothing)."""


def local_seed(cfg: Mapping[str, Any]) -> int:
    """The seed of the clients' local training: ``local-seed``, or ``seed`` where it is -1
    (another local seed retrains the same federation, split and initial model with other
    SGD shuffles: a draw from retraining's distribution)."""
    value = int(cfg.get("local-seed", -1))
    return int(cfg["seed"]) if value < 0 else value


def run_client_train(msg: Message, context: Context, cfg: Mapping[str, Any],
                     role: ClientRole) -> Message:
    torch.set_num_threads(1)
    partition_id = int(context.node_config["partition-id"])
    x, y = role.data(cfg, context)
    train = msg.content.config_records["config"]
    server_round = int(train.get("server-round", 0))
    reply = handle_train(
        msg, fresh_model(cfg, x), x, y,
        epochs=float(train.get("local-epochs", cfg["local-epochs"])),
        batch_size=int(train.get("batch-size", cfg["batch-size"])),
        lr=float(train.get("lr", cfg["lr"])),
        optimizer=str(train.get("optimizer", cfg["optimizer"])),
        seed=local_seed(cfg) * 100_003 + 1_009 * server_round + partition_id,
        client_id=client_id(context), state=context.state,
    )  # fmt: skip
    role.tamper(cfg, context, msg, reply)
    return reply


def run_client_evaluate(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    torch.set_num_threads(1)
    x, y = client_data(cfg, context)
    return handle_evaluate(msg, fresh_model(cfg, x), x, y)


def make_apps(overrides: Mapping[str, Any] | None = None,
              role: ClientRole | None = None) -> tuple[ServerApp, ClientApp]:
    """Fresh ServerApp and ClientApp; ``overrides`` take precedence over the run config and
    ``role`` (default: honest) decides the clients' data and replies."""
    fixed = dict(overrides or {})
    role = role or ClientRole()
    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**context.run_config, **fixed})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return run_client_train(msg, context, {**context.run_config, **fixed}, role)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return run_client_evaluate(msg, context, {**context.run_config, **fixed})

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, client_id(context))

    return server_app, client_app


_apps = make_apps()
# `flwr run` finds the components by static analysis: it needs plain `name = ...` assignments.
server_app = _apps[0]
client_app = _apps[1]
