"""Remove a client's contribution from the global model using the ledger (no Flower here).

Two methods (``remove_from_ledger(..., method=...)``; ``plan_removal`` also returns what a
commit needs):

**replay** recomputes the training without the client from the ledger's per-round history
(docs/design.md §1). Round by round, from the first stored round, it keeps the difference
D_r = θ'_r − θ_r between the replayed global and the recorded one; every remaining
participant's stored delta is re-centred to the replayed global with the quadratic model of
the derivation,

    Δ'_{s,r} = Δ_{s,r} − F_{s,r} / (κ·H0 + F_{s,r}) · D_r,

α is recomputed over the round's remaining participants, and the round is merged with the
run's rule and prior; D_{r+1} = D_r + (replayed step − recorded step). Both steps are the
round engine's (``fl_ugm.engine.step``), so whatever the run used replays with them: the
recorded step from the state the history stored with the round (and the memory its earlier
rounds leave), the replayed one from the replayed state (server optimizer, carried
precision, client memory: the remembered clients the history lists, but the removed one).
Storage round-off cancels to first order. The result: the newest global + D, the replayed
server state and the rewritten history (the training without the client, which the commit
stores in place of the old one). No client trains.

Two knobs adapt the derivation's quadratic model to nets (docs/design.md §1, "Removal by
replay", has why and the measurements they were chosen on):

* κ (``recentring``, default ``RECENTRING``) scales the re-centring prior. With κ = 1 a
  client that solves a quadratic local loss exactly under the prior (linear regression)
  gives exactly Δ'_{s,r}, and the replay equals retraining without the client through the
  same protocol, for any number of rounds and any participation. A net trained by a few SGD
  epochs ends where its data sets it, whatever its start, which a small κ models.
* ``shared_rank`` (default ``SHARED_RANK``): per row of each parameter tensor (one output
  unit; a vector is one row), the removed client's accumulated update (its ``applied`` sum)
  minus its projection on the top ``shared_rank`` principal directions of the other
  clients' per-round updates of that row estimates a direction no other client's data
  informs, which a diagonal Fisher cannot see; along it the drift is not re-centred. 0 turns
  it off (and, with κ = 1, restores the exact replay).

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
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fl_ugm.engine import (
    Contribution,
    HistoryRound,
    RememberedClient,
    RunSettings,
    ServerState,
    step,
)
from fl_ugm.ledger import ClientRecord, Ledger, LedgerCorruptError, LedgerError
from fl_ugm.memory import ClientMemory
from fl_ugm.merge import PriorPrecision, prior_at, recentred_delta, remove_client

log = logging.getLogger(__name__)
#: How a client is removed: recompute the training without it from the stored history, or
#: the paper's one-round update (Eq. 13 + the revert of uninformed entries).
REMOVAL_METHODS = ("replay", "eq13")
#: κ, the replay's re-centring prior as a fraction of H0 (1: the derivation's quadratic model,
#: exact for linear regression; the default was chosen on nets, docs/design.md §1).
RECENTRING = 1e-3
#: Rank of the other clients' update subspace per row; the removed client's accumulated
#: update outside it is not re-centred (0: off; see the module docstring).
SHARED_RANK = 10

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
) -> RemovalPlan:
    """Compute the removal of ``client_id`` from the newest checkpoint; nothing on disk
    changes (commit the plan with ``Ledger.commit_removal``).

    ``method``: "replay" (from the history) or "eq13" (see the module docstring).
    ``settings``: the run's (default: the ledger's, ``Ledger.settings``);
    ``prior_precision`` replaces its δ (and any server Fisher) by this H0. Replay:
    ``recentring`` is κ and ``shared_rank`` the rank of the other clients' update subspace
    (κ = 1 with ``shared_rank=0`` is exact for linear regression); ``approximate=True``
    replays the stored rounds even when the history does not reach back to the client's
    first round (its earlier influence stays; the report says so), instead of refusing.
    Eq. 13: ``client_reply`` is (Δ_t, F_t) the client just computed by fine-tuning from
    the newest checkpoint (online removal); without it the stored contribution is used,
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
            raise LedgerError("a replay needs no client reply: online removal is for "
                              "method='eq13'.")
        if not recentring > 0:
            raise LedgerError(f"recentring={recentring}; κ must be > 0 (1: the derivation).")
        if shared_rank < 0:
            raise LedgerError(f"shared_rank={shared_rank}; give 0 (off) or a rank > 0.")
        return _replay(ledger, client_id, settings, recentring=recentring,
                       shared_rank=shared_rank, approximate=approximate)
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


