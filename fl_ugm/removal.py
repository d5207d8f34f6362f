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
run's rule and prior; D_{r+1} = D_r + (replayed step − recorded step), both steps merged
from the stored contributions, so storage round-off cancels to first order. A run with
server momentum or Adam (``fl_ugm.server_optimizer``) has both steps go through it: the
recorded one from the state the history stored with the round, the replayed one from the
replayed state. A run with the client memory (``fl_ugm.client_memory``) merged, besides
each round's participants, the remembered clients the history lists for the round: the
replay merges them too, each client's latest replayed contribution re-centred from its
replayed start to the replayed global, as the memory does. The result is the newest
global + D. No client trains. The plan also holds the rewritten history (the training as it
would have been without the client), which the commit stores in place of the old one.

Two knobs adapt the derivation's quadratic model to nets (chosen on
``simulations.unlearn``'s scenarios, seeds 0–2; docs/design.md §1 has the numbers):

* κ (``recentring``, default ``RECENTRING`` = 1e-3) scales the re-centring prior. With κ = 1,
  a client that solves a quadratic local loss exactly under the prior (linear regression)
  gives exactly Δ'_{s,r}, and the replay equals retraining without the client through the
  same protocol, for any number of rounds and any participation. Nets trained by a few SGD
  epochs behave otherwise: wherever a client's data carries any Fisher its endpoint is set
  by its data, not by where it started, although its Fisher at that endpoint (confident
  predictions) is small next to δ. With κ = 1 the replay lost 13–16 points of test accuracy
  against retraining on a backdoor; κ from 1e-2 to 1e-6 kept it.
* ``shared_rank`` (default ``SHARED_RANK`` = 10): a diagonal Fisher cannot see that a
  direction made of many informed coordinates is one no other client's data informs (a
  backdoor trigger drawn on pixels every digit uses). Per row of each parameter tensor (one
  output unit; a vector is one row), the removed client's accumulated update (its
  ``applied`` sum) minus its projection on the top ``shared_rank`` principal directions of
  the other clients' per-round updates of that row estimates such a direction; along it the
  drift is not re-centred (the others would not have moved there). 0 turns it off (and,
  with κ = 1, restores the exact replay).


**eq13** is the one-round update of the paper, in two parts, per coordinate (parameter
entry):

