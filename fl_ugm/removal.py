"""Remove a client's contribution from the global model using the ledger (no Flower here).

Two methods (``remove_from_ledger(..., method=...)``; ``plan_removal`` also returns what a
commit needs):

**replay** recomputes the training without the client from the ledger's per-round history
(``fl_ugm.replay``, docs/design.md §1): no client trains, or, with ``corrections``, the
remaining clients train again in the rounds a budget allows.

**eq13** is the one-round update of the paper, in two parts, per coordinate:

1. **Eq. 13** (docs/design.md §1), where the remaining clients' data informs the coordinate:

       θ₋t = θ − α_t (H0 + F_t) / (H0 + Σ_{s≠t} α_s F_s) · Δ_t

   *Online*, Δ_t and F_t come fresh from the client fine-tuning from the current θ (exact
   for linear regression). *Offline*, they are its last stored contribution, which started
   from θ_start (from the round's history, or the checkpoint before it), not from θ; by
   default the delta is re-centred to the current model with the same quadratic model the
   derivation uses (ℓ_t's Hessian ≈ F_t; ``fl_ugm.merge.recentred_delta``):

       Δ'_t = Δ_t − F_t / (H0 + F_t) · (θ − θ_start)

   which makes the offline removal exact for linear regression too. It needs the checkpoint
   of the round before the client's contribution; without it the plain Δ_t is used and the
   report says so.

2. **Revert uninformed coordinates**, where the remaining clients' summed Fisher is
   negligible (Σ_{s≠t} α_s F_s ≤ ``uninformed_threshold`` · H0): no other client's data
   moves such a coordinate (for a pixel that is always blank in their data, its first-layer
   weights get exactly zero gradient), so retraining without t leaves it where it started,
   and the exact removal is to subtract everything the merges added there on t's behalf over
   all rounds (the ledger's ``applied`` sum). Eq. 13 alone cannot do this in multi-round
   FL: Δ_t and F_t are one round's, and once the global fits t's data they are ≈ 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fl_ugm.engine import HistoryRound, RunSettings, ServerState
from fl_ugm.ledger import ClientRecord, Ledger, LedgerCorruptError, LedgerError
from fl_ugm.merge import PriorPrecision, prior_at, recentred_delta, remove_client
from fl_ugm.replay import RECENTRING, SHARED_RANK, Corrections, replay_without

#: How a client is removed: recompute the training without it from the stored history, or
#: the paper's one-round update (Eq. 13 + the revert of uninformed entries).
REMOVAL_METHODS = ("replay", "eq13")
#: Σ_{s≠t} α_s F_s at or below this × H0 counts as "no remaining client informs it".
UNINFORMED_FISHER = 1e-4


def removal_update(params: Mapping[str, Tensor], delta: Mapping[str, Tensor],
                   fisher: Mapping[str, Tensor], fisher_rest: Mapping[str, Tensor], *,
                   alpha: float, prior_precision: PriorPrecision,
                   applied: Mapping[str, Tensor] | None = None,
                   uninformed_threshold: float = UNINFORMED_FISHER,
                   ) -> tuple[dict[str, Tensor], float]:
    """(θ₋t for the keys of ``fisher``, fraction of entries reverted): Eq. 13, then, where
    ``fisher_rest`` ≤ ``uninformed_threshold`` · H0 and ``applied`` (the client's summed
    merge shares over all rounds) is given, θ − applied instead. Units as in
    :func:`fl_ugm.merge.remove_client` (Fishers are sums over examples)."""
    removed = remove_client({k: params[k] for k in fisher}, delta, fisher, fisher_rest,
                            alpha=alpha, prior_precision=prior_precision)
    if applied is None:
        return removed, 0.0
    reverted = total = 0
    for key, value in removed.items():
        if key not in applied:
            continue
        uninformed = fisher_rest[key] <= uninformed_threshold * prior_at(prior_precision, key)
        reverted_value = params[key] - applied[key].to(params[key].dtype)
        removed[key] = torch.where(uninformed, reverted_value, value)
        reverted += int(uninformed.sum())
        total += uninformed.numel()
    return removed, reverted / max(total, 1)


@dataclass
class RemovalPlan:
    """A computed removal: the server state without the client (the new global and, for a
    replay, the replayed optimizer state, carried precision and memory, for the strategy to
    adopt), the report, and for a replay the rewritten history and the remaining clients'
    records (``Ledger.commit_removal`` stores them)."""

    state: ServerState
    report: dict
    history: list[HistoryRound] | None = None
    records: list[ClientRecord] = field(default_factory=list)


def remove_from_ledger(ledger: Ledger, client_id: str, **options) -> tuple[dict, dict]:
    """(new global state, report) after removing ``client_id`` from the newest checkpoint;
    the options are :func:`plan_removal`'s. Nothing on disk changes."""
    plan = plan_removal(ledger, client_id, **options)
    return dict(plan.state.global_state), plan.report


