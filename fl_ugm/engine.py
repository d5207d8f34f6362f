"""The round engine: one FedUGM server round as a pure function (no Flower here).

Everything that turns a round's contributions into the next global lives here, once:

* :class:`RunSettings`: every option of a run, validated once (a combination that is not
  supported is refused with the pair named), the one source of every default (with
  :func:`client_memory_by_default`, FedUGM's rule for the memory), and the settings the
  ledger stores (:meth:`RunSettings.to_meta`, :meth:`RunSettings.from_meta`);
* the domain types: ``Contribution`` (``fl_ugm.contribution``: a client's reply as merged),
  :class:`RememberedClient`, :class:`HistoryRound`;
* :class:`ServerState`: the global, the server optimizer's state, the carried precision and
  the client memory (``fl_ugm.memory.ClientMemory``);
* :func:`step`: ``(settings, state, contributions) -> (next state, the round's result)``.

``FedUGM.aggregate_train`` is parse → admit → screen → :func:`step` → record; replay removal
(``fl_ugm.removal``) folds :func:`step` over the rewritten history; a resumed run starts from
the stored :class:`ServerState`. docs/design.md §1 has the math.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fl_ugm.contribution import Contribution, cast_tensors, like_tensors
from fl_ugm.memory import ClientMemory
from fl_ugm.merge import PriorPrecision, prior_at
from fl_ugm.merge_rules import ALPHA_MODES, MERGE_RULES, MergeRule, client_alphas, merge_round
from fl_ugm.robust import UpdateScreen
from fl_ugm.server_optimizer import SERVER_OPTIMIZERS, OptimizerState, server_step

#: Fisher estimators a client can be asked for (``fl_ugm.fisher``): labels drawn from the
#: model, the true labels, every class weighted by its probability, or the cheap estimate
#: accumulated during local training.
FISHER_ESTIMATORS = ("sampled", "empirical", "exact", "training")
#: The dtypes clients send Δ and F in (``fl_ugm.protocol``).
WIRE_DTYPES = ("float32", "float16")
#: A stable client id: 1-128 letters, digits, '.', '_' or '-', and not "." or ".." (the
#: ledger names files by it).
CLIENT_ID_PATTERN = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}$")

_LEDGER = {"ledger": True}  # a setting the ledger stores: the replay and resume depend on it
#: The combinations of options that are refused, and why.
REFUSED_COMBINATIONS = {
    ("client_memory", "carried_precision"): "a carried prior changes P between a reply and "
                                            "its re-centring",
}


def _ledger(before: object) -> dict:
    """A stored setting whose default changed: a ledger without it was written with
    ``before`` (the default then)."""
    return {**_LEDGER, "absent": before}


@dataclass(frozen=True)
class RunSettings:
    """Every option of a FedUGM run (``FedUGM(**options)`` takes these by name).

    prior_precision : δ > 0, the prior centred on the global, in a SUMMED loss's units (a
        Fisher's). Clients train under it (FedProx with μ = δ / n_t); the merge uses H0 = δ
        (+ ``server_fisher``).
    alpha, scale : α_t before scaling, n_t / Σn ("num-examples"), 1/T ("uniform") or 1
        ("ones"), times λ = ``scale`` > 0.
    merge : "ugm" (Eq. 6), or its limits "fisher-averaging" (H0 → 0) and "task-arithmetic"
        (F ≡ 0), baselines that see the same replies (``fl_ugm.merge_rules``).
    server_fisher : n_0·F_0 per parameter (a sum), added to δ in the merge's H0.
    fisher : the estimator clients are asked for (:data:`FISHER_ESTIMATORS`).
    wire_dtype : "float16" (scaled per tensor, a reply as large as FedAvg's) or "float32".
    fisher_clip : a client's claimed number of examples (its α) and its per-example Fisher
        mass, per tensor, are clipped to this × the round's median client's (≥ 1; None: off;
        ``fl_ugm.robust``).
    client_sizes : client id → the number of examples the server knows it has; a larger
        claim is clipped to it (with or without ``fisher_clip``).
    update_screen : the norm bound (default) and the opt-in cosine screen on the deltas
        (``fl_ugm.robust.UpdateScreen``; None: off).
    server_lr, server_momentum, server_optimizer : η > 0 and β ∈ [0, 1) of server momentum
        on the merged step ("momentum", Flower's FedAvgM update), or Flower's FedAdam update
        ("adam", β₁ = β); η = 1, β = 0 applies the merge as it is
        (``fl_ugm.server_optimizer``).
    carried_precision : γ ∈ [0, 1), a precision carried across rounds, C_r = γ (C_{r−1} +
        Σ α F); round r + 1's prior is δ + C_r, in the merge and for the clients (0: off).
    client_memory : merge every client's latest reply, re-centred to the current global,
        in the rounds it does not reply in (``fl_ugm.memory``; for partial
        participation). ``FedUGM`` turns it on when not given whenever it samples fewer
        than all clients (:func:`client_memory_by_default`).
    client_dual_step : ρ ≥ 0 of client dual variables (``fl_ugm.client_duals``; 0: off).
    """

    prior_precision: float = field(default=10.0, metadata=_ledger(1.0))
    alpha: str = field(default="num-examples", metadata=_LEDGER)
    scale: float = field(default=1.0, metadata=_LEDGER)
    merge: str = field(default="ugm", metadata=_LEDGER)
    server_fisher: Mapping[str, Tensor] | None = field(default=None, compare=False, repr=False)
    fisher: str = "sampled"
    wire_dtype: str = "float16"
    fisher_clip: float | None = 3.0
    client_sizes: Mapping[str, float] | None = field(default=None, compare=False, repr=False)
    update_screen: UpdateScreen | None = UpdateScreen()  # noqa: RUF009 (frozen)
    server_lr: float = field(default=1.0, metadata=_LEDGER)
    server_momentum: float = field(default=0.5, metadata=_ledger(0.0))
    server_optimizer: str = field(default="momentum", metadata=_LEDGER)
    carried_precision: float = field(default=0.0, metadata=_LEDGER)
    client_memory: bool = field(default=False, metadata=_LEDGER)
    client_dual_step: float = 0.0

    def __post_init__(self) -> None:
        def refuse(name: str, why: str) -> None:
            raise ValueError(f"FedUGM: {name}={getattr(self, name)!r}; {why}")

        for name, choices in (("alpha", ALPHA_MODES), ("merge", tuple(MERGE_RULES)),
                              ("fisher", FISHER_ESTIMATORS), ("wire_dtype", WIRE_DTYPES),
                              ("server_optimizer", SERVER_OPTIMIZERS)):
            if getattr(self, name) not in choices:
                refuse(name, f"choose one of {choices}.")
        for item in dataclasses.fields(self):
            if isinstance(item.default, float) and _number(getattr(self, item.name)):
                object.__setattr__(self, item.name, float(getattr(self, item.name)))
        for name, symbol in (("prior_precision", "δ"), ("scale", "λ"), ("server_lr", "η")):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                refuse(name, f"{symbol} must be finite and > 0.")
        for name, symbol in (("server_momentum", "β"), ("carried_precision", "γ")):
            if not _finite(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                refuse(name, f"{symbol} must be in [0, 1) (0: off).")
        if not _finite(self.client_dual_step) or self.client_dual_step < 0:
            refuse("client_dual_step", "ρ must be finite and ≥ 0 (0: off).")
        if self.fisher_clip is not None and not (_finite(self.fisher_clip)
                                                 and self.fisher_clip >= 1):
            refuse("fisher_clip", "it must be ≥ 1, or None.")
        if self.update_screen is not None and not isinstance(self.update_screen, UpdateScreen):
            refuse("update_screen", "give an fl_ugm.robust.UpdateScreen, or None.")
        if not isinstance(self.client_memory, bool):
            refuse("client_memory", "give True or False.")
        for (one, other), why in REFUSED_COMBINATIONS.items():
            if getattr(self, one) and getattr(self, other):
                raise ValueError(f"FedUGM: {one} cannot be combined with {other} yet ({why}); "
                                 "turn one of them off.")
        if self.server_fisher is not None:
            object.__setattr__(self, "server_fisher", dict(self.server_fisher))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_meta(self) -> dict[str, float | str | bool]:
        """The settings a ledger stores with its run (the ones the replay and resume depend
        on; the server Fisher is stored as the ledger's prior)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("ledger")}

    @classmethod
    def from_meta(cls, meta: Mapping[str, object],
                  prior: Mapping[str, Tensor] | None = None) -> RunSettings:
        """The settings of a ledger's run: its ``meta`` (a missing key takes the value a
        ledger written before the option existed ran with: the default then) and its
        per-tensor ``prior`` (δ + the server Fisher), if it stored one."""
        values = {}
        for item in dataclasses.fields(cls):
            if item.metadata.get("ledger"):
                value = meta.get(item.name, item.metadata.get("absent", item.default))
                values[item.name] = type(item.default)(value)
        settings = cls(**values)
        if prior is not None:
            delta = settings.prior_precision
            settings = dataclasses.replace(
                settings, server_fisher={k: v.double() - delta for k, v in prior.items()})
        return settings

    def describe(self) -> list[str]:
        """The settings as lines for the server's log (``FedUGM.summary``)."""
        s = self
        lines = [f"UGM merge (rule: {s.merge}):",
                 f"Prior precision δ: {s.prior_precision:g}"
                 + (" (+ server Fisher)" if s.server_fisher is not None else ""),
                 f"Alpha: {s.alpha} × scale {s.scale:g}",
                 f"Client Fisher estimator: {s.fisher} (fl_ugm.client.handle_train's; an own "
                 f"loop chooses its own); replies in {s.wire_dtype}"]
        lines += [line for on, line in (
            (s.carried_precision, f"Carried precision: γ {s.carried_precision:g}"),
            (s.client_memory, "Client memory: every client's latest reply, re-centred"),
            (s.client_dual_step, f"Client dual variables: ρ {s.client_dual_step:g}"),
            (s.moves_by_optimizer, f"Server {s.server_optimizer} on the merged update: "
                                   f"η {s.server_lr:g}, β {s.server_momentum:g}")) if on]
        return [*lines, "Weight clip: " + (
            "off" if s.fisher_clip is None else
            f"{s.fisher_clip:g} × the median client's size and per-example Fisher mass"),
            f"Update screen: {s.update_screen or 'off'}"]

    @property
    def rule(self) -> MergeRule:
        return MERGE_RULES[self.merge]

    @property
    def moves_by_optimizer(self) -> bool:
        """Whether the global moves by a server optimizer, not by the merge as it is."""
        return (self.server_optimizer == "adam" or self.server_lr != 1.0
                or self.server_momentum != 0.0)

    def base_prior(self, keys: Iterable[str]) -> PriorPrecision:
        """δ, or δ + the server Fisher per tensor of ``keys`` (the parameters)."""
        if self.server_fisher is None:
            return self.prior_precision
        keys = list(keys)
        missing = [k for k in keys if k not in self.server_fisher]
        if missing:
            raise ValueError(f"FedUGM: server_fisher has no entry for {missing[:5]}.")
        return {k: self.prior_precision + self.server_fisher[k] for k in keys}

    def merge_prior(self, keys: Iterable[str], carried: Mapping[str, Tensor] | None
                    ) -> PriorPrecision:
        """H0 of a round: the rule's prior of δ (+ server Fisher) + the carried C."""
        return self.rule.prior(with_carried(self.base_prior(keys), carried))

    def memory_options(self, keys: Iterable[str]) -> dict:
        """How the client memory re-centres and weighs (``fl_ugm.memory.ClientMemory``):
        the merge's H0 (None: a rule that ignores the Fisher) and whether w = n_t."""
        return {"prior": self.merge_prior(keys, None) if self.rule.uses_fisher else None,
                "weighted": self.alpha == "num-examples"}


def client_memory_by_default(fraction_train: float, carried_precision: float,
                             ledger: object | None) -> bool:
    """``client_memory`` when a run does not choose: on whenever fewer than all clients are
    sampled a round (``fraction_train`` < 1), unless the run carries a precision (refused
    with the memory) or its ``ledger`` keeps only its last rounds (``history_rounds`` > 0:
    the memory's replay and resume need every round)."""
    return (fraction_train < 1 and not carried_precision
            and not getattr(ledger, "history_rounds", 0))


def _number(value: object) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool | str)


def _finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# --------------------------------------------------------------------------- domain types


@dataclass(frozen=True)
class RememberedClient:
    """A remembered client a round also merged: its reply of ``reply_round``, re-centred to
    the round's start, with weight α as merged (``client_memory``)."""

    client_id: str
    reply_round: int
    alpha: float


@dataclass(frozen=True)
class RoundResult:
    """What :func:`step` merged: α_t of each contribution (in order), each one's share of
    θ⁺ − θ (before any server optimizer; None unless asked), and the remembered clients."""

    alphas: list[float]
    shares: list[dict[str, Tensor]] | None
    remembered: list[RememberedClient]


@dataclass(frozen=True)
class ServerState:
    """What the server carries from one round to the next: the global, the server
    optimizer's state ((m,) for momentum, (m, v) for Adam, () for none yet), the carried
    precision C (None: none) and the client memory."""

    global_state: Mapping[str, Tensor]
    optimizer: OptimizerState = ()
    carried: Mapping[str, Tensor] | None = None
    memory: ClientMemory = field(default_factory=ClientMemory)

    def like(self, reference: Mapping[str, Tensor]) -> ServerState:
        """Every tensor in the dtype of ``reference``'s entry of the same key (the replay
        computes in float64; the strategy keeps the model's dtypes). The memory is kept."""
        return self._map(lambda tensors: like_tensors(tensors, reference))

    def to(self, dtype: torch.dtype) -> ServerState:
        """Every float tensor in ``dtype`` (the memory is kept)."""
        return self._map(lambda tensors: cast_tensors(tensors, dtype))

    def _map(self, cast) -> ServerState:
        return ServerState(cast(self.global_state), tuple(cast(p) for p in self.optimizer),
                           None if self.carried is None else cast(self.carried), self.memory)


@dataclass(frozen=True)
class HistoryRound:
    """One merged round as the ledger keeps it: the state it started from (the global its
    clients fine-tuned from, the optimizer state, the carried precision; no memory: the
    memory is rebuilt from the earlier rounds), every participant as merged with its α,
    and the remembered clients merged too."""

    round: int
    start: ServerState
    participants: list[Contribution]
    alphas: list[float]
    remembered: list[RememberedClient] = field(default_factory=list)


# --------------------------------------------------------------------------- the step


def step(settings: RunSettings, state: ServerState, contributions: Sequence[Contribution],
         server_round: int, *, remembered: Sequence[str] | None = None,
         with_shares: bool = True) -> tuple[ServerState, RoundResult]:
    """One server round: (the state after it, what it merged).

    Merges the contributions (and, with ``client_memory``, the ``remembered`` clients, by
    default every one in the memory that did not reply, each re-centred) with the run's rule
    under H0 = δ (+ server Fisher) + C, applies the server optimizer, carries the precision
    and remembers the replies. ``server_round`` numbers the round (Adam's bias correction;
    the memory's reply rounds). Every input is left as it is; computed in the widest dtype
    among the state and the contributions. A round without contributions keeps the state
    (FedUGM keeps its global when no reply arrives). Raises
    ``fl_ugm.merge.InvalidClientInput`` naming the contribution's index when one is unusable
    (NaN, Inf, a negative Fisher), and ``KeyError`` for a ``remembered`` client the memory
    does not hold.
    """
    if not contributions:
        return state, RoundResult([], [] if with_shares else None, [])
    keys = list(contributions[0].fisher)
    prior = settings.merge_prior(keys, state.carried)
    memory_options = settings.memory_options(keys)  # the memory is refused with a carried C
    replied = {c.client_id for c in contributions}
    if not settings.client_memory:
        remembered = ()
    elif remembered is None:
        remembered = sorted(c for c in state.memory.index if c not in replied)
    count = len(contributions)
    sizes = [c.num_examples for c in contributions]
    sizes += [state.memory.index[c][1] for c in remembered]  # KeyError: not remembered
    alphas = client_alphas(sizes, settings.alpha, settings.scale)
    merged, weights = list(contributions), alphas[:count]
    memory = state.memory  # without the replying clients' earlier replies
    if settings.client_memory:
        memory = memory.without(replied, **memory_options)
    if remembered:  # α_t = factor × w_t for each remembered client
        factor = alphas[count] / (sizes[count] if memory_options["weighted"] else 1.0)
        merged.append(memory.recalled(state.global_state, remembered, factor=factor,
                                      fisher_weighted=settings.rule.uses_fisher,
                                      **memory_options))
        weights = [*weights, 1.0]
    new_global, shares = merge_round(settings.rule, state.global_state,
                                     [c.delta for c in merged], [c.fisher for c in merged],
                                     [c.num_examples for c in merged], alphas=weights,
                                     prior_precision=prior, with_shares=with_shares)
    optimizer = state.optimizer
    if settings.moves_by_optimizer:
        new_global, optimizer = server_step(
            state.global_state, new_global, state.optimizer, keys=keys,
            optimizer=settings.server_optimizer, server_lr=settings.server_lr,
            server_momentum=settings.server_momentum, server_round=server_round)
    carried = None
    if settings.carried_precision:  # C_r = γ (C_{r−1} + Σ α_t F_t), participants only
        carried = carry_precision(state.carried, [c.fisher for c in contributions],
                                  alphas[:count], settings.carried_precision)
    if settings.client_memory:
        memory = memory.remember(server_round, state.global_state, contributions,
                                 **memory_options)
    listed = [RememberedClient(client, state.memory.index[client][0], alpha)
              for client, alpha in zip(remembered, alphas[count:], strict=True)]
    return (ServerState(new_global, optimizer, carried, memory),
            RoundResult(alphas[:count], shares[:count] if shares is not None else None, listed))


def with_carried(prior: PriorPrecision, carried: Mapping[str, Tensor] | None
                 ) -> PriorPrecision:
    """H0 + C per entry of ``carried`` (None or empty: H0)."""
    if not carried:
        return prior
    out = dict(prior) if isinstance(prior, Mapping) else {}
    out.update({k: prior_at(prior, k) + c for k, c in carried.items()})
    return out


def carry_precision(carried: Mapping[str, Tensor] | None,
                    fishers: Sequence[Mapping[str, Tensor]], alphas: Sequence[float],
                    gamma: float) -> dict[str, Tensor]:
    """C_r = γ (C_{r−1} + Σ_t α_t F_t) per parameter entry (F_t sums over examples, as
    merged; C_{r−1} None or a missing key: 0)."""
    carried = carried or {}
    return {k: gamma * (carried.get(k, 0) + sum(a * f[k] for a, f in zip(
        alphas, fishers, strict=True))) for k in fishers[0]}
