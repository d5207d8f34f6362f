"""What a Flower ClientApp calls: fine-tune from the global model and build the reply.

One ClientApp serves every strategy. When the server's train config carries ``"ugm": True``
(FedUGM asks for it), the reply is DESIGN §4's UGM reply::

    {"delta": ArrayRecord(Δ = θ_t − θ for every float entry of the state dict),
     "fisher": ArrayRecord(F_t for every parameter; float32, a SUM over the n_t examples),
     "metrics": MetricRecord({"num-examples": n_t, "train-loss": ...})}

Float buffers (e.g. BatchNorm running statistics) appear in ``delta`` but not in ``fisher``;
the server averages them by num-examples. Any other strategy (Flower's FedAvg, FedProx,
FedAdam…) gets the standard ``{"arrays": ArrayRecord(θ_t), "metrics": ...}`` reply.

The proximal prior: FedUGM sends its δ as ``"ugm-prior"``; FedProx sends ``"proximal-mu"``
(μ/2·‖w − θ‖² on a MEAN loss, i.e. precision μ·n_t on the summed loss). Both become the
term (precision / 2n)·‖w − θ‖² added to the mean loss, the H0 = δ of the derivation.

A QUERY message is answered by :func:`handle_query` with the client's stable id, so a server
that has not heard from a client in this run (e.g. a removal run after a restart) can find
its node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from fl_ugm.fisher import TrainingFisher, diagonal_fisher, iterate_batches

UGM_KEY = "ugm"
FISHER_KEY = "ugm-fisher"
PRIOR_KEY = "ugm-prior"
FEDPROX_MU_KEY = "proximal-mu"
#: UGM replies carry the client's stable id (for the server's ledger and client removal)
#: as ConfigRecord CLIENT_RECORD = {CLIENT_ID_KEY: str}.
CLIENT_RECORD = "client"
CLIENT_ID_KEY = "client-id"
#: Set in the train config of an online-removal request: the client fine-tunes from the
#: current global as usual; its reply's Δ_t, F_t feed the removal update, not a merge.
REMOVAL_KEY = "ugm-removal"
#: Fisher estimators a client can be asked for: the two of ``diagonal_fisher`` and the
#: cheap one accumulated during training (:class:`fl_ugm.fisher.TrainingFisher`).
FISHER_ESTIMATORS = ("sampled", "empirical", "training")
OPTIMIZERS = ("sgd", "adam")


def ugm_requested(config: ConfigRecord) -> bool:
    """True when the server (FedUGM) asks for a delta + Fisher reply."""
    return bool(config.get(UGM_KEY, False))


def proximal_precision(config: ConfigRecord, num_examples: int) -> float:
    """Precision of the proximal prior on the SUMMED loss: δ (FedUGM), μ·n (FedProx), or 0."""
    if ugm_requested(config):
        value = float(config.get(PRIOR_KEY, 0.0))
    elif FEDPROX_MU_KEY in config:
        value = float(config[FEDPROX_MU_KEY]) * num_examples
    else:
        return 0.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"the server asked for a proximal precision of {value}; need ≥ 0.")
    return value


def train_classifier(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    epochs: int,
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
    (FedProx's μ = prox_precision / n). ``anchor`` defaults to the weights on entry. If a
    :class:`TrainingFisher` is given it sees each batch's cross-entropy gradient (before the
    proximal gradient is added). Returns the last epoch's mean cross-entropy (nats).
    """
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
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            total += loss.item() * len(batch)
            if training_fisher is not None:
                training_fisher.update(len(batch))
            if prox_scale > 0:  # gradient of (prox_scale / 2)·‖w − centre‖²
                with torch.no_grad():
                    for key, p in params.items():
                        if p.grad is not None:
                            p.grad.add_(p - centre[key], alpha=prox_scale)
            opt.step()
        last_epoch_loss = total / n
    return last_epoch_loss


def handle_train(
    msg: Message,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str = "sgd",
    fisher_batch_size: int = 256,
    client_id: str | None = None,
) -> Message:
    """Answer a train message: load the global, fine-tune, reply (UGM or standard).

    ``client_id`` is this client's stable id (partition id in simulation, a configured id
    in a deployment); UGM replies carry it so the server can record and later remove this
    client's contribution. Raises ``ValueError`` for a malformed request or empty local
    data; inside a ClientApp,
    Flower turns the exception into an error reply, which the strategy logs and skips.
    """
    config = msg.content.config_records.get("config", ConfigRecord())
    global_state = _load_global(msg, model)
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
    metrics = MetricRecord({"num-examples": n, "train-loss": loss})
    new_state = {k: v.detach() for k, v in model.state_dict().items()}
    if not ugm:
        content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": metrics})
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
    content = RecordDict({
        "delta": ArrayRecord(delta),
        "fisher": ArrayRecord({k: v.float().contiguous() for k, v in fisher.items()}),
        "metrics": metrics,
    })  # fmt: skip
    if client_id is not None:
        content[CLIENT_RECORD] = ConfigRecord({CLIENT_ID_KEY: str(client_id)})
    return Message(content=content, reply_to=msg)


def handle_query(msg: Message, client_id: str) -> Message:
    """Answer the server's query with this client's stable id (``{CLIENT_RECORD: ...}``)."""
    record = ConfigRecord({CLIENT_ID_KEY: str(client_id)})
    return Message(content=RecordDict({CLIENT_RECORD: record}), reply_to=msg)


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
        {"num-examples": n, "eval-loss": total_loss / n, "eval-acc": correct / n}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _load_global(msg: Message, model: nn.Module) -> dict[str, Tensor]:
    """Load the message's "arrays" into ``model``; return the global state (a copy)."""
    if "arrays" not in msg.content.array_records:
        raise ValueError("the server's message has no 'arrays' record (the global model).")
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return {k: v.detach().clone() for k, v in state.items()}