def plan_removal(
    ledger: Ledger,
    client_id: str,
    *,
    method: str = "replay",
    settings: RunSettings | None = None,
    prior_precision: float | None = None,
    recentring: float = RECENTRING,
    shared_rank: int = SHARED_RANK,
    approximate: bool = False,
    recenter: bool = True,
    revert_uninformed: bool = True,
    client_reply: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    corrections: Corrections | None = None,
) -> RemovalPlan:
    """Compute the removal of ``client_id`` from the newest checkpoint; nothing on disk
    changes (commit the plan with ``Ledger.commit_removal``).

    ``method``: "replay" (from the history) or "eq13" (see the module docstring).
    ``settings``: the run's (default: the ledger's, ``Ledger.settings``);
    ``prior_precision`` replaces its δ (and any server Fisher) by this H0. Replay:
    ``recentring`` is κ and ``shared_rank`` the rank of the other clients' update subspace
    (κ = 1 with ``shared_rank=0`` is exact for linear regression); ``approximate=True``
    replays the stored rounds even when the history does not reach back to the client's
    first round (its earlier influence stays; the report says so), instead of refusing;
    ``corrections`` asks remaining clients for exact updates (``fl_ugm.replay``). Eq. 13:
    ``client_reply`` is (Δ_t, F_t) the client just computed by fine-tuning from the newest
    checkpoint (online removal); without it the stored contribution is used,
    re-centred unless ``recenter=False``; ``revert_uninformed=False`` skips part 2.
    """
    if method not in REMOVAL_METHODS:
        raise LedgerError(f"removal method {method!r}; choose one of {REMOVAL_METHODS}.")
    settings = settings or ledger.settings()
    if prior_precision is not None:
        settings = dataclasses.replace(settings, prior_precision=prior_precision,
                                       server_fisher=None)
    if not settings.rule.uses_fisher:
        raise LedgerError(f"this ledger's run merged with {settings.merge!r}; client removal "
                          "needs a Fisher-weighted rule ('ugm' or 'fisher-averaging').")
    if not ledger.client_ids():
        raise LedgerError(f"the ledger at {ledger.directory} holds no client contributions.")
    if method == "replay":
        if client_reply is not None:
            raise LedgerError("a replay takes no reply of the removed client; its online "
                              "form asks the remaining clients (corrections=).")
        if not recentring > 0:
            raise LedgerError(f"recentring={recentring}; κ must be > 0 (1: the derivation).")
        if shared_rank < 0:
            raise LedgerError(f"shared_rank={shared_rank}; give 0 (off) or a rank > 0.")
        replayed = replay_without(ledger, client_id, settings, recentring=recentring,
                                  shared_rank=shared_rank, approximate=approximate,
                                  corrections=corrections)
        return RemovalPlan(replayed.state, replayed.report, replayed.history,
                           replayed.records)
    if corrections is not None:
        raise LedgerError("corrections are exact updates of a replay's rounds; "
                          "method='eq13' has none.")
    if settings.client_memory:
        raise LedgerError("this ledger's run used the client memory: a client's reply was "
                          "merged again in every later round, which the one-round eq13 update "
                          "cannot undo. Use method='replay'.")
    if settings.carried_precision:
        raise LedgerError("this ledger's run carried a precision across rounds, so each "
                          "round merged under another prior; the one-round eq13 update "
                          "assumes one. Use method='replay'.")
    if settings.moves_by_optimizer:
        raise LedgerError(f"this ledger's run used server {settings.server_optimizer} "
                          f"(server_lr, server_momentum = {settings.server_lr}, "
                          f"{settings.server_momentum}); the one-round eq13 update assumes "
                          "each merge was applied as is. Use method='replay'.")
    state, report = _eq13(ledger, client_id, settings, recenter=recenter,
                          revert_uninformed=revert_uninformed, client_reply=client_reply)
    return RemovalPlan(ServerState(state), report)


