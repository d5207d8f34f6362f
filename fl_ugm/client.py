"""What a Flower ClientApp calls: fine-tune from the global model and build the reply.

Two ways to answer a train message, each of which serves FedUGM and Flower's own strategies
(FedAvg, FedProx, FedAdam... get the standard ``arrays`` + ``metrics`` reply):

* **Your own training loop** (any loss, DataLoader, device, frozen backbone or adapters):
  :func:`load_global`, train with :class:`ProximalTerm` added to your mean loss, compute the
  Fisher of the trainable parameters (``fl_ugm.fisher.diagonal_fisher`` or
  ``TrainingFisher``), return :func:`ugm_reply` (README "Quickstart";
  ``examples/quickstart-pytorch``).
* **The ready-made classifier loop**: :func:`handle_train` (cross-entropy on in-memory
  tensors, SGD or Adam).

The UGM reply (``fl_ugm.protocol``) carries Δ for the trainable parameters and the float
buffers (e.g. BatchNorm running statistics, which the server averages by num-examples), the
Fisher of the trainable parameters (a SUM over the n_t examples), ``num-examples`` and the
client's stable id (:func:`client_id`), in the wire dtype the server asked for. Frozen
parameters are not sent: the server keeps the global's values there. :func:`handle_query`
answers the server's QUERY for the id (removal, excluded clients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from fl_ugm.client_duals import DUAL_STATE_RECORD, next_dual, reported_delta
from fl_ugm.engine import CLIENT_ID_PATTERN, FISHER_ESTIMATORS
from fl_ugm.fisher import TrainingFisher, diagonal_fisher, iterate_batches
from fl_ugm.protocol import (
    DUAL_STEP_KEY,
    FISHER_KEY,
    NUM_EXAMPLES_KEY,
    PRIOR_KEY,
    WIRE_DTYPE_KEY,
    build_ugm_reply,
    proximal_precision,
    query_reply_content,
    ugm_requested,
)

__all__ = ["ProximalTerm", "client_id", "handle_evaluate", "handle_query", "handle_train",
           "load_global", "train_classifier", "ugm_reply"]

OPTIMIZERS = ("sgd", "adam")



def client_id(context: Context) -> str:
    """This client's stable id, which the ledger keys its contributions on (Flower's node id
    changes when a SuperNode restarts): ``context.node_config["client-id"]`` (a deployment:
    ``flower-supernode --node-config 'client-id="hospital-3"'``), else, in a simulation,
    whose nodes carry only ``partition-id``, that partition's number as a string ("0", "1",
    ...: stable across runs of one federation). Raises ``ValueError`` if the node config has
    neither, or the id is not 1-128 letters, digits, '.', '_' or '-'."""
    config = context.node_config
    value = config.get("client-id", config.get("partition-id"))
    if value is None:
        raise ValueError("this node's config has neither 'client-id' nor 'partition-id'; start "
                         "the SuperNode with --node-config 'client-id=\"<a stable id>\"'.")
    value = str(value)
    if not CLIENT_ID_PATTERN.match(value):
        raise ValueError(f"client id {value!r} must be 1-128 letters, digits, '.', '_' or '-' "
                         "(not '.' or '..'): it names the client's files in the ledger.")
    return value


class ProximalTerm:
    """The proximal prior the server asked for, as a term of your MEAN loss::

        load_global(msg, model)
        prox = ProximalTerm(msg, model, n)        # θ: the global the model now holds
        loss = F.cross_entropy(model(x), y) + prox(model)

    ``prox(model)`` is (1 / 2n)·Σ_i P_i (w_i − θ_i)² over the trainable parameters, with n
    the local examples and P the precision on the SUMMED loss (``.precision``): FedUGM's δ
    (sum units; per coordinate δ + the carried precision with ``carried_precision``),
    FedProx's μ·n (so the term is FedProx's μ/2·‖w − θ‖²), or 0 for a strategy that asks
    for none (the term is then a zero and costs nothing). Its gradient pulls each weight
    back with strength P/n. FedUGM's merge assumes it (its H0 is δ), so keep it; leaving it
    out changes little only when P/n is negligible against the loss's curvature (the
    default δ = 1 with hundreds of examples), never with a carried precision or client
    duals, which work through it.
    """

    def __init__(self, msg: Message, model: nn.Module, num_examples: int, *,
                 configrecord_key: str = "config") -> None:
        if not num_examples > 0:
            raise ValueError(f"ProximalTerm: num_examples={num_examples}; it must be > 0.")
        config = msg.content.config_records.get(configrecord_key, ConfigRecord())
        self.num_examples = int(num_examples)
        self.precision = _prior_for(model, proximal_precision(
            msg.content, self.num_examples, configrecord_key), config)
        trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
        scales = (self.precision if isinstance(self.precision, dict)
                  else dict.fromkeys(trainable, self.precision))
        self._anchor = {k: p.detach().clone() for k, p in trainable.items()
                        if not isinstance(scales[k], float) or scales[k] > 0}
        self._scale = {k: scales[k].to(self._anchor[k]) if isinstance(scales[k], Tensor)
                       else scales[k] for k in self._anchor}

    def __call__(self, model: nn.Module) -> Tensor:
        """The term for ``model``'s current weights (a scalar on their device, in their dtype)."""
        params = dict(model.named_parameters())
        terms = [(self._scale[k] * (params[k] - anchor) ** 2).sum()
                 for k, anchor in self._anchor.items()]
        if not terms:
            return torch.zeros((), device=next(iter(params.values())).device)
        return torch.stack(terms).sum() / (2 * self.num_examples)


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
    prox_precision: float | Mapping[str, Tensor] = 0.0,
    anchor: Mapping[str, Tensor] | None = None,
    training_fisher: TrainingFisher | None = None,
    dual: Mapping[str, Tensor] | None = None,
) -> float:
    """Fine-tune in place on mean cross-entropy + (1 / 2n)·Σ P·(w − anchor)² − ⟨λ, w⟩ / n.

    ``n`` = ``len(inputs)``, so P = ``prox_precision`` is the prior precision on the summed
    loss (FedProx's μ = P / n): a float, or per parameter a tensor of its shape (a
    per-coordinate precision; a parameter it does not name gets none). ``anchor`` defaults
    to the weights on entry. A fractional ``epochs`` (e.g. 0.5) ends with that fraction of
    an epoch's mini-batches. In a model with BatchNorm, a last mini-batch of one example
    joins the one before (BatchNorm cannot train on one). If a :class:`TrainingFisher` is
    given it sees each batch's cross-entropy gradient (before the proximal gradient is
    added). ``dual`` λ (per parameter, in the units of a SUMMED loss's gradient; a
    parameter it does not name gets none) is the linear term of client dual variables
    (``fl_ugm.client_duals``). Returns the last epoch's mean cross-entropy (nats).
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
    linear = {k: v.to(params[k]) for k, v in (dual or {}).items() if k in params}
    if isinstance(prox_precision, Mapping):
        prox_scale: dict[str, Tensor | float] = {k: v / n for k, v in prox_precision.items()
                                                 if k in params}
    else:
        prox_scale = dict.fromkeys(params, prox_precision / n) if prox_precision > 0 else {}
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.train()
    last_epoch_loss = float("nan")
    full, fraction = divmod(float(epochs), 1.0)
    passes = [1.0] * int(full) + ([fraction] if fraction > 0 else [])
    for share in passes:
        total, seen = 0.0, 0
        batches = list(torch.randperm(n, generator=generator).split(batch_size))
        if batch_norm and len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2:] = [torch.cat(batches[-2:])]  # BatchNorm cannot train on 1 example
        for batch in batches[:max(1, round(share * len(batches)))]:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            total += loss.item() * len(batch)
            seen += len(batch)
            if training_fisher is not None:
                training_fisher.update(len(batch))
            if linear:  # gradient of −⟨λ, w⟩ / n
                with torch.no_grad():
                    for key, value in linear.items():
                        if params[key].grad is not None:
                            params[key].grad.sub_(value, alpha=1.0 / n)
            if prox_scale:  # gradient of Σ (P / 2n)·(w − centre)²
                with torch.no_grad():
                    for key, scale in prox_scale.items():
                        p = params[key]
                        if p.grad is None:
                            continue
                        if isinstance(scale, Tensor):
                            p.grad.addcmul_(p - centre[key], scale)
                        else:
                            p.grad.add_(p - centre[key], alpha=scale)
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
    state: RecordDict | None = None,
) -> Message:
    """Answer a train message: load the global, fine-tune, reply (UGM or standard).

    ``client_id`` is this client's stable id (partition id in simulation, a configured id
    in a deployment); UGM replies carry it so the server can record and later remove this
    client's contribution (without it, FedUGM merges the reply but cannot remove it later).
    ``arrayrecord_key`` / ``configrecord_key`` are the strategy's record names (Flower's
    defaults). ``state`` is the node's persistent state (Flower's ``context.state``): when
    the server asks for client dual variables (``DUAL_STEP_KEY``) this client's λ lives
    there between rounds (``fl_ugm.client_duals``). Raises ``ValueError`` for a malformed
    request, empty local data, or a request for duals without ``state``; inside a ClientApp,
    Flower turns the exception into an error reply, which the strategy logs and skips.
    """
    config = msg.content.config_records.get(configrecord_key, ConfigRecord())
    start = load_global(msg, model, arrayrecord_key)
    n = int(targets.shape[0])
    if n == 0:
        raise ValueError("this client has no training examples.")
    ugm = ugm_requested(config)
    kind = str(config.get(FISHER_KEY, "sampled"))
    if ugm and kind not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {kind!r}; choose one of {FISHER_ESTIMATORS}.")
    training_fisher = TrainingFisher(model) if ugm and kind == "training" else None
    prior = _prior_for(model, proximal_precision(msg.content, n, configrecord_key), config)
    dual_step = float(config.get(DUAL_STEP_KEY, 0.0)) if ugm else 0.0
    dual = _stored_dual(model, state, dual_step)
    loss = train_classifier(
        model, inputs, targets,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, optimizer=optimizer,
        prox_precision=prior, training_fisher=training_fisher, dual=dual,
    )  # fmt: skip
    if not ugm:
        fisher = {}
    elif training_fisher is not None:
        fisher = training_fisher.estimate(n)
    else:
        generator = torch.Generator().manual_seed(seed)
        batches = iterate_batches(inputs, targets, fisher_batch_size)
        fisher = diagonal_fisher(model, batches, kind=kind, generator=generator)
    reply = ugm_reply(msg, model, fisher=fisher, num_examples=n, client_id=client_id,
                      metrics={"train-loss": loss}, arrayrecord_key=arrayrecord_key,
                      configrecord_key=configrecord_key, dual=dual)
    if dual is not None:  # _stored_dual returned it, so there is a state
        step = {k: p.detach().cpu() - start[k] for k, p in model.named_parameters()
                if k in dual}
        state[DUAL_STATE_RECORD] = ArrayRecord(next_dual(dual, step, prior, dual_step))
    return reply


def _stored_dual(model: nn.Module, state: RecordDict | None, dual_step: float
                 ) -> dict[str, Tensor] | None:
    """This node's λ from ``state`` (zeros in its first round), or None without duals."""
    if not (math.isfinite(dual_step) and dual_step >= 0):
        raise ValueError(f"the server asked for a dual step of {dual_step}; need ≥ 0.")
    if not dual_step:
        return None
    if state is None:
        raise ValueError("the server asks for client dual variables (FedUGM "
                         "client_dual_step > 0), which live in the node's persistent state: "
                         "pass it, handle_train(..., state=context.state).")
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if DUAL_STATE_RECORD not in state.array_records:
        return {k: torch.zeros_like(p, device="cpu") for k, p in trainable.items()}
    dual = state.array_records[DUAL_STATE_RECORD].to_torch_state_dict()
    if set(dual) != set(trainable) or any(dual[k].shape != p.shape
                                          for k, p in trainable.items()):
        raise ValueError(f"this node's stored dual ('{DUAL_STATE_RECORD}' in context.state) "
                         "does not match the model's trainable parameters: the model changed "
                         "within the run; start a new run (or delete the record).")
    return dual


