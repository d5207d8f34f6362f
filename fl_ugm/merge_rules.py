"""The merge rules FedUGM can run, by name, behind one small interface (docs/design.md §1).

A rule turns one round's client deltas and Fishers into the new global parameters and, when
asked, each client's *share* of the change: Σ_t share_t = θ⁺ − θ, what the merge added to
the global on each client's behalf (the ledger accumulates it for client removal). Each
rule is one function call of ``fl_ugm.merge``; add a rule by subclassing :class:`MergeRule`
and registering it in :data:`MERGE_RULES`.

* ``ugm``: Eq. 6, θ + Σ_t α_t (H0 + F_t) / (H0 + Σ_s α_s F_s) · Δ_t;
* ``fisher-averaging``: its H0 → 0 limit, Σ_t α_t F_t Δ_t / Σ_s α_s F_s;
* ``task-arithmetic``: its F ≡ 0 limit, θ + Σ_t α_t Δ_t (the Fisher is ignored).

Also here: the client weights α_t (:func:`client_alphas`) and a round's whole new state
(:func:`merge_round`: parameters by the rule, float buffers averaged by num-examples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from fl_ugm.merge import (
    FISHER_AVERAGING_EPS,
    Params,
    PriorPrecision,
    proportions,
    task_arithmetic,
    ugm_merge,
    ugm_shares,
    weighted_average,
)

#: How α_t is computed before scaling: n_t / Σn (the FL default), 1/T, or 1 (the paper's
#: task-arithmetic setting).
ALPHA_MODES = ("num-examples", "uniform", "ones")


def client_alphas(num_examples: Sequence[float], mode: str, scale: float = 1.0) -> list[float]:
    """α_t for clients with ``num_examples`` (n_t > 0) under ``mode``, times λ = ``scale``."""
    if mode == "num-examples":
        base = proportions(num_examples)
    elif mode == "uniform":
        base = [1.0 / len(num_examples)] * len(num_examples)
    elif mode == "ones":
        base = [1.0] * len(num_examples)
    else:
        raise ValueError(f"alpha mode {mode!r}; choose one of {ALPHA_MODES}.")
    return [scale * a for a in base]


@dataclass(frozen=True)
class MergeResult:
    """θ⁺ for the merged keys, and each client's share of θ⁺ − θ (None unless asked)."""

    params: dict[str, Tensor]
    shares: list[dict[str, Tensor]] | None


class MergeRule:
    """One way to merge client deltas. ``uses_fisher``: whether the rule reads the Fishers
    (the Fisher-inflation clip only matters then)."""

    name: str = ""
    uses_fisher: bool = True

    def prior(self, prior_precision: PriorPrecision) -> PriorPrecision:
        """The H0 this rule merges (and removes) with, given the run's δ (+ server Fisher)."""
        return prior_precision

    def merge(self, base: Params, deltas: Sequence[Params], fishers: Sequence[Params], *,
              alphas: Sequence[float], prior_precision: PriorPrecision,
              with_shares: bool = False) -> MergeResult:
        raise NotImplementedError


class UGM(MergeRule):
    """Eq. 6 (:func:`fl_ugm.merge.ugm_merge`)."""

    name = "ugm"

    def merge(self, base, deltas, fishers, *, alphas, prior_precision, with_shares=False):
        prior = self.prior(prior_precision)
        params = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=prior)
        shares = (ugm_shares(base, deltas, fishers, alphas=alphas, prior_precision=prior)
                  if with_shares else None)
        return MergeResult(params, shares)


class FisherAveraging(UGM):
    """UGM with H0 → 0 (``FISHER_AVERAGING_EPS``), i.e. Fisher-weighted averaging; a
    coordinate where every Fisher is zero gets Σ_t α_t Δ_t instead of 0/0."""

    name = "fisher-averaging"

    def prior(self, prior_precision: PriorPrecision) -> PriorPrecision:
        return FISHER_AVERAGING_EPS


class TaskArithmetic(MergeRule):
    """θ + Σ_t α_t Δ_t (:func:`fl_ugm.merge.task_arithmetic`); the Fisher is ignored."""

    name = "task-arithmetic"
    uses_fisher = False

    def merge(self, base, deltas, fishers, *, alphas, prior_precision, with_shares=False):
        params = task_arithmetic(base, deltas, alphas=alphas)
        shares = ([{k: a * d[k] for k in base} for a, d in zip(alphas, deltas, strict=True)]
                  if with_shares else None)
        return MergeResult(params, shares)


MERGE_RULES: dict[str, MergeRule] = {rule.name: rule
                                     for rule in (UGM(), FisherAveraging(), TaskArithmetic())}


def merge_rule(name: str) -> MergeRule:
    """The registered rule called ``name``."""
    if name not in MERGE_RULES:
        raise ValueError(f"merge rule {name!r}; choose one of {tuple(MERGE_RULES)}.")
    return MERGE_RULES[name]


def merge_round(
    rule: MergeRule,
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    num_examples: Sequence[float],
    *,
    alphas: Sequence[float],
    prior_precision: PriorPrecision,
    with_shares: bool = False,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]] | None]:
    """(new global state, per-client parameter shares or None) for one round.

    The parameters (the Fishers' keys) are merged by ``rule``; the other float entries
    (buffers such as BatchNorm running statistics) get the num-examples average of the
    deltas; non-float entries keep the global's value. The state keeps the global's key
    order. Raises ``InvalidClientInput`` (with the client's index) for a bad client.
    """
    param_keys = list(fishers[0])
    result = rule.merge(
        {k: global_state[k] for k in param_keys},
        [{k: d[k] for k in param_keys} for d in deltas],
        fishers, alphas=alphas, prior_precision=prior_precision, with_shares=with_shares,
    )  # fmt: skip
    merged = dict(result.params)
    buffer_keys = [k for k in deltas[0] if k not in fishers[0]]
    if buffer_keys:
        merged.update(weighted_average(
            {k: global_state[k] for k in buffer_keys},
            [{k: d[k] for k in buffer_keys} for d in deltas], alphas=list(num_examples),
        ))  # fmt: skip
    return {key: merged.get(key, value) for key, value in global_state.items()}, result.shares