def _eq13(ledger: Ledger, client_id: str, settings: RunSettings, *, recenter: bool,
          revert_uninformed: bool, client_reply) -> tuple[dict[str, Tensor], dict]:
    """Eq. 13 + the revert of uninformed entries (module docstring)."""
    round_, state = ledger.global_state()
    record = ledger.client(client_id)
    params = _matching_params(state, record.delta, record.fisher, client_id)
    rest = fisher_of_others(ledger, client_id, state, like=record.fisher)
    prior_precision = settings.merge_prior(record.fisher, None)

    recentered = False
    if client_reply is not None:
        delta, fisher = client_reply
        _matching_params(state, delta, fisher, client_id)
    else:
        fisher = record.fisher
        delta = {k: record.delta[k] for k in fisher}
        in_history = record.round in ledger.history()
        recentered = recenter and (in_history or record.round - 1 in ledger.rounds())
        if recentered:  # the global the client started from: its round's history, if kept
            start = (ledger.history_round(record.round).start.global_state if in_history
                     else ledger.global_state(record.round - 1)[1])
            delta = recentred_delta(delta, fisher, {k: start[k] - params[k] for k in fisher},
                                    prior_precision)
    removed, reverted = removal_update(
        params, delta, fisher, rest, alpha=record.alpha, prior_precision=prior_precision,
        applied=record.applied if revert_uninformed and record.applied else None,
    )  # fmt: skip
    new_state = dict(state)
    new_state.update(removed)
    change = torch.sqrt(sum(((removed[k] - params[k]).double() ** 2).sum() for k in removed))
    report = {
        "client": client_id, "method": "eq13",
        "mode": "online" if client_reply is not None else "offline",
        "global_round": round_, "client_round": record.round, "alpha": record.alpha,
        "num_examples": record.num_examples, "recentered": recentered,
        "reverted_fraction": reverted,
        "prior_precision": prior_precision if isinstance(prior_precision, float) else "tensor",
        "update_l2_norm": float(change),
        "remaining_clients": [c for c in ledger.client_ids() if c != client_id],
    }  # fmt: skip
    return new_state, report


def fisher_of_others(
    ledger: Ledger, client_id: str, state: Mapping[str, Tensor], like: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Σ_{s≠t} α_s F_s over the ledger's other clients (each checked against ``state``), with
    the keys, shapes and dtypes of ``like`` (client t's Fisher)."""
    rest = {k: torch.zeros_like(v) for k, v in like.items()}
    for other in ledger.client_ids():
        if other != client_id:
            try:
                stored = ledger.client(other)
            except LedgerCorruptError as err:
                raise LedgerCorruptError(
                    f"removing client {client_id!r} needs the stored Fisher of every remaining "
                    f"client, and client {other!r}'s record cannot be read: {err}") from err
            _matching_params(state, stored.delta, stored.fisher, other)
            for key in rest:
                rest[key] += stored.alpha * stored.fisher[key].to(rest[key].dtype)
    return rest


def _matching_params(state, delta, fisher, client_id: str) -> dict[str, Tensor]:
    """The global's parameters that the client's Fisher covers; clear error on a mismatch."""
    for key, value in delta.items():
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            where = "missing from" if key not in state else "shaped differently in"
            raise LedgerError(
                f"client {client_id!r}'s stored delta['{key}'] is {where} the global "
                "checkpoint: the ledger mixes models."
            )
    return {k: state[k] for k in fisher}


def subtract_applied(ledger: Ledger, client_id: str) -> tuple[dict[str, Tensor], dict]:
    """(new global state, report): the newest checkpoint minus everything the merges added on
    behalf of ``client_id`` over all its rounds (the ledger's ``applied`` sum). Cruder than
    Eq. 13 (it ignores how later rounds built on those updates) but it covers every round,
    not only the client's last one."""
    round_, state = ledger.global_state()
    record = ledger.client(client_id)
    if not record.applied:
        raise LedgerError(f"client {client_id!r} has no accumulated updates in the ledger "
                          "(recorded by FedUGM with a ledger since fl_ugm 0.1).")
    params = _matching_params(state, record.applied, record.applied, client_id)
    new_state = dict(state)
    new_state.update({k: params[k] - record.applied[k].to(params[k].dtype) for k in params})
    report = {"client": client_id, "mode": "subtract-applied", "global_round": round_,
              "client_round": record.round}
    return new_state, report
