"""Client removal inside a running Flower app: the plan behind ``FedUGM.remove``.

1. ``method="eq13"`` with ``mode="online"``: send the client (at the node its id is bound to;
   a QUERY if that node is gone) a train message carrying the newest global and
   ``REMOVAL_KEY``; it fine-tunes as usual and its Δ_t, F_t feed the removal.
   ``method="replay"`` with ``mode="online"``: the replay's corrections
   (``fl_ugm.replay.Corrections``): in the rounds its policy picks within
   ``correction_budget`` client trainings, the round's remaining clients get such a train
   message carrying the replayed start of that round, and their replies replace the
   re-centred estimates. Otherwise the ledger alone is used (no client trains).
2. Compute the removal (``fl_ugm.removal.plan_removal``) with the run's settings.

``FedUGM.remove`` then commits the plan to the ledger in one step (the new server state,
the rewritten history of a replay, the deleted record, the client's id in the removed
list), adopts the plan's server state, excludes the client for good and runs the repair
rounds. Any failure before the commit raises :class:`RemovalError` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from fl_ugm.engine import Contribution, RunSettings
from fl_ugm.ledger import Ledger, LedgerError
from fl_ugm.protocol import NUM_EXAMPLES_KEY, InvalidReply, parse_ugm_reply, ugm_train_config
from fl_ugm.removal import REMOVAL_METHODS, RemovalPlan, plan_removal
from fl_ugm.replay import RECENTRING, SHARED_RANK, Corrections
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
    correction_budget: int = 0,
    correction_policy: str = "final",
    calibrate: bool = False,
    train_config: ConfigRecord | None = None,
    timeout: float = 3600.0,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    weighted_by_key: str = NUM_EXAMPLES_KEY,
) -> RemovalPlan:
    """The removal of ``client_id`` from ``global_state`` (the ledger's newest), computed
    and not committed; ``removal_round`` is the round its result will be.

    ``method``: "replay" (the training recomputed without the client) or "eq13" (the
    one-round update). ``mode``: "offline" (the ledger alone) or "online": for eq13 the
    client fine-tunes once more from ``global_state``; for a replay the remaining clients
    retrain the rounds that ``correction_policy`` (``fl_ugm.replay.CORRECTION_POLICIES``)
    picks within ``correction_budget`` client trainings, and with ``calibrate`` their
    measured responses correct the re-centring of the other rounds. ``recentring`` (κ) and
    ``shared_rank``: the replay's re-centring (``fl_ugm.replay``). ``train_config`` goes
    into every train request; the record keys are the strategy's. Raises
    :class:`RemovalError` if it cannot be done."""
    if method not in REMOVAL_METHODS:
        raise RemovalError(f"removal method {method!r}; choose one of {REMOVAL_METHODS}.")
    if mode not in REMOVAL_MODES:
        raise RemovalError(f"removal mode {mode!r}; choose one of {REMOVAL_MODES}.")
    if correction_budget and not (method == "replay" and mode == "online"):
        raise RemovalError(f"correction_budget={correction_budget} asks remaining clients "
                           "to correct a replay: it needs method='replay', mode='online'.")
    if method == "replay" and mode == "online" and not correction_budget > 0:
        raise RemovalError("an online replay asks the remaining clients to correct it: give "
                           "correction_budget > 0 (client trainings), or use mode='offline'.")
    removed = ledger.removed_clients()
    if client_id in removed:
        raise RemovalError(f"client {client_id!r} was already removed from this run (by the "
                           f"global of round {removed[client_id]}); nothing to do.")

    def request(state: Mapping[str, Tensor], server_round: int) -> RecordDict:
        config = ConfigRecord({**dict(train_config or {}), "server-round": server_round})
        return RecordDict({arrayrecord_key: ArrayRecord(dict(state)),
                           configrecord_key: ugm_train_config(config, settings, removal=True)})

    reply = corrections = None
    if mode == "online" and method == "eq13":
        reply = _online_contribution(roster, grid, client_id,
                                     request(global_state, removal_round), global_state,
                                     timeout, weighted_by_key)
    elif mode == "online":
        def exact_updates(server_round: int, start: Mapping[str, Tensor],
                          client_ids: Sequence[str]) -> dict[str, Contribution]:
            return _exact_updates(roster, grid, client_ids, request(start, server_round),
                                  start, timeout, weighted_by_key)

        try:
            corrections = Corrections(exact_updates, correction_budget, correction_policy,
                                      calibrate)
        except LedgerError as err:
            raise RemovalError(str(err)) from err
    try:
        return plan_removal(ledger, client_id, method=method, settings=settings,
                            recentring=recentring, shared_rank=shared_rank, client_reply=reply,
                            corrections=corrections)
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


def _exact_updates(roster: ClientRoster, grid: Grid, client_ids: Sequence[str],
                   request: RecordDict, start: Mapping[str, Tensor], timeout: float,
                   weighted_by_key: str) -> dict[str, Contribution]:
    """The validated contributions of ``client_ids`` trained on ``request`` (one message
    each, in one exchange); a client that cannot be found, fails or replies invalidly is
    left out with a logged reason (the replay uses its estimate and reports it)."""
    nodes = {}
    for client in client_ids:
        node = roster.locate(grid, client)
        if node is None:
            log(WARNING, "replay correction: no connected node identifies as client %r; its "
                "re-centred estimate stays.", client)
        else:
            nodes[node] = client
    messages = [Message(content=request, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in nodes]
    exact = {}
    for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
        node = reply.metadata.src_node_id
        client = nodes.get(node)
        try:
            if reply.has_error():
                raise InvalidReply(reply.error.reason)
            parsed = parse_ugm_reply(reply.content, start, node_id=node,
                                     weighted_by_key=weighted_by_key)
            if parsed.client_id != client:
                raise InvalidReply(f"it answered as client {parsed.client_id!r}")
        except InvalidReply as err:
            log(WARNING, "replay correction: client %r (node %d) is left out: %s; its "
                "re-centred estimate stays.", client, node, err)
            continue
        exact[client] = parsed.contribution
    return exact
