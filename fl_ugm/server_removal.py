"""Client removal inside a running Flower app: the plan behind ``FedUGM.remove``.

1. ``method="eq13"`` with ``mode="online"``: send the client (at the node its id is bound to;
   a QUERY if that node is gone) a train message carrying the newest global and
   ``REMOVAL_KEY``; it fine-tunes as usual and its Δ_t, F_t feed the removal. Otherwise the
   ledger alone is used (``method="replay"`` replays its history; no client trains).
2. Compute the removal (``fl_ugm.removal.plan_removal``) with the run's settings.

``FedUGM.remove`` then commits the plan to the ledger in one step (the new server state,
the rewritten history of a replay, the deleted record, the client's id in the removed
list), adopts the plan's server state, excludes the client for good and runs the repair
rounds. Any failure before the commit raises :class:`RemovalError` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fl_ugm.engine import RunSettings
from fl_ugm.ledger import Ledger, LedgerError
from fl_ugm.protocol import NUM_EXAMPLES_KEY, InvalidReply, parse_ugm_reply, ugm_train_config
from fl_ugm.removal import RECENTRING, REMOVAL_METHODS, SHARED_RANK, RemovalPlan, plan_removal
from fl_ugm.roster import ClientRoster

#: Client removal: from the ledger alone, or with a fresh Δ_t, F_t from the client.
REMOVAL_MODES = ("offline", "online")
RemovalReport = dict[str, Any]


class RemovalError(RuntimeError):
    """A client removal could not be carried out; the global model and ledger are unchanged."""


def plan_client_removal(
    ledger: Ledger,
    settings: RunSettings,
    roster: ClientRoster,
    grid: Grid,
    client_id: str,
    global_state: Mapping[str, Tensor],
    removal_round: int,
    *,
    method: str = "replay",
    mode: str = "offline",
    recentring: float = RECENTRING,
    shared_rank: int = SHARED_RANK,
    timeout: float = 3600.0,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    weighted_by_key: str = NUM_EXAMPLES_KEY,
) -> RemovalPlan:
    """The removal of ``client_id`` from ``global_state`` (the ledger's newest), computed
    and not committed; ``removal_round`` is the round its result will be. ``method``,
    ``mode``, ``recentring`` and ``shared_rank`` as in ``FedUGM.remove``; the record keys
    are the strategy's. Raises :class:`RemovalError` if it cannot be done."""
    if method not in REMOVAL_METHODS:
        raise RemovalError(f"removal method {method!r}; choose one of {REMOVAL_METHODS}.")
    if mode not in REMOVAL_MODES:
        raise RemovalError(f"removal mode {mode!r}; choose one of {REMOVAL_MODES}.")
    if method == "replay" and mode == "online":
        raise RemovalError("a replay removal needs no client: mode='online' is for "
                           "method='eq13'.")
    removed = ledger.removed_clients()
    if client_id in removed:
        raise RemovalError(f"client {client_id!r} was already removed from this run (by the "
                           f"global of round {removed[client_id]}); nothing to do.")
    reply = None
    if mode == "online":
        request = RecordDict({
            arrayrecord_key: ArrayRecord(dict(global_state)),
            configrecord_key: ugm_train_config(
                ConfigRecord({"server-round": removal_round}), settings, removal=True)})
        reply = _online_contribution(roster, grid, client_id, request, global_state,
                                     timeout, weighted_by_key)
    try:
        return plan_removal(ledger, client_id, method=method, settings=settings,
                            recentring=recentring, shared_rank=shared_rank, client_reply=reply)
    except (LedgerError, ValueError) as err:
        raise RemovalError(f"removing client {client_id!r} failed: {err} Nothing was "
                           "changed.") from err


def _online_contribution(roster: ClientRoster, grid: Grid, client_id: str,
                         request: RecordDict, global_state: Mapping[str, Tensor],
                         timeout: float, weighted_by_key: str
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Send the client the removal ``request``; its validated (Δ_t, F_t)."""
    node = roster.locate(grid, client_id)
    if node is None:
        raise RemovalError(
            f"no connected node identifies as client {client_id!r}, so it cannot take part in "
            "an online removal; use mode='offline' (ledger only)."
        )
    message = Message(content=request, message_type=MessageType.TRAIN, dst_node_id=node)
    replies = list(grid.send_and_receive([message], timeout=timeout))
    if not replies or replies[0].has_error():
        why = replies[0].error.reason if replies else f"no reply within {timeout:.0f} s"
        raise RemovalError(f"online removal of client {client_id!r} failed: {why}. Nothing "
                           "was changed; retry, or use mode='offline'.")
    try:
        reply = parse_ugm_reply(replies[0].content, global_state, node_id=node,
                                weighted_by_key=weighted_by_key)
    except InvalidReply as err:
        raise RemovalError(f"client {client_id!r}'s removal reply is invalid: {err}") from err
    if reply.client_id != client_id:
        raise RemovalError(f"node {node} answered the removal request of client {client_id!r} "
                           f"as client {reply.client_id!r}; nothing was changed.")
    contribution = reply.contribution
    return {k: contribution.delta[k] for k in contribution.fisher}, dict(contribution.fisher)
