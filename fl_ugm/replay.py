"""Replay removal: the training recomputed without a client from the ledger's history (no
Flower here; ``fl_ugm.removal.plan_removal`` is the entry point).

Round by round, from the first stored round, the replay keeps the difference
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

Two knobs adapt the derivation's quadratic model to nets (docs/removal.md has why and the
measurements they were chosen on):

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

**Corrections** (:class:`Corrections`, online removal): at rounds chosen by a policy within
a budget of client trainings, the round's remaining participants train again from the
replayed start θ'_r and their exact replies replace the re-centred estimates (the round is
then what retraining would merge, up to the clients' local randomness). Each exact reply
also gives one measured response of that client to a start offset: the pair
(D_r, Δ_exact − Δ'_estimate). With ``calibrate``, a later estimate of the client adds the
multi-secant prediction Y c, c = (SᵀS)⁺ Sᵀ D, from its last ``pairs`` such pairs
(FedRecover's idea, Cao et al. 2023, with a secant model of the re-centring's residual
rather than of the whole response, so that where the re-centring is exact the pairs are zero
and change nothing), with ‖c‖₁ ≤ 1: the drift grows over the rounds, and a response
measured at a small offset, extrapolated linearly to a large one, wrecked the model (a
periodic correction at round 2 drove the replay 19 points below retraining).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fl_ugm.contribution import like_tensors
from fl_ugm.engine import (
    Contribution,
    HistoryRound,
    RememberedClient,
    RunSettings,
    ServerState,
    step,
)
from fl_ugm.ledger import ClientRecord, Ledger, LedgerError
from fl_ugm.memory import ClientMemory
from fl_ugm.merge import PriorPrecision, recentred_delta

log = logging.getLogger(__name__)
#: κ, the replay's re-centring prior as a fraction of H0 (1: the derivation's quadratic model,
#: exact for linear regression; the default was chosen on nets, docs/removal.md).
RECENTRING = 1e-3
#: Rank of the other clients' update subspace per row; the removed client's accumulated
#: update outside it is not re-centred (0: off; see the module docstring).
SHARED_RANK = 10
#: Which rounds a corrected replay asks for exact updates: the first rounds after the removed
#: client joined, evenly spaced ones, the rounds whose start drifted most from the record
#: (found by a first replay without corrections), or the last rounds (the default: a
#: correction's effect is not overwritten by later estimated rounds; docs/removal.md).
CORRECTION_POLICIES = ("early", "periodic", "largest-drift", "final")

#: (round, the replayed start global in the model's dtypes, client ids) → the exact
#: contribution of each client that answered, trained from that start.
ExactUpdates = Callable[[int, Mapping[str, Tensor], Sequence[str]], Mapping[str, Contribution]]


@dataclass(frozen=True)
class Corrections:
    """Exact client updates for a replay: ``exact_updates`` trains the remaining clients of a
    round from the replayed start; ``budget`` caps the client trainings asked for (one per
    client per corrected round); ``policy`` (:data:`CORRECTION_POLICIES`) picks the rounds;
    ``calibrate`` adds the multi-secant correction of the re-centring from the last
    ``pairs`` measured pairs per client (module docstring)."""

    exact_updates: ExactUpdates
    budget: int
    policy: str = "final"
    calibrate: bool = False
    pairs: int = 2

    def __post_init__(self) -> None:
        if self.policy not in CORRECTION_POLICIES:
            raise LedgerError(f"correction policy {self.policy!r}; choose one of "
                              f"{CORRECTION_POLICIES}.")
        if self.budget < 0 or self.pairs < 1:
            raise LedgerError(f"correction budget={self.budget} and pairs={self.pairs}; the "
                              "budget (client trainings) must be ≥ 0 and pairs ≥ 1.")


def correction_rounds(policy: str, budget: int, costs: Mapping[int, int],
                      drift: Mapping[int, float] | None = None) -> list[int]:
    """The rounds to correct (ascending): ``costs`` maps each eligible round to its client
    trainings; rounds are taken in the ``policy``'s order while they fit in ``budget``
    (``drift``, each round's start drift ‖D_r‖, orders "largest-drift"; "periodic" takes
    only evenly spaced rounds, as many as the budget pays for at the mean cost)."""
    rounds = sorted(r for r, cost in costs.items() if cost > 0)
    if policy == "final":
        rounds.reverse()
    elif policy == "largest-drift":
        rounds.sort(key=lambda r: -(drift or {}).get(r, 0.0))
    elif policy == "periodic" and rounds:  # evenly spaced over the eligible rounds
        mean_cost = sum(costs[r] for r in rounds) / len(rounds)
        count = min(len(rounds), max(1, int(budget // mean_cost)))
        rounds = [rounds[(i * len(rounds)) // count] for i in range(count)]
    chosen, left = [], budget
    for round_ in rounds:
        if costs[round_] <= left:
            chosen.append(round_)
            left -= costs[round_]
    return sorted(chosen)


class SecantResponse:
    """Per client, the last ``pairs`` measured (start offset, residual of the estimate)
    pairs, flattened over the parameter keys in float64; :meth:`predict` gives the residual
    of a new offset d as Y c with c = (SᵀS)⁺ Sᵀ d scaled down to ‖c‖₁ ≤ 1 (zero for d
    outside the pairs' span; at most a convex mix of the measured residuals and their
    negatives)."""

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs
        self._seen: dict[str, list[tuple[Tensor, Tensor]]] = {}

    @staticmethod
    def _flat(tensors: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
        return torch.cat([tensors[k].double().reshape(-1) for k in keys])

    def add(self, client_id: str, offset: Mapping[str, Tensor], residual: Mapping[str, Tensor]
            ) -> None:
        keys = sorted(residual)
        s, y = self._flat(offset, keys), self._flat(residual, keys)
        if float(s.norm()) > 0:
            self._seen[client_id] = [*self._seen.get(client_id, []), (s, y)][-self.pairs:]

    def predict(self, client_id: str, offset: Mapping[str, Tensor],
                like: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """The predicted residual with the keys and shapes of ``like``, or None (no pairs)."""
        seen = self._seen.get(client_id)
        if not seen:
            return None
        keys = sorted(like)
        s = torch.stack([p[0] for p in seen], dim=1)  # parameters × pairs
        y = torch.stack([p[1] for p in seen], dim=1)
        coefficients = torch.linalg.pinv(s.T @ s) @ (s.T @ self._flat(offset, keys))
        # interpolate, never extrapolate: a nonlinear response measured at a small offset
        # says nothing about ten times that offset
        coefficients = coefficients / max(1.0, float(coefficients.abs().sum()))
        flat, out, at = y @ coefficients, {}, 0
        for key in keys:
            out[key] = flat[at:at + like[key].numel()].reshape(like[key].shape)
            at += like[key].numel()
        return out


@dataclass
class ReplayResult:
    """The replay's server state without the client, its report, the rewritten history and
    the remaining clients' updated records (``fl_ugm.removal.RemovalPlan`` carries them)."""

    state: ServerState
    report: dict
    history: list[HistoryRound]
    records: list[ClientRecord]


