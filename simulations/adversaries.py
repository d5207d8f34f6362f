"""Hostile clients for the experiments: a backdoored client and clients that tamper with
their replies. Never part of the deployable app (``simulations.flower_app``); the runner
plugs :class:`Adversary` into the simulated ClientApp.

Run config keys (defaults in ``configs/adversaries.yaml``):

* ``backdoor-client`` (-1: none; an int or a list of ints): those partitions stamp the
  ``backdoor-trigger`` (one of :data:`TRIGGERS`, :func:`add_trigger`) on all their examples
  and relabel them ``backdoor-target``;
* ``flip-client`` (-1: none): that partition relabels its examples of class ``flip-source``
  as ``flip-target`` (-1: its most common class, and the next class; :func:`flip_classes`);
* ``attack-client`` (-1: none; an int or a list of ints) send hostile replies, ``attack``
  one of :data:`ATTACKS`, scaled by ``attack-scale`` (see :func:`attack`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import Tensor

from fl_ugm.protocol import (
    DELTA_RECORD,
    METRICS_RECORD,
    SCALES_RECORD,
    build_ugm_reply,
    client_id_of,
    parse_ugm_reply,
)
from simulations.flower_app import ClientRole, client_data, run_client_train

#: inflate: Fisher × scale; flip-inflate: −Δ and Fisher × scale; flip: −Δ; scale: Δ × scale;
#: norm-match: Δ rescaled to the norm of the honest update the client would have sent (with
#: ``backdoor-client`` on the same partition: a backdoor that no norm bound sees).
ATTACKS = ("inflate", "flip-inflate", "flip", "scale", "norm-match")
#: Backdoor triggers: a white 4×4 square in the bottom-right corner (pixels blank in every
#: digit, so no other client's data touches their weights), or a 6×6 checkerboard in the
#: centre (pixels most digits ink, in a pattern none has; docs/unlearning.md says why not a
#: plain white square there), or a 5×5 plus sign near the top-left corner (added after the
#: replay's defaults were chosen: a trigger they were not tuned on).
TRIGGERS = ("corner", "checker", "plus")


def add_trigger(inputs: Tensor, trigger: str = "corner") -> Tensor:
    """A copy of square flat images with the ``trigger`` stamped on (one of TRIGGERS)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; choose one of {TRIGGERS}.")
    side = math.isqrt(inputs.shape[1])
    images = inputs.clone().reshape(-1, side, side)
    if trigger == "corner":
        patch, start, pattern = 4, side - 4, torch.ones(4, 4)
    elif trigger == "plus":
        patch, start, pattern = 5, 1, torch.zeros(5, 5)
        pattern[2, :] = pattern[:, 2] = 1
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


def partitions(cfg: Mapping[str, Any], key: str) -> set[int]:
    """The partitions a role key names: an int (-1: none) or a list of ints."""
    value = cfg.get(key, -1)
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return {int(v) for v in values if int(v) >= 0}


def backdoor_success(model: torch.nn.Module, inputs: Tensor, labels: Tensor, *, target: int,
                     trigger: str) -> float:
    """The backdoor's success rate: of the examples not of class ``target``, the fraction
    the model classifies as ``target`` once ``trigger`` is stamped on."""
    keep = labels != target
    model.eval()
    with torch.no_grad():
        predicted = model(add_trigger(inputs[keep], trigger)).argmax(1)
    return float((predicted == target).double().mean())


def poisoned(cfg: Mapping[str, Any], partition_id: int, inputs: Tensor,
             labels: Tensor) -> tuple[Tensor, Tensor]:
    """Partition ``partition_id``'s (inputs, labels) as it trains on them: triggered and
    relabelled if it is a ``backdoor-client``, label-flipped if it is the ``flip-client``."""
    if partition_id in partitions(cfg, "backdoor-client"):
        inputs = add_trigger(inputs, str(cfg.get("backdoor-trigger", "corner")))
        labels = torch.full_like(labels, int(cfg["backdoor-target"]))
    if partition_id == int(cfg.get("flip-client", -1)):
        source, target = flip_classes(cfg, labels)
        labels = torch.where(labels == source, target, labels)
    return inputs, labels


