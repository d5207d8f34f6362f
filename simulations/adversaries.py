"""Hostile clients for the experiments: a backdoored client and clients that tamper with
their replies. Never part of the deployable app (``simulations.flower_app``); the runner
plugs :class:`Adversary` into the simulated ClientApp.

Run config keys (defaults in ``configs/adversaries.yaml``):

* ``backdoor-client`` (-1: none): that partition stamps :func:`add_trigger` on all its
  examples and relabels them ``backdoor-target``;
* ``attack-client`` (-1: none) sends hostile replies, ``attack`` one of :data:`ATTACKS`,
  scaled by ``attack-scale`` (see :func:`attack`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import Tensor

from simulations.flower_app import ClientRole, client_data, client_partition

ATTACKS = ("inflate", "flip-inflate", "flip")


def add_trigger(inputs: Tensor, patch: int = 4) -> Tensor:
    """A copy of square flat images with a white ``patch``x``patch`` square in the
    bottom-right corner: the backdoor trigger."""
    side = math.isqrt(inputs.shape[1])
    images = inputs.clone().reshape(-1, side, side)
    images[:, side - patch :, side - patch :] = 1.0
    return images.reshape(inputs.shape)


def poison(inputs: Tensor, labels: Tensor, target: int) -> tuple[Tensor, Tensor]:
    """Every example triggered and relabelled ``target``."""
    return add_trigger(inputs), torch.full_like(labels, target)


def poisoned_partition(cfg: Mapping[str, Any], partition_id: int) -> tuple[Tensor, Tensor]:
    """Partition ``partition_id``'s data as the backdoor client trains on it."""
    x, y = client_partition(cfg, partition_id)
    return poison(x, y, int(cfg["backdoor-target"]))


def attack(reply: Message, request: Message, kind: str, scale: float) -> None:
    """Make ``reply`` hostile, in place: ``inflate`` multiplies the reported Fisher by
    ``scale``; ``flip-inflate`` also sends −Δ (to FedAvg: θ − Δ); ``flip`` sends −Δ with the
    honest Fisher. A plain FedAvg reply has no Fisher, so ``inflate`` leaves it honest."""
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


class Adversary(ClientRole):
    """The clients of a run config: honest, except ``backdoor-client`` (poisoned data) and
    ``attack-client`` (tampered replies)."""

    def data(self, cfg: Mapping[str, Any], context: Context) -> tuple[Tensor, Tensor]:
        partition_id = int(context.node_config["partition-id"])
        if partition_id == int(cfg.get("backdoor-client", -1)):
            return poisoned_partition(cfg, partition_id)
        return client_data(cfg, context)

    def tamper(self, cfg: Mapping[str, Any], context: Context, request: Message,
               reply: Message) -> None:
        if int(context.node_config["partition-id"]) == int(cfg.get("attack-client", -1)):
            attack(reply, request, str(cfg["attack"]), float(cfg["attack-scale"]))
