"""Which Flower node serves which client, and which clients must never train again.

Flower addresses nodes by ids that change when a SuperNode restarts; fl_ugm names clients by
the stable id their replies carry (``fl_ugm.protocol.CLIENT_ID_KEY``). The roster learns the
mapping from replies and, when it needs a node it has not heard from (an excluded client
to skip, a client to ask for an online removal), from QUERY messages that the ClientApp
answers with ``fl_ugm.client.handle_query``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_ugm.protocol import client_id_of_query_reply

#: How long a QUERY round may take (seconds), at most.
QUERY_TIMEOUT = 120.0


class ClientRoster:
    """Stable client ids ↔ node ids, and the excluded clients (removed ones, or ones a run
    leaves out): they are never sampled, and their replies are dropped."""

    def __init__(self, excluded: Iterable[str] = ()) -> None:
        self.node_of: dict[str, int] = {}
        self.excluded: set[str] = set(excluded)
        self._queried: set[int] = set()  # nodes already asked for their client id
        self._reported_missing: set[str] = set()

    def learn(self, client_id: str, node_id: int) -> None:
        """``client_id`` is served by ``node_id`` (from a reply that carried the id)."""
        self.node_of[client_id] = node_id

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
        answered = 0
        for reply in grid.send_and_receive(messages, timeout=min(timeout, QUERY_TIMEOUT)):
            client_id = client_id_of_query_reply(reply)
            if client_id is not None:
                self.learn(client_id, reply.metadata.src_node_id)
                answered += 1
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

    def _locate_excluded(self, grid: Grid, connected: list[int]) -> None:
        unknown = self.excluded - set(self.node_of)
        if not unknown:
            return
        fresh = [n for n in connected if n not in self._queried]
        if fresh:
            self.discover(grid, fresh)
        missing = unknown - set(self.node_of) - self._reported_missing
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
        self._roster._locate_excluded(self._grid, connected)
        skip = self._roster.excluded_nodes()
        return [node for node in connected if node not in skip]