def update_of(reply: Message, request: Message) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(Δ, F) of a reply: a UGM reply decoded from its wire dtype as the server decodes it
    (``fl_ugm.protocol.parse_ugm_reply``), or for a plain FedAvg reply (θ_t, no Fisher)
    θ_t − θ of its float entries and no F."""
    sent = request.content.array_records["arrays"].to_torch_state_dict()
    content = reply.content
    if DELTA_RECORD not in content.array_records:
        trained = content.array_records["arrays"].to_torch_state_dict()
        return {k: v - sent[k] for k, v in trained.items() if v.is_floating_point()}, {}
    update = parse_ugm_reply(content, sent, node_id=reply.metadata.src_node_id).contribution
    return update.delta, update.fisher


def replace_update(reply: Message, request: Message, delta: Mapping[str, Tensor],
                   fisher: Mapping[str, Tensor]) -> None:
    """Put (Δ, F) into ``reply`` in place, encoded as it was (UGM: same wire dtype; FedAvg:
    θ + Δ)."""
    content = reply.content
    if DELTA_RECORD not in content.array_records:
        sent = request.content.array_records["arrays"].to_torch_state_dict()
        trained = content.array_records["arrays"].to_torch_state_dict()
        content["arrays"] = ArrayRecord({k: sent[k] + delta[k] if k in delta else v
                                         for k, v in trained.items()})
        return
    client = client_id_of(content)
    wire = "float16" if SCALES_RECORD in content.config_records else "float32"
    rebuilt = build_ugm_reply(delta, fisher, content.metric_records[METRICS_RECORD], client,
                              wire)
    for name in rebuilt:
        content[name] = rebuilt[name]


def attack(reply: Message, request: Message, kind: str, scale: float,
           honest: Message | None = None) -> None:
    """Make ``reply`` hostile, in place: ``inflate`` multiplies the reported Fisher by
    ``scale``; ``flip-inflate`` also sends −Δ (to FedAvg: θ − Δ); ``flip`` sends −Δ with the
    honest Fisher; ``scale`` sends Δ × ``scale``; ``norm-match`` rescales Δ to the norm of
    the ``honest`` reply's. A plain FedAvg reply has no Fisher, so ``inflate`` leaves it
    honest. Δ and F are decoded as the server decodes them and sent back in the reply's wire
    dtype (so a float16 reply cannot overflow)."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {ATTACKS}.")
    delta, fisher = update_of(reply, request)
    if kind in ("inflate", "flip-inflate"):
        fisher = {k: v * scale for k, v in fisher.items()}
    if kind in ("flip", "flip-inflate"):
        delta = {k: -v for k, v in delta.items()}
    if kind == "scale":
        delta = {k: v * scale for k, v in delta.items()}
    if kind == "norm-match":
        if honest is None:
            raise ValueError("attack='norm-match' needs the honest reply to match.")
        target = _norm(update_of(honest, request)[0])
        factor = target / max(_norm(delta), 1e-30)
        delta = {k: v * factor for k, v in delta.items()}
    replace_update(reply, request, delta, fisher)


def _norm(tensors: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in tensors.values()))


class Adversary(ClientRole):
    """The clients of a run config: honest, except ``backdoor-client`` and ``flip-client``
    (poisoned data) and ``attack-client`` (tampered replies)."""

    def data(self, cfg: Mapping[str, Any], context: Context) -> tuple[Tensor, Tensor]:
        return poisoned(cfg, int(context.node_config["partition-id"]),
                        *client_data(cfg, context))

    def tamper(self, cfg: Mapping[str, Any], context: Context, request: Message,
               reply: Message) -> None:
        if int(context.node_config["partition-id"]) not in partitions(cfg, "attack-client"):
            return
        kind = str(cfg["attack"])
        honest = (run_client_train(request, context, cfg, ClientRole())
                  if kind == "norm-match" else None)
        attack(reply, request, kind, float(cfg["attack-scale"]), honest)
