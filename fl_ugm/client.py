"""What a Flower ClientApp calls: fine-tune from the global model and build the reply.

One ClientApp serves every strategy. When the server's train config asks for a UGM reply
(FedUGM does), :func:`handle_train` answers with ``fl_ugm.protocol``'s UGM reply: Δ for every
float entry of the state dict, the Fisher of the parameters (float32, a SUM over the n_t
examples), ``num-examples`` and the client's stable id. Float buffers (e.g. BatchNorm running
statistics) appear in the delta but not in the Fisher; the server averages them by
num-examples. Any other strategy (Flower's FedAvg, FedProx, FedAdam…) gets the standard
``{"arrays": ArrayRecord(θ_t), "metrics": ...}`` reply.

The proximal prior: FedUGM sends its δ as ``"ugm-prior"``; FedProx sends ``"proximal-mu"``
(μ/2·‖w − θ‖² on a MEAN loss, i.e. precision μ·n_t on the summed loss). Both become the
term (precision / 2n)·‖w − θ‖² added to the mean loss, the H0 = δ of the derivation.

A complete ClientApp (the README has it too)::

    app = ClientApp()

    @app.train()
    def train(msg, context):
        x, y = load_my_data(context)
        return handle_train(msg, build_model(), x, y, epochs=1, batch_size=32, lr=0.05,
                            seed=0, client_id=str(context.node_config["client-id"]))

    @app.query()      # lets the server find this client's node (removal, excluded clients)
    def query(msg, context):
        return handle_query(msg, str(context.node_config["client-id"]))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from fl_ugm.fisher import TrainingFisher, diagonal_fisher, iterate_batches
from fl_ugm.protocol import (
    FISHER_ESTIMATORS,
    FISHER_KEY,
    NUM_EXAMPLES_KEY,
    build_ugm_reply,
    proximal_precision,
    query_reply_content,
    ugm_requested,
)

OPTIMIZERS = ("sgd", "adam")


def train_classifier(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str = "sgd",
    prox_precision: float = 0.0,
    anchor: Mapping[str, Tensor] | None = None,
    training_fisher: TrainingFisher | None = None,
) -> float:
    """Fine-tune in place on mean cross-entropy + (prox_precision / 2n)·‖w − anchor‖².

    ``n`` = ``len(inputs)``, so ``prox_precision`` is the prior precision on the summed loss
    (FedProx's μ = prox_precision / n). ``anchor`` defaults to the weights on entry. A
    fractional ``epochs`` (e.g. 0.5) ends with that fraction of an epoch's mini-batches. If a
    :class:`TrainingFisher` is given it sees each batch's cross-entropy gradient (before the
    proximal gradient is added). Returns the last epoch's mean cross-entropy (nats).
    """
    if not epochs > 0:
        raise ValueError(f"train_classifier: epochs={epochs}; it must be > 0.")
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("train_classifier: no training examples.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
    params = dict(model.named_parameters())
    centre = {k: (anchor[k] if anchor is not None else p).detach().clone()
              for k, p in params.items()}
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls(params.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    prox_scale = prox_precision / n
    model.train()
    last_epoch_loss = float("nan")
    full, fraction = divmod(float(epochs), 1.0)
    passes = [1.0] * int(full) + ([fraction] if fraction > 0 else [])
    for share in passes:
        total, seen = 0.0, 0
        batches = torch.randperm(n, generator=generator).split(batch_size)
        for batch in batches[:max(1, round(share * len(batches)))]:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            total += loss.item() * len(batch)
            seen += len(batch)
            if training_fisher is not None:
                training_fisher.update(len(batch))
            if prox_scale > 0:  # gradient of (prox_scale / 2)·‖w − centre‖²
                with torch.no_grad():
                    for key, p in params.items():
                        if p.grad is not None:
                            p.grad.add_(p - centre[key], alpha=prox_scale)
            opt.step()
        last_epoch_loss = total / seen
    return last_epoch_loss


def handle_train(
    msg: Message,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str = "sgd",
    fisher_batch_size: int = 256,
    client_id: str | None = None,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
) -> Message:
    """Answer a train message: load the global, fine-tune, reply (UGM or standard).

    ``client_id`` is this client's stable id (partition id in simulation, a configured id
    in a deployment); UGM replies carry it so the server can record and later remove this
    client's contribution (without it, FedUGM merges the reply but cannot remove it later).
    ``arrayrecord_key`` / ``configrecord_key`` are the strategy's record names (Flower's
    defaults). Raises ``ValueError`` for a malformed request or empty local data; inside a
    ClientApp, Flower turns the exception into an error reply, which the strategy logs and
    skips.
    """
    config = msg.content.config_records.get(configrecord_key, ConfigRecord())
    global_state = _load_global(msg, model, arrayrecord_key)
    n = int(targets.shape[0])
    if n == 0:
        raise ValueError("this client has no training examples.")
    ugm = ugm_requested(config)
    kind = str(config.get(FISHER_KEY, "sampled"))
    if ugm and kind not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {kind!r}; choose one of {FISHER_ESTIMATORS}.")
    training_fisher = TrainingFisher(model) if ugm and kind == "training" else None
    loss = train_classifier(
        model, inputs, targets,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, optimizer=optimizer,
        prox_precision=proximal_precision(config, n), training_fisher=training_fisher,
    )  # fmt: skip
    metrics = MetricRecord({NUM_EXAMPLES_KEY: n, "train-loss": loss})
    new_state = {k: v.detach() for k, v in model.state_dict().items()}
    if not ugm:
        content = RecordDict({arrayrecord_key: ArrayRecord(new_state), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    if training_fisher is not None:
        fisher = training_fisher.estimate(n)
    else:
        generator = torch.Generator().manual_seed(seed)
        batches = iterate_batches(inputs, targets, fisher_batch_size)
        fisher = diagonal_fisher(model, batches, kind=kind, generator=generator)
    delta = {
        key: value - global_state[key]
        for key, value in new_state.items()
        if value.is_floating_point()
    }
    return Message(content=build_ugm_reply(delta, fisher, metrics, client_id), reply_to=msg)


def handle_query(msg: Message, client_id: str) -> Message:
    """Answer the server's QUERY with this client's stable id (``fl_ugm.protocol``)."""
    return Message(content=query_reply_content(client_id), reply_to=msg)


@torch.no_grad()
def handle_evaluate(
    msg: Message, model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1024
) -> Message:
    """Answer an evaluate message: accuracy and mean cross-entropy of the global model."""
    _load_global(msg, model)
    n = int(targets.shape[0])
    if n == 0:
        raise ValueError("this client has no evaluation examples.")
    model.eval()
    correct, total_loss = 0, 0.0
    for xb, yb in iterate_batches(inputs, targets, batch_size):
        logits = model(xb)
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    metrics = MetricRecord(
        {NUM_EXAMPLES_KEY: n, "eval-loss": total_loss / n, "eval-acc": correct / n}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _load_global(msg: Message, model: nn.Module, key: str = "arrays") -> dict[str, Tensor]:
    """Load the message's global arrays into ``model``; return the global state (a copy)."""
    if key not in msg.content.array_records:
        raise ValueError(f"the server's message has no '{key}' record (the global model).")
    state = msg.content.array_records[key].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return {k: v.detach().clone() for k, v in state.items()}