def _replay(ledger: Ledger, client_id: str, settings: RunSettings, *, recentring: float,
            shared_rank: int, approximate: bool) -> RemovalPlan:
    """Replay removal (module docstring): two folds of ``fl_ugm.engine.step`` in lockstep,
    the recorded rounds and the rounds without the client, in float64."""
    started = time.perf_counter()
    record = ledger.client(client_id)  # a clear error for an unknown or removed client
    rounds = ledger.history()
    if not rounds:
        raise LedgerError(f"the ledger at {ledger.directory} holds no per-round history "
                          "(recorded before fl_ugm kept one, or cleared by a removal that did "
                          "not replay); use method='eq13'.")
    first = ledger.first_round(client_id)
    reaches_back = first is None or first >= rounds[0]
    if not reaches_back and not approximate:
        raise LedgerError(
            f"client {client_id!r} first contributed in round {first}, but the history starts "
            f"at round {rounds[0]} (history_rounds={ledger.history_rounds}), so a replay "
            "cannot remove all of its influence. Pass approximate=True (fl-ugm remove "
            "--approximate) to replay the stored rounds only, or use method='eq13'.")
    newest_round, newest = ledger.global_state()
    unexplained = sorted(set(range(rounds[-1] + 1, newest_round + 1))
                         - set(ledger.replay_removal_rounds()))
    if unexplained:
        raise LedgerError(f"the history ends at round {rounds[-1]} but the newest global is of "
                          f"round {newest_round}; rounds {unexplained} are not in it.")
    float_keys = [k for k, v in newest.items() if v.is_floating_point()]
    drift = {k: torch.zeros(newest[k].shape, dtype=torch.float64) for k in float_keys}
    applied_change: dict[str, dict[str, Tensor]] = {}  # Σ (replayed − recorded) shares
    latest: dict[str, tuple[int, Contribution, float]] = {}  # each one's last replayed round
    rewritten: list[HistoryRound] = []
    own = _own_directions(ledger, record, rounds, shared_rank) if shared_rank else {}
    recorded_memory = ClientMemory()
    replayed = ServerState({})  # the replayed state after the previous round
    for index, round_ in enumerate(rounds):
        entry = ledger.history_round(round_)
        recorded = dataclasses.replace(entry.start.to(torch.float64), memory=recorded_memory)
        participants = [p.to(torch.float64) for p in entry.participants]
        # the run's own optimizer state and carried precision at the first replayed round,
        # or where the run restarted them; else the replay's own
        restart = index == 0
        start = ServerState(
            {k: v + drift[k] if k in drift else v for k, v in recorded.global_state.items()},
            recorded.optimizer if restart or not recorded.optimizer else replayed.optimizer,
            recorded.carried if restart or not recorded.carried else replayed.carried,
            replayed.memory)
        listed = [m.client_id for m in entry.remembered]
        try:
            recorded_after, recorded_round = step(settings, recorded, participants, round_,
                                                  remembered=listed)
        except KeyError as missing:
            raise LedgerError(_lost_reply(round_, missing.args[0], entry.remembered)) from None
        for merged, stored in zip(recorded_round.remembered, entry.remembered, strict=True):
            if merged.reply_round != stored.reply_round:
                raise LedgerError(_lost_reply(round_, stored.client_id, entry.remembered))
        kept = [i for i, p in enumerate(participants) if p.client_id != client_id]
        moved = _recentred([participants[i] for i in kept], drift, own, recentring,
                           settings, recorded.carried, start.carried)
        replayed, replayed_round = step(settings, start, moved, round_,
                                        remembered=[c for c in listed if c != client_id])
        for key in float_keys:
            drift[key] += (replayed.global_state[key] - start.global_state[key]) - (
                recorded_after.global_state[key] - recorded.global_state[key])
        recorded_memory = recorded_after.memory
        recorded_memory.keep_only_current()  # the earlier rounds' terms are not read again
        replayed.memory.keep_only_current()
        rewritten.append(HistoryRound(
            round_, ServerState(start.global_state, start.optimizer, start.carried).like(newest),
            [item.like(newest) for item in moved], replayed_round.alphas,
            replayed_round.remembered))
        for j, (i, item) in enumerate(zip(kept, moved, strict=True)):
            if item.client_id is not None:  # the client's record follows the rewrite
                change = applied_change.setdefault(item.client_id, {})
                for key, value in replayed_round.shares[j].items():
                    change[key] = change.get(key, 0) + value - recorded_round.shares[i][key]
                latest[item.client_id] = (round_, item, replayed_round.alphas[j])
        if (index + 1) % max(len(rounds) // 10, 1) == 0:
            log.info("replay without client %r: round %d of %d", client_id, index + 1,
                     len(rounds))
    global_state = dict(newest)
    global_state.update({k: newest[k].double() + drift[k] for k in float_keys})
    state = ServerState(global_state, replayed.optimizer, replayed.carried,
                        replayed.memory).like(newest)
    records = [_updated_record(ledger.client(c), latest.get(c), applied_change.get(c, {}))
               for c in ledger.client_ids() if c != client_id]
    change = torch.sqrt(sum((drift[k] ** 2).sum() for k in float_keys))
    prior = settings.rule.prior(settings.base_prior(record.fisher))
    report = {
        "client": client_id, "method": "replay", "mode": "offline",
        "global_round": newest_round, "client_round": record.round, "alpha": record.alpha,
        "num_examples": record.num_examples, "replayed_from_round": rounds[0],
        "replayed_to_round": rounds[-1], "recentring": recentring, "shared_rank": shared_rank,
        "client_first_round": first, "approximate": not reaches_back,
        "history_dtype": ledger.history_dtype,
        "prior_precision": prior if isinstance(prior, float) else "tensor",
        "server_lr": settings.server_lr, "server_momentum": settings.server_momentum,
        "update_l2_norm": float(change), "reverted_fraction": 0.0,
        "replay_seconds": time.perf_counter() - started,
        "remaining_clients": [c for c in ledger.client_ids() if c != client_id],
    }  # fmt: skip
    return RemovalPlan(state, report, rewritten, records)


def _recentred(participants: list[Contribution], drift: Mapping[str, Tensor],
               own: Mapping[str, Tensor], recentring: float, settings: RunSettings,
               carried: Mapping[str, Tensor] | None,
               replayed_carried: Mapping[str, Tensor] | None) -> list[Contribution]:
    """The remaining participants' contributions moved to the replayed start, θ + D: the
    quadratic model's answer (``fl_ugm.merge.recentred_delta``) with κ·H0 of the recorded
    round and κ·H0' of the replayed one (they differ with a carried precision), but not
    along the removed client's own directions ``own`` (module docstring)."""
    if not participants:
        return []
    keys = list(participants[0].fisher)
    offset = {k: -v for k, v in _without(drift, own).items()}
    prior = _scaled(settings.merge_prior(keys, carried), recentring)
    replayed_prior = _scaled(settings.merge_prior(keys, replayed_carried), recentring)
    return [dataclasses.replace(item, delta=recentred_delta(item.delta, item.fisher, offset,
                                                            prior, replayed_prior))
            for item in participants]


def _scaled(prior: PriorPrecision, factor: float) -> PriorPrecision:
    return ({k: factor * v for k, v in prior.items()} if isinstance(prior, Mapping)
            else factor * prior)


def _lost_reply(round_: int, client_id: str, remembered: Sequence[RememberedClient]) -> str:
    reply_round = next((m.reply_round for m in remembered if m.client_id == client_id), "?")
    return (f"round {round_} merged client {client_id!r}'s remembered reply of round "
            f"{reply_round}, which the history does not hold (its first round is later, or the "
            "history was rewritten without it); a replay of a run with the client memory needs "
            "every round's history.")


def _own_directions(ledger: Ledger, record: ClientRecord, rounds: list[int],
                    rank: int) -> dict[str, Tensor]:
    """Per parameter key, one unit vector per row (a vector is one row): the removed client's
    accumulated update minus its projection on the top ``rank`` principal directions of the
    other clients' per-round updates of that row (float64; zero where nothing is left)."""
    others: dict[str, list[Tensor]] = {key: [] for key in record.applied}
    for round_ in rounds:
        for item in ledger.history_round(round_).participants:
            if item.client_id != record.client_id:
                for key in others:
                    others[key].append(item.delta[key].double().reshape(
                        _rows(item.delta[key]), -1))
    directions = {}
    for key, update in record.applied.items():
        own = update.double().reshape(_rows(update), -1)  # rows × columns
        residual = own
        if others[key]:
            stacked = torch.stack(others[key], dim=1)  # rows × updates × columns
            basis = torch.linalg.svd(stacked, full_matrices=False).Vh[:, :rank]
            residual = own - torch.einsum("rkc,rk->rc", basis,
                                          torch.einsum("rkc,rc->rk", basis, own))
        norm = residual.norm(dim=1, keepdim=True)
        left = norm > 1e-6 * own.norm(dim=1, keepdim=True)  # round-off is not a direction
        directions[key] = torch.where(left, residual / norm.clamp_min(1e-300), 0.0).reshape(
            update.shape)
    return directions


def _rows(tensor: Tensor) -> int:
    return tensor.shape[0] if tensor.dim() > 1 else 1


def _without(drift: Mapping[str, Tensor], directions: Mapping[str, Tensor]
             ) -> dict[str, Tensor]:
    """``drift`` minus, per row, its component along ``directions`` (the part re-centred)."""
    out = dict(drift)
    for key, unit in directions.items():
        rows = _rows(unit)
        d, u = drift[key].reshape(rows, -1), unit.reshape(rows, -1)
        out[key] = (d - (d * u).sum(1, keepdim=True) * u).reshape(drift[key].shape)
    return out


def _updated_record(record: ClientRecord, latest: tuple[int, Contribution, float] | None,
                    change: Mapping[str, Tensor]) -> ClientRecord:
    """A remaining client's record as of the rewritten history: its last replayed
    contribution (if the history holds one) and its ``applied`` sum corrected by the
    difference between the replayed and the recorded shares."""
    applied = {k: (v.double() + change[k]).to(v.dtype) if k in change else v
               for k, v in record.applied.items()}
    if latest is None:
        return dataclasses.replace(record, applied=applied)
    round_, item, alpha = latest
    return ClientRecord(record.client_id, round_, item.num_examples, alpha,
                        {k: v.to(record.delta[k].dtype) for k, v in item.delta.items()},
                        {k: v.to(record.fisher[k].dtype) for k, v in item.fisher.items()},
                        applied)


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
