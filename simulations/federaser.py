"""FedEraser (Liu et al., IWQoS 2021), the published anchor for federated unlearning by stored
updates plus calibration training; a baseline of ``simulations.unlearn``, not part of the
library.

From the training run's ledger history (every client's stored update per round), FedEraser
rebuilds the global without client t over every ``interval``-th stored round, starting from
the history's first global θ'. In each of those rounds the remaining participants fine-tune
from θ' for ``calibration_epochs`` (a fraction of the training's local epochs) and reply as
to FedAvg; each calibrated update keeps the direction of that fresh update and the size of
the client's stored one, tensor by tensor, U = ‖U_stored‖ · U_new / ‖U_new‖, and θ' moves by
their num-examples-weighted average. With interval 2 and half the epochs it costs about a
quarter of retraining's client work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fl_ugm.ledger import Ledger, write_atomically
from fl_ugm.roster import ClientRoster
from simulations import tasks
from simulations.flower_app import (
    RecordingGrid,
    experiment_for,
    fresh_model,
    history_path,
    wait_for_nodes,
)


def calibrated(stored: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Per tensor, the fresh update's direction with the stored update's norm."""
    out = {}
    for key, new in fresh.items():
        norm = float(new.double().norm())
        out[key] = new * (float(stored[key].double().norm()) / norm) if norm > 0 else new
    return out


def run_federaser(grid: Grid, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp's work: FedEraser without ``remove-client``, from ``ledger``'s history;
    writes the final global (``save-final``) and a history with the client replies."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    wait_for_nodes(grid, int(cfg["num-clients"]))
    removed = str(cfg["remove-client"])
    ledger = Ledger(str(cfg["ledger"]), create=False)
    rounds = ledger.history()[::int(cfg["federaser-interval"])]
    history: dict[str, Any] = {"strategy": "federaser", "seed": int(cfg["seed"]),
                               "accuracy": [], "loss": [], "seconds": [], "replies": []}
    grid = RecordingGrid(grid, history)
    roster = ClientRoster(excluded=[removed])
    roster.discover(grid)
    client_of = {node: client for client, node in roster.node_of.items()}
    start = ledger.history_round(ledger.history()[0]).start.global_state
    theta = {k: v.clone() for k, v in start.items()}
    for round_ in rounds:
        stored = {p.client_id: p for p in ledger.history_round(round_).participants
                  if p.client_id not in (None, removed)}
        nodes = [roster.node_of[c] for c in stored if c in roster.node_of]
        config = ConfigRecord({"server-round": round_, "lr": float(cfg["lr"]),
                               "batch-size": int(cfg["batch-size"]),
                               "optimizer": str(cfg["optimizer"]),
                               "local-epochs": float(cfg["federaser-epochs"])})
        content = RecordDict({"arrays": ArrayRecord(theta), "config": config})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                    for node in nodes]
        updates, weights = [], []
        for reply in grid.send_and_receive(messages, timeout=3600):
            if reply.has_error():
                continue
            client = stored[client_of[reply.metadata.src_node_id]]
            trained = reply.content.array_records["arrays"].to_torch_state_dict()
            fresh = {k: trained[k] - theta[k] for k in client.delta}
            updates.append(calibrated(client.delta, fresh))
            weights.append(client.num_examples)
        total = sum(weights)
        for key in (updates[0] if updates else {}):
            theta[key] = theta[key] + sum(w / total * u[key] for w, u in zip(weights, updates,
                                                                            strict=True))
        log(INFO, "FedEraser: round %d calibrated with %d clients", round_, len(updates))
    inputs, labels, split, _ = experiment_for(cfg)
    model = fresh_model(cfg, inputs)
    model.load_state_dict(theta)
    result = tasks.evaluate(model, inputs[split.test], labels[split.test])
    history.update(accuracy=[result.accuracy], loss=[result.loss],
                   seconds=[time.perf_counter() - started])
    final = {k: v.contiguous() for k, v in theta.items()}
    write_atomically(Path(str(cfg["save-final"])), lambda tmp: save_file(final, str(tmp)))
    path = history_path(str(cfg["out"]), "federaser", int(cfg["seed"]))
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(history, indent=1)))
    return history


def federaser_server_app(overrides: Mapping[str, Any]) -> ServerApp:
    """A ServerApp that runs FedEraser with ``overrides`` over the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federaser(grid, {**context.run_config, **overrides})

    return app
