"""Which Flower node serves which client, and which clients must never train again.

Flower addresses nodes by ids that change when a SuperNode restarts; fl_ugm names clients by
the stable id their replies carry (``fl_ugm.protocol.CLIENT_ID_KEY``). The roster learns the
mapping from replies and, when it needs a node it has not heard from (an excluded client
to skip, a client to ask for an online removal), from QUERY messages that the ClientApp
answers with ``fl_ugm.client.handle_query``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_ugm.protocol import client_id_of_query_reply

#: How long a QUERY round may take (seconds), at most.
QUERY_TIMEOUT = 120.0


class ClientRoster:
    """Stable client ids ↔ node ids, and the excluded clients (removed ones, or ones a run
    leaves out): they are never sampled, and their replies are dropped.

    A client id is bound to the first node that used it (``bound``: bindings kept from an
    earlier run, e.g. in the ledger). Another node's claim to a bound id is refused while
    the bound node is connected (as the last sampling saw it, ``connected``); once it is gone
    (a SuperNode restarted without a persistent key, or a new SuperLink), the next claimant
    takes the id over. Under Flower's node authentication a node id stands for the node's
    key, so an id then stays with its key while that node is connected (docs/threat-model.md).
    """

    def __init__(self, excluded: Iterable[str] = (), bound: Mapping[str, int] | None = None
                 ) -> None:
        self.node_of: dict[str, int] = dict(bound or {})
        self.excluded: set[str] = set(excluded)
        self.connected: set[int] | None = None  # nodes connected at the last sampling
        self._queried: set[int] = set()  # nodes already asked for their client id
        self._reported_missing: set[str] = set()

    def claim(self, client_id: str, node_id: int) -> str | None:
        """Bind ``client_id`` to ``node_id`` if it may speak for it (the id is unbound,
        already its, or bound to a node that is gone) and return None; else the reason."""
        bound = self.node_of.get(client_id)
        if bound is not None and bound != node_id and (
                self.connected is None or bound in self.connected):
            return (f"client id {client_id!r} is bound to node {bound}, which is connected; "
                    f"node {node_id}'s claim to it is refused.")
        if bound is not None and bound != node_id:
            log(INFO, "client %r: its node %d is gone; node %d takes the id over.", client_id,
                bound, node_id)
        self.node_of[client_id] = node_id
        return None

    def exclude(self, client_id: str) -> None:
        """Never sample ``client_id`` again and drop its replies."""
        self.excluded.add(client_id)

    def excluded_nodes(self) -> set[int]:
        return {self.node_of[c] for c in self.excluded if c in self.node_of}

    def discover(self, grid: Grid, nodes: Iterable[int] | None = None,
                 timeout: float = QUERY_TIMEOUT) -> None:
        """Ask ``nodes`` (default: every connected node) for their client ids."""
        targets = sorted(set(grid.get_node_ids() if nodes is None else nodes))
        if not targets:
            return
        messages = [Message(content=RecordDict(), message_type=MessageType.QUERY,
                            dst_node_id=node) for node in targets]
        self._queried.update(targets)
        claims: dict[str, list[int]] = {}
        for reply in grid.send_and_receive(messages, timeout=min(timeout, QUERY_TIMEOUT)):
            client_id = client_id_of_query_reply(reply)
            if client_id is not None:
                claims.setdefault(client_id, []).append(reply.metadata.src_node_id)
        answered = sum(len(nodes) for nodes in claims.values())
        for client_id, nodes in claims.items():
            bound = self.node_of.get(client_id)
            if len(nodes) > 1 and bound not in nodes:
                log(WARNING, "nodes %s all answer as client %r; none is bound to it, so none "
                    "is taken for it.", sorted(nodes), client_id)
            elif len(nodes) == 1 or bound in nodes:
                reason = self.claim(client_id, bound if bound in nodes else nodes[0])
                if reason:
                    log(WARNING, "query: %s", reason)
        if answered < len(targets):
            log(WARNING, "%d of %d nodes did not answer the query for their client id; give "
                "the ClientApp a query handler (fl_ugm.client.handle_query) so that removed "
                "clients can be skipped and removed online.", len(targets) - answered,
                len(targets))

    def eligible(self, grid: Grid) -> _EligibleNodes:
        """A view of ``grid`` for node sampling (``get_node_ids`` only) without the excluded
        clients' nodes. Connected nodes it has not asked yet are queried first while some
        excluded client's node is unknown."""
        return _EligibleNodes(self, grid)

    def locate(self, grid: Grid, client_id: str) -> int | None:
        """The connected node that serves ``client_id`` (queried if its known node is gone),
        or None."""
        self.connected = set(grid.get_node_ids())
        if self.node_of.get(client_id) not in self.connected:
            self.discover(grid, [n for n in self.connected if n not in self._queried])
        node = self.node_of.get(client_id)
        return node if node in self.connected else None

    def _located(self, connected: Iterable[int]) -> set[str]:
        """The clients whose known node is connected."""
        connected = set(connected)
        return {c for c, node in self.node_of.items() if node in connected}

    def _locate_excluded(self, grid: Grid, connected: list[int]) -> None:
        unknown = self.excluded - self._located(connected)
        if not unknown:
            return
        fresh = [n for n in connected if n not in self._queried]
        if fresh:
            self.discover(grid, fresh)
        missing = unknown - self._located(connected) - self._reported_missing
        if missing:
            self._reported_missing |= missing
            log(INFO, "excluded client(s) %s: no connected node identifies as them (gone, or "
                "their ClientApp does not answer queries); any reply they send is dropped.",
                ", ".join(sorted(missing)))


class _EligibleNodes:
    """What Flower's ``sample_nodes`` needs of a Grid: the nodes that may be sampled."""

    def __init__(self, roster: ClientRoster, grid: Grid) -> None:
        self._roster, self._grid = roster, grid

    def get_node_ids(self) -> list[int]:
        connected = list(self._grid.get_node_ids())
        self._roster.connected = set(connected)
        self._roster._locate_excluded(self._grid, connected)
        skip = self._roster.excluded_nodes()
        return [node for node in connected if node not in skip]
