"""Hostile clients for the experiments: a backdoored client and clients that tamper with
their replies. Never part of the deployable app (``simulations.flower_app``); the runner
plugs :class:`Adversary` into the simulated ClientApp.

Run config keys (defaults in ``configs/adversaries.yaml``):

* ``backdoor-client`` (-1: none): that partition stamps the ``backdoor-trigger`` (one of
  :data:`TRIGGERS`, :func:`add_trigger`) on all its examples and relabels them
  ``backdoor-target``;
* ``flip-client`` (-1: none): that partition relabels its examples of class ``flip-source``
  as ``flip-target`` (-1: its most common class, and the next class; :func:`flip_classes`);
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

from simulations.flower_app import ClientRole, client_data

ATTACKS = ("inflate", "flip-inflate", "flip")
#: Backdoor triggers: a white 4×4 square in the bottom-right corner (pixels blank in every
#: digit, so no other client's data touches their weights), or a 6×6 checkerboard in the
#: centre (pixels most digits ink, in a pattern none has; a plain white square there was
#: learned far less: 33 % attack success against the checkerboard's 81 %, seeds 0–2).
TRIGGERS = ("corner", "checker")


def add_trigger(inputs: Tensor, trigger: str = "corner") -> Tensor:
    """A copy of square flat images with the ``trigger`` stamped on (one of TRIGGERS)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; choose one of {TRIGGERS}.")
    side = math.isqrt(inputs.shape[1])
    images = inputs.clone().reshape(-1, side, side)
    if trigger == "corner":
        patch, start, pattern = 4, side - 4, torch.ones(4, 4)
    else:
        patch, start = 6, (side - 6) // 2
        pattern = (torch.arange(patch)[:, None] + torch.arange(patch)[None, :]) % 2
    images[:, start : start + patch, start : start + patch] = pattern.to(images.dtype)
    return images.reshape(inputs.shape)


def flip_classes(cfg: Mapping[str, Any], labels: Tensor) -> tuple[int, int]:
    """(source, target) of the label flip: ``flip-source``/``flip-target``, where -1 means the
    flipping client's most common class (``labels`` are its own) and the class after it."""
    source = int(cfg.get("flip-source", -1))
    if source < 0:
        source = int(torch.bincount(labels, minlength=10).argmax())
    target = int(cfg.get("flip-target", -1))
    return source, (source + 1) % 10 if target < 0 else target


def poisoned(cfg: Mapping[str, Any], partition_id: int, inputs: Tensor,
             labels: Tensor) -> tuple[Tensor, Tensor]:
    """Partition ``partition_id``'s (inputs, labels) as it trains on them: triggered and
    relabelled if it is the ``backdoor-client``, label-flipped if it is the ``flip-client``."""
    if partition_id == int(cfg.get("backdoor-client", -1)):
        inputs = add_trigger(inputs, str(cfg.get("backdoor-trigger", "corner")))
        labels = torch.full_like(labels, int(cfg["backdoor-target"]))
    if partition_id == int(cfg.get("flip-client", -1)):
        source, target = flip_classes(cfg, labels)
        labels = torch.where(labels == source, target, labels)
    return inputs, labels


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
    """The clients of a run config: honest, except ``backdoor-client`` and ``flip-client``
    (poisoned data) and ``attack-client`` (tampered replies)."""

    def data(self, cfg: Mapping[str, Any], context: Context) -> tuple[Tensor, Tensor]:
        return poisoned(cfg, int(context.node_config["partition-id"]),
                        *client_data(cfg, context))

    def tamper(self, cfg: Mapping[str, Any], context: Context, request: Message,
               reply: Message) -> None:
        if int(context.node_config["partition-id"]) == int(cfg.get("attack-client", -1)):
            attack(reply, request, str(cfg["attack"]), float(cfg["attack-scale"]))
