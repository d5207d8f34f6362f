"""Client removal inside a running Flower app: what ``FedUGM.remove`` does.

1. Read the newest global from the strategy's ledger.
2. ``method="eq13"`` with ``mode="online"``: send the client (found by its stable id; a QUERY
   if this run has not heard from it) a train message carrying that global and
   ``REMOVAL_KEY``; it fine-tunes as usual and its Δ_t, F_t feed the removal. Otherwise the
   ledger alone is used (``method="replay"`` replays its history; no client trains).
3. Compute the removal (``fl_ugm.removal.plan_removal``) with the run's merge rule and
   prior.
4. Commit it to the ledger in one step (``Ledger.commit_removal``: the new global, the
   rewritten history of a replay, the deleted record, the client's id in the removed list)
   and exclude the client from sampling for good.
5. Run ``repair_rounds`` ordinary FedUGM rounds with the remaining clients.

Any failure before step 4 raises :class:`RemovalError` and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from fl_ugm.ledger import LedgerError
from fl_ugm.protocol import InvalidReply, parse_ugm_reply, ugm_train_config
from fl_ugm.removal import RECENTRING, REMOVAL_METHODS, SHARED_RANK, plan_removal

if TYPE_CHECKING:
    from fl_ugm.strategy import FedUGM

#: Client removal: from the ledger alone, or with a fresh Δ_t, F_t from the client.
REMOVAL_MODES = ("offline", "online")
RemovalReport = dict[str, Any]


class RemovalError(RuntimeError):
    """A client removal could not be carried out; the global model and ledger are unchanged."""


def remove_client(
    strategy: FedUGM,
    grid: Grid,
    client_id: str,
    *,
    method: str = "replay",
    mode: str = "offline",
    recentring: float = RECENTRING,
    shared_rank: int = SHARED_RANK,
    repair_rounds: int = 0,
    train_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    timeout: float = 3600.0,
) -> tuple[ArrayRecord, RemovalReport]:
    """Remove ``client_id``'s contribution from the newest global in ``strategy``'s ledger,
    then run ``repair_rounds`` FL rounds without it (default 0: after a replay, one round
    of the remaining clients did not bring the model closer to retraining; see
    ``simulations.unlearn``). Returns (global, report).

    ``method``: "replay" (recompute the training without the client from the ledger's
    history) or "eq13" (the one-round update; ``mode="online"`` asks the client for a fresh
    Δ_t, F_t, "offline" uses its stored ones); ``recentring`` and ``shared_rank`` are the
    replay's knobs. See ``fl_ugm.removal``.

    ``evaluate_fn(round, arrays)`` (as in ``Strategy.start``) gives the report's metrics
    before and after; ``train_config`` is the repair rounds' train config. The report holds
    the client, mode, rounds, α, the L2 norm of the change, the fraction of entries
    reverted (``fl_ugm.removal``) and the seconds taken. Raises :class:`RemovalError`, with
    nothing changed, if the removal cannot be done.
    """
    ledger = strategy.ledger
    if ledger is None:
        raise RemovalError("FedUGM.remove needs the strategy's ledger; pass ledger=DIR.")
    if method not in REMOVAL_METHODS:
        raise RemovalError(f"removal method {method!r}; choose one of {REMOVAL_METHODS}.")
    if mode not in REMOVAL_MODES:
        raise RemovalError(f"removal mode {mode!r}; choose one of {REMOVAL_MODES}.")
    if method == "replay" and mode == "online":
        raise RemovalError("a replay removal needs no client: mode='online' is for "
                           "method='eq13'.")
    if repair_rounds < 0:
        raise RemovalError(f"repair_rounds={repair_rounds}; it must be ≥ 0.")
    removed = ledger.removed_clients()
    if client_id in removed:
        raise RemovalError(f"client {client_id!r} was already removed from this run (by the "
                           f"global of round {removed[client_id]}); nothing to do.")
    started = time.perf_counter()
    round_, state = ledger.global_state()
    strategy.current_arrays = state
    before = evaluate_fn(round_, ArrayRecord(state)) if evaluate_fn else None
    reply = (_online_contribution(strategy, grid, client_id, round_ + 1, timeout)
             if mode == "online" else None)
    prior = strategy.replay_prior()
    try:
        plan = plan_removal(ledger, client_id, method=method, prior_precision=prior,
                            recentring=recentring, shared_rank=shared_rank,
                            client_reply=reply)
    except (LedgerError, ValueError) as err:
        raise RemovalError(f"removing client {client_id!r} failed: {err} Nothing was "
                           "changed.") from err
    removal_round = round_ + 1
    ledger.commit_removal(client_id, removal_round, plan.state, history=plan.history,
                          records=plan.records)
    strategy.roster.exclude(client_id)
    strategy.server_state = plan.server_state  # the replayed optimizer state (() restarts it)
    strategy.carried = plan.carried  # the replayed carried precision (None: none)
    strategy.rebuild_memory()  # the remaining replies, as the rewritten history has them
    report = plan.report
    report.update(removal_round=removal_round, removal_seconds=time.perf_counter() - started)
    detail = (f"replayed rounds {report['replayed_rounds'][0]}–{report['replayed_rounds'][1]}"
              if method == "replay" else f"{100 * report['reverted_fraction']:.1f} % of the "
              f"entries reverted, {mode}")
    log(INFO, "removed client %r by %s from the round-%d global: |change| = %.4g (%s).",
        client_id, method, round_, report["update_l2_norm"], detail)
    new_state = plan.state

    arrays = ArrayRecord(new_state)
    for server_round in range(removal_round + 1, removal_round + 1 + repair_rounds):
        log(INFO, "[REPAIR ROUND %d/%d]", server_round - removal_round, repair_rounds)
        this_run = server_round - strategy.round_offset  # the strategy adds the offset
        messages = strategy.configure_train(this_run, arrays, ConfigRecord(
            dict(train_config or {})), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        repaired, _ = strategy.aggregate_train(this_run, replies)
        arrays = repaired if repaired is not None else arrays
    final_round = removal_round + repair_rounds
    report.update(
        repair_rounds=repair_rounds, final_round=final_round,
        seconds=time.perf_counter() - started,
        metrics_before=dict(before) if before is not None else None,
        metrics_after=dict(evaluate_fn(final_round, arrays)) if evaluate_fn else None,
    )  # fmt: skip
    return arrays, report


def _online_contribution(strategy: FedUGM, grid: Grid, client_id: str, server_round: int,
                         timeout: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Ask the client to fine-tune from the current global; its validated (Δ_t, F_t)."""
    roster = strategy.roster
    if client_id not in roster.node_of:
        roster.discover(grid, timeout=timeout)
    node = roster.node_of.get(client_id)
    if node is None:
        raise RemovalError(
            f"no connected node identifies as client {client_id!r}, so it cannot take part in "
            "an online removal; use mode='offline' (ledger only)."
        )
    config = ugm_train_config(ConfigRecord({"server-round": server_round}),
                              fisher=strategy.fisher, prior_precision=strategy.prior_precision,
                              removal=True)  # float32: one reply, exactness matters
    content = RecordDict({strategy.arrayrecord_key: ArrayRecord(strategy.current_arrays),
                          strategy.configrecord_key: config})
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
    replies = list(grid.send_and_receive([message], timeout=timeout))
    if not replies or replies[0].has_error():
        why = replies[0].error.reason if replies else f"no reply within {timeout:.0f} s"
        raise RemovalError(f"online removal of client {client_id!r} failed: {why}. Nothing "
                           "was changed; retry, or use mode='offline'.")
    try:
        update = parse_ugm_reply(replies[0].content, strategy.current_arrays, node_id=node,
                                 weighted_by_key=strategy.weighted_by_key)
    except InvalidReply as err:
        raise RemovalError(f"client {client_id!r}'s removal reply is invalid: {err}") from err
    if update.client_id != client_id:
        raise RemovalError(f"node {node} answered the removal request of client {client_id!r} "
                           f"as client {update.client_id!r}; nothing was changed.")
    return {k: update.delta[k] for k in update.fisher}, update.fisher