1. **Eq. 13** (docs/design.md §1), where the remaining clients' data informs the coordinate:

       θ₋t = θ − α_t (H0 + F_t) / (H0 + Σ_{s≠t} α_s F_s) · Δ_t

   *Online*, Δ_t and F_t come fresh from the client fine-tuning from the current θ (exact
   for linear regression). *Offline*, they are its last stored contribution, which started
   from θ_start (from the round's history, or the checkpoint before it), not from θ; by
   default the delta is re-centred to the current model with the same quadratic model the
   derivation uses (ℓ_t's Hessian ≈ F_t):

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
   FL: Δ_t and F_t are one round's, and once the global fits t's data they are ≈ 0 (a
   backdoor is exactly such a case). Measured in ``simulations.unlearn``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fl_ugm.client_memory import recentred_delta
from fl_ugm.ledger import (
    ClientRecord,
    Contribution,
    HistoryRound,
    Ledger,
    LedgerCorruptError,
    LedgerError,
    Remembered,
)
from fl_ugm.merge import PriorPrecision, carry_precision, prior_at, remove_client, with_carried
from fl_ugm.merge_rules import MergeRule, client_alphas, merge_round, merge_rule
from fl_ugm.server_optimizer import OptimizerState, server_update, uses_server_optimizer

log = logging.getLogger(__name__)
#: How a client is removed: recompute the training without it from the stored history, or
#: the paper's one-round update (Eq. 13 + the revert of uninformed entries).
REMOVAL_METHODS = ("replay", "eq13")
#: κ, the replay's re-centring prior as a fraction of H0 (1: the derivation's quadratic model,
#: exact for linear regression; the default was measured on nets, see the module docstring).
RECENTRING = 1e-3
#: Rank of the other clients' update subspace per row; the removed client's accumulated
#: update outside it is not re-centred (0: off; see the module docstring).
SHARED_RANK = 10

#: Σ_{s≠t} α_s F_s at or below this × H0 counts as "no remaining client informs it".
#: Measured on the unlearning benchmark: 1e-6 to 1e-3 give the same result.
UNINFORMED_FISHER = 1e-4


def removal_update(
    params: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    fisher_rest: Mapping[str, Tensor],
    *,
    alpha: float,
    prior_precision: PriorPrecision,
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
    """A computed removal: the new global, the report, and for a replay the rewritten
    history and the remaining clients' records (``Ledger.commit_removal`` stores them) and,
    for a run with a server optimizer, its replayed state (the strategy's to keep)."""

    state: dict[str, Tensor]
    report: dict
    history: list[HistoryRound] | None = None
    records: list[ClientRecord] = field(default_factory=list)
    server_state: OptimizerState = ()  # a replay's optimizer state after its last round
    carried: dict[str, Tensor] | None = None  # ... and its carried precision


def remove_from_ledger(ledger: Ledger, client_id: str, **options) -> tuple[dict[str, Tensor],
                                                                           dict]:
    """(new global state, report) after removing ``client_id`` from the newest checkpoint;
    the options are :func:`plan_removal`'s. Nothing on disk changes."""
    plan = plan_removal(ledger, client_id, **options)
    return plan.state, plan.report


def plan_removal(
    ledger: Ledger,
    client_id: str,
    *,
    method: str = "replay",
    prior_precision: PriorPrecision | None = None,
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
    ``prior_precision`` (H0) defaults to the one the run merged with: the ledger's stored δ
    (or per-tensor prior) through its stored merge rule (``fl_ugm.merge_rules``). Replay:
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
    rule = merge_rule(str(ledger.meta.get("merge", "ugm")))
    if not rule.uses_fisher:
        raise LedgerError(f"this ledger's run merged with {rule.name!r}; client removal needs a "
                          "Fisher-weighted rule ('ugm' or 'fisher-averaging').")
    if prior_precision is None:
        if "prior_precision" not in ledger.meta:
            raise LedgerError("no prior precision given and none stored in the ledger's meta; "
                              "pass the δ the run used.")
        prior_precision = rule.prior(ledger.prior() or float(ledger.meta["prior_precision"]))
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
        return _replay(ledger, client_id, rule, prior_precision, recentring=recentring,
                       shared_rank=shared_rank, approximate=approximate)
    if ledger.meta.get("client_memory"):
        raise LedgerError("this ledger's run used the client memory: a client's reply was "
                          "merged again in every later round, which the one-round eq13 update "
                          "cannot undo. Use method='replay'.")
    if float(ledger.meta.get("carried_precision", 0.0)):
        raise LedgerError("this ledger's run carried a precision across rounds, so each "
                          "round merged under another prior; the one-round eq13 update "
                          "assumes one. Use method='replay'.")
    if _steps(ledger):
        options = _optimizer_options(ledger)
        raise LedgerError(f"this ledger's run used server {options['optimizer']} (server_lr, "
                          f"server_momentum = {_server_optimizer(ledger)}); the one-round eq13 "
                          "update assumes each merge was applied as is. Use method='replay'.")
    return RemovalPlan(*_eq13(ledger, client_id, prior_precision, recenter=recenter,
                              revert_uninformed=revert_uninformed, client_reply=client_reply))


def _server_optimizer(ledger: Ledger) -> tuple[float, float]:
    """(η, β) of the ledger's run (1, 0 for a ledger written before server momentum)."""
    return (float(ledger.meta.get("server_lr", 1.0)),
            float(ledger.meta.get("server_momentum", 0.0)))


def _steps(ledger: Ledger) -> bool:
    """Whether the ledger's run moved the global by a server optimizer, not by the merge."""
    return (ledger.meta.get("server_optimizer", "momentum") == "adam"
            or uses_server_optimizer(*_server_optimizer(ledger)))


def _optimizer_options(ledger: Ledger) -> dict:
    server_lr, server_momentum = _server_optimizer(ledger)
    return {"optimizer": str(ledger.meta.get("server_optimizer", "momentum")),
            "server_lr": server_lr, "server_momentum": server_momentum}


def recorded_step(ledger: Ledger, round_: int, prior: PriorPrecision) -> dict[str, Tensor]:
    """θ⁺_r − θ_{r−1} of the ledger's round ``round_`` (before any server optimizer), merged
    again from its history with the run's rule and ``prior`` (float64, float keys): the
    participants, and the remembered clients' replies from their own rounds' history."""
    entry = ledger.history_round(round_)
    float_keys = [k for k, v in entry.start.items() if v.is_floating_point()]
    memory = {}
    for item in entry.remembered:
        old = ledger.history_round(item.reply_round)
        reply = next((p for p in old.participants if p.client_id == item.client_id), None)
        if reply is not None:
            memory[item.client_id] = (item.reply_round, reply,
                                      {k: old.start[k].double() for k in float_keys})
    start = {k: entry.start[k].double() for k in float_keys}
    rule = merge_rule(str(ledger.meta.get("merge", "ugm")))
    prior = rule.prior(with_carried(prior, {k: v.double() for k, v in entry.carried.items()}))
    participants = entry.participants + _from_memory(memory, entry.remembered, start, prior,
                                                     round_)
    step, _ = _merged_step(rule, start, participants, prior, [p.alpha for p in participants])
    return step


def _eq13(ledger: Ledger, client_id: str, prior_precision: PriorPrecision, *, recenter: bool,
          revert_uninformed: bool, client_reply) -> tuple[dict[str, Tensor], dict]:
    """Eq. 13 + the revert of uninformed entries (module docstring)."""
    round_, state = ledger.global_state()
    record = ledger.client(client_id)
    params = _matching_params(state, record.delta, record.fisher, client_id)
    rest = fisher_of_others(ledger, client_id, state, like=record.fisher)

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
            start = (ledger.history_round(record.round).start if in_history
                     else ledger.global_state(record.round - 1)[1])
            delta = {
                k: d - fisher[k] / (prior_at(prior_precision, k) + fisher[k])
                * (params[k] - start[k])
                for k, d in delta.items()
            }
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


def _replay(ledger: Ledger, client_id: str, rule: MergeRule, prior: PriorPrecision, *,
            recentring: float, shared_rank: int, approximate: bool) -> RemovalPlan:
    """Replay removal (module docstring)."""
    started = time.perf_counter()
    record = ledger.client(client_id)  # a clear error for an unknown or removed client
    rounds = ledger.history()
    if not rounds:
        raise LedgerError(
            f"the ledger at {ledger.directory} holds no per-round history (recorded before "
            "fl_ugm kept one, or cleared by a removal that did not replay); use "
            "method='eq13'.")
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
    mode = str(ledger.meta.get("alpha", "num-examples"))
    scale = float(ledger.meta.get("scale", 1.0))
    float_keys = [k for k, v in newest.items() if v.is_floating_point()]
    drift = {k: torch.zeros(newest[k].shape, dtype=torch.float64) for k in float_keys}
    applied_change: dict[str, dict[str, Tensor]] = {}  # Σ (replayed − recorded) shares
    latest: dict[str, tuple[int, Contribution]] = {}  # each remaining client's last round
    rewritten: list[HistoryRound] = []
    own = (_own_directions(ledger, record, rounds, shared_rank) if shared_rank else {})
    server_lr, server_momentum = _server_optimizer(ledger)
    steps, options = _steps(ledger), _optimizer_options(ledger)
    server_state: OptimizerState = ()  # the replayed optimizer state after the last round
    gamma = float(ledger.meta.get("carried_precision", 0.0))
    carried: dict[str, Tensor] | None = None  # the replayed carried precision C'_{r−1}
    # the client memory (``fl_ugm.client_memory``) as recorded and as replayed: each client's
    # latest (reply round, contribution, start global), float64
    recorded_memory: dict[str, tuple[int, Contribution, dict[str, Tensor]]] = {}
    replayed_memory: dict[str, tuple[int, Contribution, dict[str, Tensor]]] = {}
    for index, round_ in enumerate(rounds):
        entry = ledger.history_round(round_)
        start = {k: entry.start[k].double() for k in float_keys}
        replayed_start = {k: start[k] + drift[k] for k in float_keys}
        # the round's prior as recorded and as replayed (with a carried precision, each
        # run's own, the run's at the first replayed round or where the run restarted it)
        stored_carried = {k: v.double() for k, v in entry.carried.items()}
        round_prior = rule.prior(with_carried(prior, stored_carried))
        replayed_carried = stored_carried if index == 0 or not stored_carried else carried
        replayed_prior = rule.prior(with_carried(prior, replayed_carried))
        # the round as recorded, and as replayed: without the client, the others re-centred
        recorded, recorded_shares = _merged_step(
            rule, start, entry.participants + _from_memory(
                recorded_memory, entry.remembered, start, round_prior, round_),
            round_prior,
            [p.alpha for p in entry.participants] + [m.alpha for m in entry.remembered])
        kept = [i for i, p in enumerate(entry.participants) if p.client_id != client_id]
        recentred = [_recentred(entry.participants[i], _without(drift, own), round_prior,
                                recentring, replayed_prior if gamma else None) for i in kept]
        remembered = [m for m in entry.remembered if m.client_id != client_id] if kept else []
        merged = recentred + _from_memory(replayed_memory, remembered, replayed_start,
                                          replayed_prior, round_)
        alphas = client_alphas([p.num_examples for p in merged], mode, scale) if kept else []
        replayed, shares = _merged_step(rule, replayed_start, merged, replayed_prior, alphas)
        if gamma:  # C'_r = γ (C'_{r−1} + Σ α' F), as FedUGM carries it
            carried = carry_precision(replayed_carried, [p.fisher for p in recentred],
                                      alphas[:len(kept)], gamma)
        stored_state = tuple({k: v.double() for k, v in part.items()}
                             for part in entry.server_state)
        # the run's own state at the first replayed round, or where the run restarted it
        replayed_state = stored_state if index == 0 or not stored_state else server_state
        if steps:  # θ_r − θ_{r−1} from the merged step and the state
            recorded, _ = server_update(recorded, stored_state, server_round=round_, **options)
            server_state = replayed_state  # a round nobody is left in keeps both, as FedUGM
            if kept:
                replayed, server_state = server_update(replayed, replayed_state,
                                                       server_round=round_, **options)
        for key in float_keys:
            drift[key] += replayed[key] - recorded[key]
        participants = [Contribution(p.client_id, p.num_examples, a, p.delta, p.fisher, {})
                        for p, a in zip(recentred, alphas[:len(kept)], strict=True)]
        rewritten.append(HistoryRound.of(round_, {**entry.start, **{
            k: replayed_start[k].to(entry.start[k].dtype) for k in float_keys}}, participants,
            [_like(part, newest) for part in replayed_state], [
                Remembered(m.client_id, m.reply_round, a)
                for m, a in zip(remembered, alphas[len(kept):], strict=True)],
            _like(replayed_carried or {}, newest)))
        for i, item, share in zip(kept, participants, shares[:len(kept)], strict=True):
            if item.client_id is not None:  # the client's record follows the rewrite
                change = applied_change.setdefault(item.client_id, {})
                for key, value in share.items():
                    change[key] = change.get(key, 0) + value - recorded_shares[i][key]
                latest[item.client_id] = (round_, item)
                replayed_memory[item.client_id] = (round_, item, replayed_start)
        for item in entry.participants:
            if item.client_id is not None:
                recorded_memory[item.client_id] = (round_, item, start)
        if (index + 1) % max(len(rounds) // 10, 1) == 0:
            log.info("replay without client %r: round %d of %d", client_id, index + 1,
                     len(rounds))
    state = dict(newest)
    state.update({k: (newest[k].double() + drift[k]).to(newest[k].dtype) for k in float_keys})
    records = [_updated_record(ledger.client(c), latest.get(c), applied_change.get(c, {}))
               for c in ledger.client_ids() if c != client_id]
    change = torch.sqrt(sum((drift[k] ** 2).sum() for k in float_keys))
    report = {
        "client": client_id, "method": "replay", "mode": "offline",
        "global_round": newest_round, "client_round": record.round, "alpha": record.alpha,
        "num_examples": record.num_examples, "replayed_rounds": [rounds[0], rounds[-1]],
        "recentring": recentring, "shared_rank": shared_rank,
        "client_first_round": first, "approximate": not reaches_back,
        "history_dtype": ledger.history_dtype,
        "prior_precision": prior if isinstance(prior, float) else "tensor",
        "server_lr": server_lr, "server_momentum": server_momentum,
        "update_l2_norm": float(change), "reverted_fraction": 0.0,
        "replay_seconds": time.perf_counter() - started,
        "remaining_clients": [c for c in ledger.client_ids() if c != client_id],
    }  # fmt: skip
    return RemovalPlan(state, report, rewritten, records,
                       tuple(_like(part, newest) for part in server_state),
                       _like(carried, newest) if carried is not None else None)


def _like(tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` in the dtypes of the global ``state``'s entries."""
    return {k: v.to(state[k].dtype) for k, v in tensors.items()}


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


def _merged_step(rule: MergeRule, start: dict[str, Tensor], participants: list[Contribution],
                 prior: PriorPrecision, alphas: list[float]):
    """(merged − start per float key, each participant's parameter shares), in float64; a
    round without participants leaves the global where it was."""
    if not participants:
        return {k: torch.zeros_like(v) for k, v in start.items()}, []
    merged, shares = merge_round(
        rule, start, [{k: v.double() for k, v in p.delta.items()} for p in participants],
        [{k: v.double() for k, v in p.fisher.items()} for p in participants],
        [p.num_examples for p in participants], alphas=alphas,
        prior_precision=_double_prior(prior), with_shares=True)  # fmt: skip
    return {k: merged[k] - start[k] for k in start}, shares


def _from_memory(memory: Mapping[str, tuple[int, Contribution, dict[str, Tensor]]],
                 remembered: list[Remembered], current: Mapping[str, Tensor],
                 prior: PriorPrecision, round_: int) -> list[Contribution]:
    """The ``remembered`` clients' latest contributions in ``memory``, each re-centred from
    its start global to ``current`` under the merge's prior (``fl_ugm.client_memory``), as
    FedUGM merged (or, replayed, would have merged) them in round ``round_``."""
    out = []
    for item in remembered:
        reply_round, contribution, start = memory.get(item.client_id, (None, None, None))
        if reply_round != item.reply_round:
            raise LedgerError(
                f"round {round_} merged client {item.client_id!r}'s remembered reply of round "
                f"{item.reply_round}, which the history does not hold (its first round is "
                f"later, or the history was rewritten without it); a replay of a run with the "
                "client memory needs every round's history.")
        fisher = {k: v.double() for k, v in contribution.fisher.items()}
        delta = recentred_delta({k: v.double() for k, v in contribution.delta.items()}, fisher,
                                start, current, _double_prior(prior))
        out.append(Contribution(item.client_id, contribution.num_examples, item.alpha, delta,
                                fisher, {}))
    return out


def _recentred(item: Contribution, drift: Mapping[str, Tensor], prior: PriorPrecision,
               recentring: float, replayed_prior: PriorPrecision | None = None
               ) -> Contribution:
    """The participant's delta re-centred to the replayed global: Δ − F/(κ·H0 + F)·D for
    the parameters (buffers have no Fisher and keep their delta). Where the replayed round's
    prior H0' differs from the recorded H0 (a carried precision): ((κ·H0 + F)·Δ − F·D) /
    (κ·H0' + F), the quadratic model's fine-tune under H0' from the replayed global."""
    delta = {}
    for key, value in item.delta.items():
        value = value.double()
        if key in item.fisher:
            fisher = item.fisher[key].double()
            h0 = recentring * _double_value(prior_at(prior, key))
            if replayed_prior is None:
                value = value - fisher / (h0 + fisher) * drift[key]
            else:
                replayed_h0 = recentring * _double_value(prior_at(replayed_prior, key))
                value = ((h0 + fisher) * value - fisher * drift[key]) / (replayed_h0 + fisher)
        delta[key] = value
    return Contribution(item.client_id, item.num_examples, item.alpha, delta,
                        {k: v.double() for k, v in item.fisher.items()}, {})


def _updated_record(record: ClientRecord, latest: tuple[int, Contribution] | None,
                    change: Mapping[str, Tensor]) -> ClientRecord:
    """A remaining client's record as of the rewritten history: its last replayed
    contribution (if the history holds one) and its ``applied`` sum corrected by the
    difference between the replayed and the recorded shares."""
    applied = {k: (v.double() + change[k]).to(v.dtype) if k in change else v
               for k, v in record.applied.items()}
    if latest is None:
        return ClientRecord(record.client_id, record.round, record.num_examples, record.alpha,
                            record.delta, record.fisher, applied)
    round_, item = latest
    like = record.delta
    return ClientRecord(record.client_id, round_, item.num_examples, item.alpha,
                        {k: v.to(like[k].dtype) for k, v in item.delta.items()},
                        {k: v.to(record.fisher[k].dtype) for k, v in item.fisher.items()},
                        applied)


def _double_value(value: float | Tensor) -> float | Tensor:
    return value.double() if isinstance(value, Tensor) else value


def _double_prior(prior: PriorPrecision) -> PriorPrecision:
    return {k: _double_value(v) for k, v in prior.items()} if isinstance(prior, Mapping) \
        else prior


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
