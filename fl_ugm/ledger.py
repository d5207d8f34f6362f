"""On-disk ledger of a run's client contributions, history and checkpoints, for client
removal and resume: storage only (the types are ``fl_ugm.engine``'s, the crash-safe files
``fl_ugm.storage``'s; docs/design.md §5 has the format). Under a stable id per client (never
Flower's ephemeral node id): its latest contribution and "applied" sum (``clients/``); the
global after each of the last rounds (``globals/``); the rest of the server state after the
last merged round (``state/``); each round as merged (``history/``). A round
(:meth:`Ledger.record_round`) and a removal (:meth:`Ledger.commit_removal`) are one commit
each: a crash leaves the ledger before or after, never between. A ledger belongs to one run:
its settings and its model are stored on first use, and a run with others is refused.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fl_ugm.engine import (
    CLIENT_ID_PATTERN,
    Contribution,
    HistoryRound,
    RememberedClient,
    RoundResult,
    RunSettings,
    ServerState,
)
from fl_ugm.memory import ClientMemory, TermStore
from fl_ugm.storage import (
    FOLDERS,
    INDEX,
    LedgerCorruptError,
    LedgerError,
    LedgerLockedError,
    LedgerMismatchError,
    Store,
    difference,
    group,
    signature,
    write_atomically,
)

__all__ = ["ClientRecord", "Ledger", "LedgerCorruptError", "LedgerError",
           "LedgerLockedError", "LedgerMismatchError", "write_atomically"]

FORMAT_VERSION = 1
#: Storage dtypes of the per-round history's deltas and Fishers ("as-sent": the dtype the
#: replies decode to; the start globals are always kept as they are).
HISTORY_DTYPES = {"as-sent": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
#: The optimizer state's parts as stored: m (momentum, Adam's first moment), Adam's v.
_OPTIMIZER_PARTS = ("momentum", "second-moment")


@dataclass(frozen=True)
class ClientRecord:
    """A client's latest stored contribution (from ``round``, merged with weight ``alpha``)
    and ``applied``: Σ over the rounds it replied in of what the merges added for it."""

    client_id: str
    round: int
    num_examples: float
    alpha: float
    delta: dict[str, Tensor]
    fisher: dict[str, Tensor]
    applied: dict[str, Tensor]

    @property
    def contribution(self) -> Contribution:
        return Contribution(self.client_id, self.num_examples, self.delta, self.fisher)


class Ledger:
    """Persistent per-client contributions, the run's history and the last ``keep_globals``
    global states.

    ``directory`` is created if missing (``create=False``, for readers such as ``fl-ugm
    remove``: a missing directory or index is an error). ``keep_globals`` ≥ 1: the global
    checkpoints kept. ``history_rounds``: rounds of history kept (0: every round, a new
    ledger's default; L: the last L). ``history_dtype``: the history's Δ and F in "as-sent"
    (the default: as decoded), "float32", "bfloat16" or "float16" (a replay from a dtype
    narrower than the global's is exact to its precision only). Both are stored when the
    ledger is created (None: the stored ones); a ledger opened with others is refused.
    """

    def __init__(self, directory: str | Path, *, keep_globals: int = 3,
                 create: bool = True, history_rounds: int | None = None,
                 history_dtype: str | None = None) -> None:
        if keep_globals < 1:
            raise LedgerError(f"keep_globals must be ≥ 1, got {keep_globals}.")
        if history_rounds is not None and history_rounds < 0:
            raise LedgerError(f"history_rounds={history_rounds}; give 0 (every round) or the "
                              "number of recent rounds to keep.")
        if history_dtype is not None and history_dtype not in HISTORY_DTYPES:
            raise LedgerError(f"history_dtype={history_dtype!r}; choose one of "
                              f"{tuple(HISTORY_DTYPES)}.")
        self.directory = Path(directory)
        self.keep_globals = keep_globals
        if not create and not self.directory.is_dir():
            raise LedgerError(f"the ledger directory {self.directory} does not exist.")
        self._store = Store(self.directory, {"version": FORMAT_VERSION, "clients": {},
                                             "globals": [], "meta": {}, "removed": {}},
                            FORMAT_VERSION)  # refuses data files without an index
        settings = {"history_rounds": history_rounds, "history_dtype": history_dtype}
        if (self.directory / INDEX).exists():
            self._check_history_settings({k: v for k, v in settings.items() if v is not None})
            return
        if not create:
            raise LedgerError(f"{self.directory} is not an fl_ugm ledger (it has no {INDEX}).")
        for folder in FOLDERS:
            (self.directory / folder).mkdir(parents=True, exist_ok=True)
        self._index["meta"].update(history_rounds=history_rounds or 0,
                                   history_dtype=history_dtype or "as-sent")
        self._store.commit([])  # a new ledger: its index and history settings, at once

    @property
    def _index(self) -> dict:
        return self._store.index

    # ------------------------------------------------------------------ queries

    @property
    def meta(self) -> dict:
        """Run settings stored with the ledger (e.g. ``prior_precision``)."""
        return dict(self._index.get("meta", {}))

    def settings(self) -> RunSettings:
        """The settings of the run this ledger records (its meta and per-tensor prior)."""
        return RunSettings.from_meta(self.meta, self.prior())

    def client_ids(self) -> list[str]:
        return sorted(self._index["clients"])

    @property
    def history_rounds(self) -> int:
        """Rounds of history kept: 0 = every round, L > 0 = the last L."""
        return int(self.meta.get("history_rounds", 0))

    @property
    def history_dtype(self) -> str:
        return str(self.meta.get("history_dtype", "as-sent"))

    def history(self) -> list[int]:
        """Rounds whose history is stored, oldest first."""
        return [entry["round"] for entry in self._index.get("history", [])]

    def history_clients(self) -> dict[int, list[str | None]]:
        """Each stored round's participants' client ids, oldest first (no tensors read)."""
        return {e["round"]: [c["id"] for c in e["clients"]] for e in self._index.get("history", [])}

    def history_round(self, round_: int) -> HistoryRound:
        """Round ``round_`` as merged (checksum verified)."""
        entry = next((e for e in self._index.get("history", []) if e["round"] == round_), None)
        if entry is None:
            raise LedgerError(f"no history for round {round_}; stored: {self.history()}.")
        tensors = self._store.load(entry["file"], entry["sha256"])
        participants = [Contribution(info["id"], info["num_examples"],
                                     group(tensors, f"c{i}/delta/"),
                                     group(tensors, f"c{i}/fisher/"))
                        for i, info in enumerate(entry["clients"])]
        remembered = [RememberedClient(m["id"], m["round"], m["alpha"])
                      for m in entry.get("remembered", [])]
        start = ServerState(group(tensors, "start/"), *_server_parts(tensors))
        return HistoryRound(round_, start, participants,
                            [info["alpha"] for info in entry["clients"]], remembered)

    def first_round(self, client_id: str) -> int | None:
        """The first round ``client_id`` contributed to (None if unknown)."""
        entry = self._index["clients"].get(client_id)
        return None if entry is None else entry.get("first_round", entry["round"])

    def prior(self) -> dict[str, Tensor] | None:
        """The run's per-tensor prior precision H0 (δ + the server's Fisher), if it had one."""
        entry = self._index.get("prior")
        return None if entry is None else self._store.load(entry["file"], entry["sha256"])

    def history_bytes(self) -> int:
        """Bytes of the stored history (every kept round)."""
        return sum(int(e.get("bytes", 0)) for e in self._index.get("history", []))

    def replay_removal_rounds(self) -> list[int]:
        """Rounds whose global is a replay removal's (the rewritten history leads there)."""
        return list(self._index.get("replay_rounds", []))

    def nodes(self) -> dict[str, int]:
        """The node each recorded client id is bound to (``fl_ugm.roster``)."""
        return {c: int(n) for c, n in self._index.get("nodes", {}).items()}

    def removed_clients(self) -> dict[str, int]:
        """Clients removed from this ledger's run, with the round whose global removed them;
        they are never recorded (nor, by FedUGM, sampled) again."""
        return dict(self._index.get("removed", {}))

    def rounds(self) -> list[int]:
        """Rounds whose global checkpoint is on disk, oldest first."""
        return [entry["round"] for entry in self._index["globals"]]

    def disk_usage(self) -> int:
        """Bytes used by the ledger's files."""
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())

    def client(self, client_id: str) -> ClientRecord:
        """The latest contribution of ``client_id`` (checksum verified)."""
        entry = self._index["clients"].get(client_id)
        if entry is None:
            if client_id in self.removed_clients():
                raise LedgerError(
                    f"client {client_id!r} was already removed from this ledger (by the global "
                    f"of round {self.removed_clients()[client_id]}); nothing of it is left.")
            known = ", ".join(self.client_ids()[:20]) or "none"
            raise LedgerError(f"unknown client id {client_id!r}; the ledger has: {known}.")
        tensors = self._store.load(entry["file"], entry["sha256"])
        return ClientRecord(client_id, entry["round"], entry["num_examples"], entry["alpha"],
                            group(tensors, "delta/"), group(tensors, "fisher/"),
                            group(tensors, "applied/"))

    def global_state(self, round_: int | None = None) -> tuple[int, dict[str, Tensor]]:
        """(round, state) of the given round's checkpoint, or of the newest one."""
        entries = self._index["globals"]
        if not entries:
            raise LedgerError(f"the ledger at {self.directory} holds no global checkpoint.")
        matches = [e for e in entries if round_ in (None, e["round"])]  # None: the newest
        if not matches:
            raise LedgerError(f"no global checkpoint for round {round_}; kept: "
                              f"{self.rounds()} (keep_globals={self.keep_globals}).")
        entry = matches[-1]
        return entry["round"], self._store.load(entry["file"], entry["sha256"])

    def resume_state(self, settings: RunSettings, excluded: Sequence[str] = (),
                     store: TermStore | None = None) -> tuple[int, ServerState] | None:
        """(newest round, the server state after it) to continue the run from, or None
        without a global: the stored optimizer state and carried precision (empty if not
        stored) and, with ``client_memory``, each client's record (its latest merged reply)
        but the ``excluded`` clients', remembered in ``store`` (None: in RAM)."""
        if not self._index["globals"]:
            return None
        round_, global_state = self.global_state()
        entry = self._index.get("server_state", {})  # of the newest round that merged
        parts = ((), None)
        if "file" in entry:
            parts = _server_parts(self._store.load(entry["file"], entry["sha256"]))
        memory = ClientMemory(store) if store is not None else ClientMemory()
        clients = self._index["clients"] if settings.client_memory else {}
        kept = sorted(set(clients) - set(excluded), key=lambda c: (clients[c]["round"], c))
        for reply_round, same in itertools.groupby(kept, key=lambda c: clients[c]["round"]):
            replies = [self.client(c).contribution for c in same]  # re-centred from the
            start = self.history_round(reply_round).start.global_state  # global they left
            memory = memory.remember(reply_round, start, replies,
                                     **settings.memory_options(replies[0].fisher))
        return round_, ServerState(global_state, parts[0], parts[1], memory)

    # ------------------------------------------------------------------ writes

    def set_meta(self, **values: float | str | int) -> None:
        """Store run settings (JSON scalars) that removal needs later, e.g. the prior δ. Inside
        :meth:`batch` they are committed with the batch."""
        self._index.setdefault("meta", {}).update(values)
        self._store.commit([])

    def ensure_meta(self, **values: float | str | int) -> None:
        """Refuse a run whose settings differ from the ones stored; store those not stored yet.

        Raises :class:`LedgerMismatchError` naming every difference: removal needs the δ and
        the merge rule the contributions were made with, so one ledger cannot serve two runs.
        """
        missing = self._store.bind(
            values, asked="this run", problem="was written by a run with other settings",
            fix=". Run with the stored settings to continue it or to remove a client from it, "
                "or give this run a new ledger directory.")
        if missing:
            self.set_meta(**missing)

    def ensure_settings(self, settings: RunSettings) -> None:
        """Bind this ledger to ``settings`` (:meth:`ensure_meta`, and the per-tensor prior
        when the run has a server Fisher), or refuse a run that cannot use it."""
        if settings.client_memory and self.history_rounds:
            raise ValueError(
                f"FedUGM: client_memory needs a ledger that keeps every round's history (its "
                f"replay removal and resume rebuild the memory from it); the ledger at "
                f"{self.directory} keeps the last {self.history_rounds}. Open a new ledger "
                "with history_rounds=0.")
        self.ensure_meta(**settings.to_meta())
        if settings.server_fisher is not None:
            self._ensure_prior(settings.base_prior(settings.server_fisher))

    def record_client(self, client_id: str, *, round_: int, delta: Mapping[str, Tensor],
                      fisher: Mapping[str, Tensor], num_examples: float, alpha: float,
                      applied: Mapping[str, Tensor] | None = None) -> None:
        """Store (replace) the client's latest Δ_t, F_t, n_t, α_t from round ``round_``, and
        ``applied``: Σ over the rounds it took part in of what the merges added for it."""
        if not CLIENT_ID_PATTERN.match(client_id):
            raise LedgerError(f"client id {client_id!r} must be 1-128 letters, digits, '.', "
                              "'_' or '-', not '.' or '..' (it names the client's files).")
        if client_id in self.removed_clients():
            raise LedgerError(f"client {client_id!r} was removed from this run; its "
                              "contributions are not recorded again.")
        if not set(fisher) <= set(delta):
            raise LedgerError("the Fisher's keys must be a subset of the delta's keys.")
        tensors = {f"delta/{k}": v for k, v in delta.items()}
        tensors.update({f"fisher/{k}": v for k, v in fisher.items()})
        tensors.update({f"applied/{k}": v for k, v in (applied or {}).items()})
        previous = self._index["clients"].get(client_id)
        name = self._store.new_name("clients", f"{client_id}.r{int(round_):06d}")
        digest = self._store.write_tensors(name, tensors)
        first = int(round_) if previous is None else previous.get("first_round",
                                                                  previous["round"])
        self._index["clients"][client_id] = {
            "file": name, "sha256": digest, "round": int(round_), "first_round": first,
            "num_examples": float(num_examples), "alpha": float(alpha),
        }  # fmt: skip
        self._store.commit([previous["file"]] if previous else [])

    def record_round(self, round_: int, start: ServerState, contributions:
                     Sequence[Contribution], result: RoundResult, after: ServerState,
                     nodes: Mapping[str, int] | None = None) -> None:
        """Store one merged round (``fl_ugm.engine.step``'s ``start`` → ``after``) as one
        commit: each contribution with a client id (its share in ``result`` added to its
        ``applied`` sum, in float64; a remembered client's share is not: ``applied`` covers
        the rounds it replied in), the round's history, the state after it and ``nodes``,
        the node each client id is bound to (``fl_ugm.roster``)."""
        shares = result.shares or [{} for _ in contributions]
        with self.batch():
            for item, alpha, share in zip(contributions, result.alphas, shares, strict=True):
                if item.client_id is None:
                    continue
                previous = (self.client(item.client_id).applied
                            if item.client_id in self._index["clients"] else {})
                applied = {k: (v.double() + previous[k].double() if k in previous else v)
                           .to(after.global_state[k].dtype) for k, v in share.items()}
                self.record_client(item.client_id, round_=round_, delta=item.delta,
                                   fisher=item.fisher, num_examples=item.num_examples,
                                   alpha=alpha, applied=applied)
            self._record_history(HistoryRound(round_, start, list(contributions),
                                              list(result.alphas), list(result.remembered)))
            self._record_state(round_, after)
            self._index.setdefault("nodes", {}).update(nodes or {})

    def commit_removal(self, client_id: str, round_: int, state: ServerState, *,
                       history: Sequence[HistoryRound] | None = None,
                       records: Sequence[ClientRecord] = ()) -> list[str]:
        """Apply a client's removal as one commit and return the files it deleted: ``state``
        (the server state without the client) becomes round ``round_``'s and the only global
        kept (every earlier one was trained with the client), the client's record is deleted
        and its id joins the removed clients. ``history``: a replay's rewritten rounds (the
        training without the client), which replace the stored history; ``records``: the
        remaining clients' records as of that history. Without ``history`` the stored
        history is cleared: it no longer leads to the global."""
        with self.batch():
            superseded = [entry["file"] for entry in self._index.get("history", [])]
            superseded += [entry["file"] for entry in self._index["globals"]]
            self._index["history"], self._index["globals"] = [], []
            for rewritten in history or ():
                self._record_history(rewritten)
            if history is not None:
                self._index.setdefault("replay_rounds", []).append(int(round_))
            for record in records:
                self.record_client(record.client_id, round_=record.round, delta=record.delta,
                                   fisher=record.fisher, num_examples=record.num_examples,
                                   alpha=record.alpha, applied=record.applied)
            self._record_state(round_, state)
            self.forget_client(client_id)
            self._index.get("nodes", {}).pop(client_id, None)
            self._index.setdefault("removed", {})[client_id] = int(round_)
            self._store.commit(superseded)
            deleted = sorted(set(self._store.pending()))
        return deleted

    def record_global(self, round_: int, state: Mapping[str, Tensor]) -> None:
        """Store the global state after ``round_``; drop checkpoints beyond ``keep_globals``.

        The first global fixes the ledger's model (keys, shapes, dtypes); a state of another
        model is refused with :class:`LedgerMismatchError`."""
        self._check_model(state)
        name = self._store.new_name("globals", f"round-{int(round_):06d}")
        digest = self._store.write_tensors(name, state)
        replaced = [e for e in self._index["globals"] if e["round"] == round_]
        entries = [e for e in self._index["globals"] if e["round"] != round_]
        entries.append({"round": int(round_), "file": name, "sha256": digest})
        entries.sort(key=lambda e: e["round"])
        dropped, self._index["globals"] = entries[:-self.keep_globals], entries[-self.keep_globals:]
        self._store.commit([entry["file"] for entry in dropped + replaced])

    def forget_client(self, client_id: str) -> None:
        """Delete a client's stored contribution (a removal uses :meth:`commit_removal`)."""
        entry = self._index["clients"].pop(client_id, None)
        if entry is None:
            raise LedgerError(f"unknown client id {client_id!r}.")
        self._store.commit([entry["file"]])

    def lock(self) -> None:
        """Become this ledger's one writer now, instead of at the first write (a second
        writing process gets ``LedgerLockedError`` naming the holder; ``fl_ugm.storage``)."""
        self._store.lock()

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group writes into one commit (``fl_ugm.storage.Store.batch``): all or nothing."""
        return self._store.batch()

    # ------------------------------------------------------------------ internals

    def _check_history_settings(self, settings: Mapping[str, object]) -> None:
        """Refuse history settings that differ from the stored ones; stage new ones (they
        are committed with the next write)."""
        self._index.setdefault("meta", {}).update(self._store.bind(
            settings, asked="asked", problem="keeps its history with other settings",
            fix="; open it with the stored ones, or use a new ledger directory."))

    def _ensure_prior(self, prior: Mapping[str, Tensor]) -> None:
        """Store the run's per-tensor H0, or refuse one that differs from the stored one."""
        stored = self.prior()
        if stored is None:
            name = self._store.new_name("state", "prior")
            self._index["prior"] = {"file": name,
                                    "sha256": self._store.write_tensors(name, prior)}
            self._store.commit([])
        elif set(stored) != set(prior) or any(not torch.equal(stored[k], prior[k].to(
                stored[k].dtype)) for k in stored):
            raise LedgerMismatchError(f"the ledger at {self.directory} was written with another "
                                      "server Fisher in its prior; use a new ledger directory.")

    def _record_state(self, round_: int, state: ServerState) -> None:
        """The global after ``round_`` and the rest of the server state (none: no file)."""
        self.record_global(round_, state.global_state)
        previous = self._index.get("server_state", {}).get("file")
        entry: dict = {"round": int(round_)}
        tensors = _server_tensors(state)
        if tensors:
            entry["file"] = self._store.new_name("state", f"round-{int(round_):06d}")
            entry["sha256"] = self._store.write_tensors(entry["file"], tensors)
        self._index["server_state"] = entry
        self._store.commit([previous] if previous else [])

    def _record_history(self, entry: HistoryRound) -> None:
        """Store one round's history and drop rounds beyond ``history_rounds``."""
        dtype = HISTORY_DTYPES[self.history_dtype]
        tensors = {f"start/{k}": v for k, v in entry.start.global_state.items()}
        tensors.update(_server_tensors(entry.start))
        for index, item in enumerate(entry.participants):
            for kind, values in (("delta", item.delta), ("fisher", item.fisher)):
                tensors.update({f"c{index}/{kind}/{k}": _stored(v, dtype)
                                for k, v in values.items()})
        name = self._store.new_name("history", f"round-{entry.round:06d}")
        digest = self._store.write_tensors(name, tensors)
        clients = [{"id": item.client_id, "num_examples": float(item.num_examples),
                    "alpha": float(alpha)}
                   for item, alpha in zip(entry.participants, entry.alphas, strict=True)]
        replaced = [e for e in self._index.get("history", []) if e["round"] == entry.round]
        entries = [e for e in self._index.get("history", []) if e["round"] != entry.round]
        entries.append({"round": entry.round, "file": name, "sha256": digest,
                        "clients": clients, "bytes": (self.directory / name).stat().st_size})
        if entry.remembered:
            entries[-1]["remembered"] = [{"id": m.client_id, "round": int(m.reply_round),
                                          "alpha": float(m.alpha)} for m in entry.remembered]
        entries.sort(key=lambda e: e["round"])
        keep = self.history_rounds or len(entries)
        dropped, self._index["history"] = entries[:-keep], entries[-keep:]
        self._store.commit([e["file"] for e in dropped + replaced])

    def _check_model(self, state: Mapping[str, Tensor]) -> None:
        """Store the model's signature with the first global; refuse another model later."""
        fingerprint = signature(state)
        stored = self.meta.get("model")
        if stored is None:
            self._index.setdefault("meta", {})["model"] = fingerprint  # committed with it
            return
        if stored == fingerprint:
            return
        detail = difference(self.global_state()[1], state) if self._index["globals"] else ""
        raise LedgerMismatchError(
            f"the ledger at {self.directory} holds a different model than this run's global"
            f"{detail}. Give this run a new ledger directory.")


def _server_tensors(state: ServerState) -> dict[str, Tensor]:
    """The optimizer state and the carried precision of ``state``, as stored."""
    tensors = {f"{part}/{k}": v for part, values in zip(_OPTIMIZER_PARTS, state.optimizer,
                                                                strict=False)
               for k, v in values.items()}
    tensors.update({f"carried/{k}": v for k, v in (state.carried or {}).items()})
    return tensors


def _server_parts(tensors: Mapping[str, Tensor]) -> tuple[tuple[dict[str, Tensor], ...],
                                                           dict[str, Tensor] | None]:
    """(optimizer state, carried precision or None) from stored tensors."""
    optimizer = tuple(p for p in (group(tensors, f"{part}/") for part in _OPTIMIZER_PARTS) if p)
    return optimizer, group(tensors, "carried/") or None


def _stored(value: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``value`` in the history's storage dtype (float entries; clamped to its range, so a
    large Fisher sum in float16 saturates instead of becoming Inf)."""
    if dtype is None or not value.is_floating_point() or value.dtype == dtype:
        return value
    limit = torch.finfo(dtype).max
    return value.clamp(-limit, limit).to(dtype)