def replay_without(ledger: Ledger, client_id: str, settings: RunSettings, *,
                   recentring: float, shared_rank: int, approximate: bool,
                   corrections: Corrections | None = None) -> ReplayResult:
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
    if corrections is not None and settings.client_dual_step:
        raise LedgerError("this ledger's run kept client dual variables: a client retrained "
                          "for a correction cannot reproduce its dual of that round. Replay "
                          "without corrections.")
    own = _own_directions(ledger, record, rounds, shared_rank) if shared_rank else {}
    fold = _Fold(ledger, client_id, settings, newest, own, recentring)
    correct_at: list[int] = []
    if corrections is not None:
        costs = {r: sum(c not in (None, client_id) for c in ids)
                 for r, ids in ledger.history_clients().items() if first is None or r > first}
        drift = fold.run(rounds, None, set()).drift_norms \
            if corrections.policy == "largest-drift" else None
        correct_at = correction_rounds(corrections.policy, corrections.budget, costs, drift)
        fold = _Fold(ledger, client_id, settings, newest, own, recentring)
    fold.run(rounds, corrections, set(correct_at))

    float_keys = list(fold.drift)
    global_state = dict(newest)
    global_state.update({k: newest[k].double() + fold.drift[k] for k in float_keys})
    state = ServerState(global_state, fold.replayed.optimizer, fold.replayed.carried,
                        fold.replayed.memory).like(newest)
    records = [_updated_record(ledger.client(c), fold.latest.get(c),
                               fold.applied_change.get(c, {}))
               for c in ledger.client_ids() if c != client_id]
    change = torch.sqrt(sum((fold.drift[k] ** 2).sum() for k in float_keys))
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
        # rounds merged from re-centred estimates with a start that had drifted: what the
        # replay could not verify without the clients
        "estimated_rounds": [r for r, n in fold.drift_norms.items()
                             if n > 0 and r not in correct_at],
        "start_drift": dict(fold.drift_norms),  # ‖D_r‖ (float64 L2) at each round's start
        "replay_seconds": time.perf_counter() - started,
        "remaining_clients": [c for c in ledger.client_ids() if c != client_id],
    }  # fmt: skip
    if corrections is not None:
        report.update(mode="online", corrections={
            "policy": corrections.policy, "budget": corrections.budget,
            "rounds": correct_at, "client_trainings": fold.trainings,
            "unanswered": fold.unanswered, "calibrate": corrections.calibrate})
    return ReplayResult(state, report, fold.rewritten, records)