def _prior_for(model: nn.Module, prior: float | dict[str, Tensor], config: ConfigRecord
               ) -> float | dict[str, Tensor | float]:
    """A per-parameter prior completed with δ for the parameters it does not name."""
    if not isinstance(prior, dict):
        return prior
    unknown = sorted(set(prior) - {k for k, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"the server's per-parameter prior names parameters this model lacks: "
                         f"{unknown[:5]}.")
    delta = float(config.get(PRIOR_KEY, 0.0))
    return {k: prior.get(k, delta) for k, _ in model.named_parameters()}


def ugm_reply(
    msg: Message,
    model: nn.Module,
    *,
    fisher: Mapping[str, Tensor],
    num_examples: int | float,
    client_id: str | None = None,
    metrics: Mapping[str, int | float] | None = None,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    dual: Mapping[str, Tensor] | None = None,
) -> Message:
    """The reply to the train message ``msg``, from ``model`` fine-tuned from the global that
    ``msg`` carries (any training loop, any device): FedUGM's UGM reply, or, when the server
    did not ask for one (Flower's FedAvg, FedProx, FedAdam...), the standard reply
    (``arrays``: the trained state dict; ``metrics``: ``num-examples`` and ``metrics``; the
    Fisher is not needed then, and not checked).

    Parameters
    ----------
    msg : Message
        The server's train message; its ``arrayrecord_key`` record is the global model.
    model : nn.Module
        The locally trained model (same architecture as the global), on any device. Its
        trainable parameters (``requires_grad``) and the float buffers of modules that have
        a trainable parameter or none (e.g. BatchNorm statistics) are sent as Δ = θ_t − θ;
        frozen parameters and the buffers of frozen modules are not sent (the server keeps
        the global's values).
    fisher : Mapping[str, Tensor]
        The diagonal Fisher of exactly the trainable parameters, a SUM over the
        ``num_examples`` examples, ≥ 0 (``diagonal_fisher`` or ``TrainingFisher``).
    num_examples : int or float
        n_t, the number of local training examples (> 0); the server's α_t and buffer
        averages use it.
    client_id : str, optional
        This client's stable id (the ledger keys contributions by it; without it FedUGM
        merges the reply but cannot remove it later).
    metrics : Mapping[str, int | float], optional
        Extra train metrics for the reply's MetricRecord (e.g. the loss).
    arrayrecord_key, configrecord_key : str
        The strategy's record names (Flower's defaults).
    dual : Mapping[str, Tensor], optional
        The client dual λ this model was trained with (``fl_ugm.client_duals``, one tensor
        per trainable parameter, summed-loss gradient units): the reply then carries
        Δ − λ / (P + F) for those parameters, P the proximal prior of ``msg``.

    Returns
    -------
    Message
        The UGM reply (``fl_ugm.protocol``), in the wire dtype the server asked for
        (``"ugm-wire-dtype"``; float32 if it did not say), or the standard one.

    Raises
    ------
    ValueError
        With what is wrong: a parameter or buffer missing from the global or shaped
        differently, a Fisher key that is not a trainable parameter or a trainable parameter
        without a Fisher, NaN/Inf in the model or the Fisher, a negative Fisher, n ≤ 0.
    """
    if not (isinstance(num_examples, int | float) and math.isfinite(num_examples)
            and num_examples > 0):
        raise ValueError(f"ugm_reply: num_examples={num_examples!r}; it must be > 0.")
    global_state = _global_state(msg, arrayrecord_key)
    config = msg.content.config_records.get(configrecord_key, ConfigRecord())
    record = MetricRecord({NUM_EXAMPLES_KEY: num_examples, **dict(metrics or {})})
    if not ugm_requested(config):
        trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return Message(content=RecordDict({arrayrecord_key: ArrayRecord(trained),
                                           "metrics": record}), reply_to=msg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("ugm_reply: the model has no trainable parameters (requires_grad).")
    state = model.state_dict()
    buffers = _trained_float_buffers(model)
    delta = {}
    for key, value in state.items():
        if key not in trainable and key not in buffers:
            continue
        if key not in global_state:
            raise ValueError(f"ugm_reply: the model's '{key}' is not in the global model the "
                             "server sent; the ClientApp builds another model than the server.")
        base = global_state[key]
        if tuple(value.shape) != tuple(base.shape):
            raise ValueError(f"ugm_reply: the model's '{key}' has shape {tuple(value.shape)}, "
                             f"the global {tuple(base.shape)}.")
        delta[key] = value.detach().to(device="cpu", dtype=base.dtype) - base
        if not bool(torch.isfinite(delta[key]).all()):
            raise ValueError(f"ugm_reply: the trained model's '{key}' is NaN/Inf; local "
                             "training diverged (lower the learning rate).")
    not_trainable = sorted(set(fisher) - trainable)
    if not_trainable:
        raise ValueError(f"ugm_reply: Fisher keys {not_trainable[:5]} are not trainable "
                         "parameters of the model (frozen, or not in it).")
    missing = sorted(trainable - set(fisher))
    if missing:
        raise ValueError(f"ugm_reply: the Fisher has no entry for the trainable parameters "
                         f"{missing[:5]}; compute it over the trainable parameters "
                         "(diagonal_fisher(model, ...)), or freeze them.")
    for key, values in fisher.items():
        if tuple(values.shape) != tuple(delta[key].shape):
            raise ValueError(f"ugm_reply: fisher['{key}'] has shape {tuple(values.shape)}, "
                             f"the parameter {tuple(delta[key].shape)}.")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"ugm_reply: fisher['{key}'] has NaN/Inf or negative entries; a "
                             "Fisher is a sum of squares.")
    if dual is not None:
        if not set(dual) <= set(fisher):
            raise ValueError(f"ugm_reply: dual keys {sorted(set(dual) - set(fisher))[:5]} are "
                             "not trainable parameters of the model.")
        for key, values in dual.items():
            if tuple(values.shape) != tuple(delta[key].shape):
                raise ValueError(f"ugm_reply: dual['{key}'] has shape {tuple(values.shape)}, "
                                 f"the parameter {tuple(delta[key].shape)}.")
        prior = _prior_for(model, proximal_precision(msg.content, int(num_examples),
                                                     configrecord_key), config)
        delta = reported_delta(delta, fisher, prior,
                               {k: v.to(device="cpu", dtype=delta[k].dtype)
                                for k, v in dual.items()})
    content = build_ugm_reply(delta, fisher, record, client_id,
                              str(config.get(WIRE_DTYPE_KEY, "float32")))
    return Message(content=content, reply_to=msg)


def _trained_float_buffers(model: nn.Module) -> set[str]:
    """Float buffers that local training may change: those of modules with a trainable
    parameter or with no parameters at all (a frozen BatchNorm's statistics stay home)."""
    names = set()
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            continue
        names.update(f"{prefix}.{name}" if prefix else name
                     for name, b in module.named_buffers(recurse=False)
                     if b.is_floating_point())
    return names


def handle_query(msg: Message, client_id: str) -> Message:
    """Answer the server's QUERY with this client's stable id (``fl_ugm.protocol``)."""
    return Message(content=query_reply_content(client_id), reply_to=msg)


@torch.no_grad()
def handle_evaluate(
    msg: Message, model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1024
) -> Message:
    """Answer an evaluate message: accuracy and mean cross-entropy of the global model."""
    load_global(msg, model)
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


def load_global(msg: Message, model: nn.Module, key: str = "arrays") -> dict[str, Tensor]:
    """Load the global model that ``msg`` carries into ``model`` (on its device) and return
    it (the CPU state dict, untouched by training). Every entry must match (``strict``): a
    frozen backbone starts from the global's values too."""
    state = _global_state(msg, key)
    model.load_state_dict(state, strict=True)
    return state


def _global_state(msg: Message, key: str) -> dict[str, Tensor]:
    if key not in msg.content.array_records:
        raise ValueError(f"the server's message has no '{key}' record (the global model).")
    return msg.content.array_records[key].to_torch_state_dict()