class _Fold:
    """One pass of the replay over the history (see :func:`replay_without`)."""

    def __init__(self, ledger: Ledger, client_id: str, settings: RunSettings,
                 newest: Mapping[str, Tensor], own: Mapping[str, Tensor], recentring: float):
        self.ledger, self.client_id, self.settings = ledger, client_id, settings
        self.newest, self.own, self.recentring = newest, own, recentring
        self.drift = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in newest.items()
                      if v.is_floating_point()}
        self.drift_norms: dict[int, float] = {}  # ‖D_r‖ at each round's start
        self.applied_change: dict[str, dict[str, Tensor]] = {}  # Σ (replayed − recorded)
        self.latest: dict[str, tuple[int, Contribution, float]] = {}  # last replayed round
        self.rewritten: list[HistoryRound] = []
        self.replayed = ServerState({})  # the replayed state after the previous round
        self.trainings, self.unanswered = 0, []

    def run(self, rounds: list[int], corrections: Corrections | None,
            correct_at: set[int]) -> _Fold:
        secant = SecantResponse(corrections.pairs) if corrections and corrections.calibrate \
            else None
        recorded_memory = ClientMemory()
        for index, round_ in enumerate(rounds):
            entry = self.ledger.history_round(round_)
            recorded = dataclasses.replace(entry.start.to(torch.float64), memory=recorded_memory)
            participants = [p.to(torch.float64) for p in entry.participants]
            # the run's own optimizer state and carried precision at the first replayed
            # round, or where the run restarted them; else the replay's own
            restart, before = index == 0, self.replayed
            start = ServerState(
                {k: v + self.drift[k] if k in self.drift else v
                 for k, v in recorded.global_state.items()},
                recorded.optimizer if restart or not recorded.optimizer else before.optimizer,
                recorded.carried if restart or not recorded.carried else before.carried,
                before.memory)
            self.drift_norms[round_] = math.sqrt(sum(float((d ** 2).sum())
                                                     for d in self.drift.values()))
            listed = [m.client_id for m in entry.remembered]
            try:
                recorded_after, recorded_round = step(self.settings, recorded, participants,
                                                      round_, remembered=listed)
            except KeyError as missing:
                raise LedgerError(_lost_reply(round_, missing.args[0], entry.remembered)
                                  ) from None
            for merged, stored in zip(recorded_round.remembered, entry.remembered, strict=True):
                if merged.reply_round != stored.reply_round:
                    raise LedgerError(_lost_reply(round_, stored.client_id, entry.remembered))
            kept = [i for i, p in enumerate(participants) if p.client_id != self.client_id]
            moved = _recentred([participants[i] for i in kept], self.drift, self.own,
                               self.recentring, self.settings, recorded.carried, start.carried)
            if round_ in correct_at:
                moved = self._corrected(round_, start, moved, corrections, secant)
            elif secant is not None:
                moved = [_shifted(item, secant.predict(item.client_id, self.drift,
                                                       item.fisher))
                         if item.client_id is not None else item for item in moved]
            self.replayed, replayed_round = step(
                self.settings, start, moved, round_,
                remembered=[c for c in listed if c != self.client_id])
            for key, drift in self.drift.items():
                drift += (self.replayed.global_state[key] - start.global_state[key]) - (
                    recorded_after.global_state[key] - recorded.global_state[key])
            recorded_memory = recorded_after.memory
            recorded_memory.keep_only_current()  # the earlier rounds' terms are not read again
            self.replayed.memory.keep_only_current()
            self.rewritten.append(HistoryRound(
                round_, ServerState(start.global_state, start.optimizer, start.carried).like(
                    self.newest), [item.like(self.newest) for item in moved],
                replayed_round.alphas, replayed_round.remembered))
            for j, (i, item) in enumerate(zip(kept, moved, strict=True)):
                if item.client_id is not None:  # the client's record follows the rewrite
                    change = self.applied_change.setdefault(item.client_id, {})
                    for key, value in replayed_round.shares[j].items():
                        change[key] = (change.get(key, 0) + value
                                       - recorded_round.shares[i][key])
                    self.latest[item.client_id] = (round_, item, replayed_round.alphas[j])
            if (index + 1) % max(len(rounds) // 10, 1) == 0:
                log.info("replay without client %r: round %d of %d", self.client_id,
                         index + 1, len(rounds))
        return self

    def _corrected(self, round_: int, start: ServerState, moved: list[Contribution],
                   corrections: Corrections, secant: SecantResponse | None
                   ) -> list[Contribution]:
        """``moved`` with the exact update of every client that answered."""
        asked = [item.client_id for item in moved if item.client_id is not None]
        exact = corrections.exact_updates(
            round_, like_tensors(start.global_state, self.newest), asked)
        self.trainings += sum(c in exact for c in asked)
        log.info("replay without client %r: round %d corrected by %d exact updates",
                 self.client_id, round_, sum(c in exact for c in asked))
        out = []
        for item in moved:
            answer = exact.get(item.client_id) if item.client_id is not None else None
            if answer is None:
                if item.client_id is not None:
                    self.unanswered.append([round_, item.client_id])
                out.append(item)
                continue
            answer = answer.to(torch.float64)
            if secant is not None:
                secant.add(item.client_id, self.drift,
                           {k: answer.delta[k] - item.delta[k] for k in item.fisher})
            out.append(answer)
        return out


def _shifted(item: Contribution, residual: Mapping[str, Tensor] | None) -> Contribution:
    if residual is None:
        return item
    return dataclasses.replace(item, delta={k: v + residual[k] if k in residual else v
                                            for k, v in item.delta.items()})


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
