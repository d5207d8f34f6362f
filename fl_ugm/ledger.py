"""On-disk ledger of client contributions and global checkpoints, for client removal.

Layout of a ledger directory (safetensors for tensors, one small JSON index; docs/design.md
§5 has the full format)::

    index.json                      what is stored, with a SHA-256 per file; the run settings
                                     ("meta"); the removed clients and their removal rounds
    clients/<client-id>.r000007.g000.safetensors  latest contribution (from round 7):
                                     "delta/<key>", "fisher/<key>", "applied/<key>"
    globals/round-000007.safetensors the global state after round 7 (the last ``keep_globals``)
    history/round-000007.g000.safetensors  round 7 as merged: "start/<key>" (the global its
                                     clients started from), "momentum/<key>" and
                                     "second-moment/<key>" (the server optimizer's state it
                                     started from, if any), "carried/<key>" (the carried
                                     precision in its prior, if any) and, per participant
                                     i, "c<i>/delta/<key>", "c<i>/fisher/<key>"
                                     (``history_dtype``); the index lists the remembered
                                     clients the round also merged (``client_memory``)

The history (every round, or the last ``history_rounds``) is what replay removal
(``fl_ugm.removal``) recomputes the training without a client from.

Each client is stored under a stable id (partition id in simulation, a configured id in a
deployment; never Flower's ephemeral node id) with its latest Δ_t, F_t (a sum, float32),
n_t, α_t and round. Data files are never overwritten: a new one is written (temporary file,
fsync, rename), then the index, which is the commit point, then superseded files are
deleted. Inside :meth:`Ledger.batch` (FedUGM records a round that way) the index is written
once for everything, so a crash leaves the ledger at the previous round or the new one,
never in between; leftover files from an interrupted write are deleted by the next writer's
first commit (one writer at a time: the strategy, or ``fl-ugm remove --forget``). Reads
verify the checksums and say which file is corrupt.

A ledger belongs to one run: its settings (δ, α mode, scale, merge rule) and its model (the
global's keys, shapes and dtypes) are stored on first use, and a run with other settings or
another model is refused (:meth:`Ledger.ensure_meta`, :meth:`Ledger.record_global`). A client
removal is one commit (:meth:`Ledger.commit_removal`): the new global, the deleted record and
the client's id in the removed list; a removed client is never recorded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

INDEX = "index.json"
FORMAT_VERSION = 1
#: Storage dtypes of the per-round history's deltas and Fishers ("as-sent": the dtype the
#: replies decode to; the start globals are always kept as they are).
HISTORY_DTYPES = {"as-sent": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class LedgerError(ValueError):
    """The ledger cannot do what was asked (unknown client, empty ledger, bad input)."""


class LedgerCorruptError(LedgerError):
    """A ledger file is missing, truncated or was modified outside the ledger."""


class LedgerMismatchError(LedgerError):
    """The ledger was written by a run with other settings or another model."""


@dataclass(frozen=True)
class ClientRecord:
    """A client's latest stored contribution."""

    client_id: str
    round: int
    num_examples: float
    alpha: float
    delta: dict[str, Tensor]
    fisher: dict[str, Tensor]
    applied: dict[str, Tensor]  # Σ over the rounds it replied in of what the merges added for it


@dataclass(frozen=True)
class Contribution:
    """What one client's reply added in one round, as :meth:`Ledger.record_round` stores it:
    its Δ_t (every float entry) and F_t (the parameters; a sum over n_t examples, as merged,
    i.e. after the Fisher clip), n_t, α_t (as merged), and its ``share`` of the merged update
    (per parameter key; added to the client's ``applied`` sum). A contribution without a
    client id enters the round's history only."""

    client_id: str | None
    num_examples: float
    alpha: float
    delta: Mapping[str, Tensor]
    fisher: Mapping[str, Tensor]
    share: Mapping[str, Tensor]


@dataclass(frozen=True)
class Remembered:
    """A remembered client that a round also merged (FedUGM's ``client_memory``): its
    latest reply, from round ``reply_round`` of the history (whose ``start`` it fine-tuned
    from), re-centred to the round's start, with weight α_t as merged."""

    client_id: str
    reply_round: int
    alpha: float


@dataclass(frozen=True)
class HistoryRound:
    """One merged round from the history: the global its clients started from (full
    precision), every participant's contribution as merged (``history_dtype``), the
    server optimizer's state the round started from (m_{r−1}, and Adam's v_{r−1}; full
    precision; empty without a server optimizer, ``fl_ugm.server_optimizer``), the
    remembered clients it merged too (empty without ``client_memory``) and the carried
    precision C_{r−1} in the round's prior (empty without ``carried_precision``)."""

    round: int
    start: dict[str, Tensor]
    participants: list[Contribution]  # shares are empty: the history does not store them
    momentum: dict[str, Tensor] = field(default_factory=dict)
    remembered: list[Remembered] = field(default_factory=list)
    second_moment: dict[str, Tensor] = field(default_factory=dict)
    carried: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, round_: int, start: Mapping[str, Tensor], participants: Sequence[Contribution],
           server_state: Sequence[Mapping[str, Tensor]] = (),
           remembered: Sequence[Remembered] = (),
           carried: Mapping[str, Tensor] | None = None) -> HistoryRound:
        """A round from its parts, the optimizer state as :attr:`server_state` has it."""
        first, second = (*server_state, {}, {})[:2]
        return cls(round_, dict(start), list(participants), dict(first), list(remembered),
                   dict(second), dict(carried or {}))

    @property
    def server_state(self) -> tuple[dict[str, Tensor], ...]:
        """The optimizer state as ``fl_ugm.server_optimizer`` takes it: () for none, (m,)
        for momentum, (m, v) for Adam."""
        return tuple(s for s in (self.momentum, self.second_moment) if s)


class Ledger:
    """Persistent per-client contributions and the last ``keep_globals`` global states.

    Parameters
    ----------
    directory : str or Path
        Created if missing. An existing ledger there is opened (and its index verified).
    keep_globals : int (default: 3)
        How many global checkpoints to keep on disk (the newest); ≥ 1.
    create : bool (default: True)
        Create the ledger if ``directory`` holds none. With ``False`` (readers such as
        ``fl-ugm remove``) a missing directory or index is an error that says which.
    history_rounds : int, optional
        Rounds of history to keep: 0 keeps every round (the default for a new ledger), L > 0
        the last L (a replay then reaches back L rounds). None: the stored setting.
    history_dtype : {"as-sent", "float32", "bfloat16", "float16"}, optional
        Storage dtype of the history's deltas and Fishers ("as-sent" for a new ledger: as the
        server decoded the replies, i.e. the global's dtype, float32 for float16 wire
        replies; "bfloat16" halves float32's storage, "float16" too but with a narrower
        range). None: the stored setting.

    The history settings are stored with the run; a ledger opened with others is refused.
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
        if not create and not (self.directory / INDEX).exists():
            raise LedgerError(f"{self.directory} is not an fl_ugm ledger (it has no {INDEX}).")
        (self.directory / "clients").mkdir(parents=True, exist_ok=True)
        (self.directory / "globals").mkdir(parents=True, exist_ok=True)
        (self.directory / "history").mkdir(parents=True, exist_ok=True)
        self._index = self._read_index()
        self._batch_depth = 0
        self._superseded: list[str] = []
        self._cleaned = False  # leftovers are removed by this object's first commit
        settings = {"history_rounds": history_rounds, "history_dtype": history_dtype}
        self._check_settings({k: v for k, v in settings.items() if v is not None})

    # ------------------------------------------------------------------ queries

    @property
    def meta(self) -> dict:
        """Run settings stored with the ledger (e.g. ``prior_precision``)."""
        return dict(self._index.get("meta", {}))

    def set_meta(self, **values: float | str | int) -> None:
        """Store run settings (JSON scalars) that removal needs later, e.g. the prior δ. Inside
        :meth:`batch` they are committed with the batch."""
        self._index.setdefault("meta", {}).update(values)
        self._commit([])

    def ensure_meta(self, **values: float | str | int) -> None:
        """Refuse a run whose settings differ from the ones stored; store those not stored yet.

        Raises :class:`LedgerMismatchError` naming every difference: removal needs the δ and
        the merge rule the contributions were made with, so one ledger cannot serve two runs.
        """
        stored = self.meta
        differ = [f"{key}: stored {stored[key]!r}, this run {value!r}"
                  for key, value in values.items()
                  if key in stored and not _same(stored[key], value)]
        if differ:
            raise LedgerMismatchError(
                f"the ledger at {self.directory} was written by a run with other settings ("
                + "; ".join(differ) + "). Run with the stored settings to continue it or to "
                "remove a client from it, or give this run a new ledger directory."
            )
        missing = {k: v for k, v in values.items() if k not in stored}
        if missing:
            self.set_meta(**missing)

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

    def history_round(self, round_: int) -> HistoryRound:
        """Round ``round_`` as merged (checksum verified)."""
        entry = next((e for e in self._index.get("history", []) if e["round"] == round_), None)
        if entry is None:
            raise LedgerError(f"no history for round {round_}; stored: {self.history()}.")
        tensors = self._load(entry["file"], entry["sha256"])
        participants = []
        for index, info in enumerate(entry["clients"]):
            participants.append(Contribution(
                info["id"], info["num_examples"], info["alpha"],
                _group(tensors, f"c{index}/delta/"), _group(tensors, f"c{index}/fisher/"), {}))
        remembered = [Remembered(m["id"], m["round"], m["alpha"])
                      for m in entry.get("remembered", [])]
        return HistoryRound(round_, _group(tensors, "start/"), participants,
                            _group(tensors, "momentum/"), remembered,
                            _group(tensors, "second-moment/"), _group(tensors, "carried/"))

    def first_round(self, client_id: str) -> int | None:
        """The first round ``client_id`` contributed to (None if unknown)."""
        entry = self._index["clients"].get(client_id)
        return None if entry is None else entry.get("first_round", entry["round"])

    def prior(self) -> dict[str, Tensor] | None:
        """The run's per-tensor prior precision H0 (δ + the server's Fisher), if it had one."""
        entry = self._index.get("prior")
        return None if entry is None else self._load(entry["file"], entry["sha256"])

    def ensure_prior(self, prior: Mapping[str, Tensor]) -> None:
        """Store the run's per-tensor H0, or refuse one that differs from the stored one."""
        stored = self.prior()
        if stored is None:
            name = "prior.safetensors"
            self._index["prior"] = {"file": name, "sha256": self._write_tensors(name, prior)}
            self._commit([])
        elif set(stored) != set(prior) or any(not torch.equal(stored[k], prior[k].to(
                stored[k].dtype)) for k in stored):
            raise LedgerMismatchError(f"the ledger at {self.directory} was written with another "
                                      "server Fisher in its prior; use a new ledger directory.")

    def history_bytes(self) -> int:
        """Bytes of the stored history (every kept round)."""
        return sum(int(e.get("bytes", 0)) for e in self._index.get("history", []))

    def replay_removal_rounds(self) -> list[int]:
        """Rounds whose global is a replay removal's result (no merge: the rewritten
        history already leads there)."""
        return list(self._index.get("replay_rounds", []))

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
        tensors = self._load(entry["file"], entry["sha256"])
        return ClientRecord(client_id, entry["round"], entry["num_examples"], entry["alpha"],
                            _group(tensors, "delta/"), _group(tensors, "fisher/"),
                            _group(tensors, "applied/"))

    def global_state(self, round_: int | None = None) -> tuple[int, dict[str, Tensor]]:
        """(round, state) of the given round's checkpoint, or of the newest one."""
        entries = self._index["globals"]
        if not entries:
            raise LedgerError(f"the ledger at {self.directory} holds no global checkpoint.")
        if round_ is None:
            entry = entries[-1]
        else:
            matches = [e for e in entries if e["round"] == round_]
            if not matches:
                raise LedgerError(f"no global checkpoint for round {round_}; kept: "
                                  f"{self.rounds()} (keep_globals={self.keep_globals}).")
            entry = matches[0]
        return entry["round"], self._load(entry["file"], entry["sha256"])

    # ------------------------------------------------------------------ writes

    def record_client(
        self,
        client_id: str,
        *,
        round_: int,
        delta: Mapping[str, Tensor],
        fisher: Mapping[str, Tensor],
        num_examples: float,
        alpha: float,
        applied: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Store (replace) the client's latest Δ_t, F_t, n_t, α_t from round ``round_``, and
        optionally ``applied``: the running sum, over every round it took part in, of what
        the merge added to the global on its behalf (see ``FedUGM``)."""
        if not _SAFE_ID.match(client_id):
            raise LedgerError(
                f"client id {client_id!r} must be 1-128 characters of letters, digits, '.', "
                "'_' or '-' (it becomes a file name)."
            )
        if client_id in self.removed_clients():
            raise LedgerError(f"client {client_id!r} was removed from this run; its "
                              "contributions are not recorded again.")
        if not set(fisher) <= set(delta):
            raise LedgerError("the Fisher's keys must be a subset of the delta's keys.")
        tensors = {f"delta/{k}": v for k, v in delta.items()}
        tensors.update({f"fisher/{k}": v for k, v in fisher.items()})
        tensors.update({f"applied/{k}": v for k, v in (applied or {}).items()})
        previous = self._index["clients"].get(client_id)
        name = f"clients/{client_id}.r{int(round_):06d}.g{self._generation():03d}.safetensors"
        digest = self._write_tensors(name, tensors)
        first = int(round_) if previous is None else previous.get("first_round",
                                                                  previous["round"])
        self._index["clients"][client_id] = {
            "file": name, "sha256": digest, "round": int(round_), "first_round": first,
            "num_examples": float(num_examples), "alpha": float(alpha),
        }  # fmt: skip
        self._commit([previous["file"]] if previous and previous["file"] != name else [])

    def record_round(self, round_: int, contributions: Sequence[Contribution],
                     new_global: Mapping[str, Tensor],
                     start_global: Mapping[str, Tensor] | None = None,
                     server_state: Sequence[Mapping[str, Tensor]] = (),
                     remembered: Sequence[Remembered] = (),
                     carried: Mapping[str, Tensor] | None = None) -> None:
        """Store one merged round as one commit: each contribution with a client id (its
        ``share`` added to the client's ``applied`` sum, in float64), the round's history
        (with ``start_global``, the global the clients started from, ``server_state``, the
        server optimizer's state the round started from, every contribution, the
        ``remembered`` clients merged too and the ``carried`` precision in the round's prior)
        and the global after the round. A remembered client's share is not added to its
        ``applied`` sum, which covers the rounds it replied in."""
        with self.batch():
            for item in contributions:
                if item.client_id is None:
                    continue
                previous = (self.client(item.client_id).applied
                            if item.client_id in self._index["clients"] else {})
                applied = {k: (v.double() + previous[k].double() if k in previous else v)
                           .to(new_global[k].dtype) for k, v in item.share.items()}
                self.record_client(item.client_id, round_=round_, delta=item.delta,
                                   fisher=item.fisher, num_examples=item.num_examples,
                                   alpha=item.alpha, applied=applied)
            if start_global is not None:
                self._record_history(HistoryRound.of(round_, start_global, contributions,
                                                     server_state, remembered, carried))
            self.record_global(round_, new_global)

    def commit_removal(self, client_id: str, round_: int, state: Mapping[str, Tensor], *,
                       history: Sequence[HistoryRound] | None = None,
                       records: Sequence[ClientRecord] = ()) -> None:
        """Apply a client's removal as one commit: ``state`` (the global without the client)
        becomes round ``round_``'s global, the client's record is deleted and its id joins
        the removed clients. A crash leaves the ledger before or after, never between.

        ``history``: a replay removal's rewritten rounds (the training as it would have been
        without the client), which replace the stored history; ``records``: the remaining
        clients' records as of that history. Without ``history`` the stored history is
        cleared: it no longer leads to the global (a later replay reaches back to here)."""
        with self.batch():
            superseded = [entry["file"] for entry in self._index.get("history", [])]
            self._index["history"] = []
            self._index["generation"] = self._generation() + 1  # new file names from here
            for rewritten in history or ():
                self._record_history(rewritten)
            if history is not None:
                self._index.setdefault("replay_rounds", []).append(int(round_))
            for record in records:
                self.record_client(record.client_id, round_=record.round, delta=record.delta,
                                   fisher=record.fisher, num_examples=record.num_examples,
                                   alpha=record.alpha, applied=record.applied)
            self.record_global(round_, state)
            self.forget_client(client_id)
            self._index.setdefault("removed", {})[client_id] = int(round_)
            self._commit(superseded)

    def record_global(self, round_: int, state: Mapping[str, Tensor]) -> None:
        """Store the global state after ``round_``; drop checkpoints beyond ``keep_globals``.

        The first global fixes the ledger's model (keys, shapes, dtypes); a state of another
        model is refused with :class:`LedgerMismatchError`."""
        self._check_model(state)
        name = f"globals/round-{int(round_):06d}.safetensors"
        digest = self._write_tensors(name, state)
        entries = [e for e in self._index["globals"] if e["round"] != round_]
        entries.append({"round": int(round_), "file": name, "sha256": digest})
        entries.sort(key=lambda e: e["round"])
        dropped, self._index["globals"] = entries[:-self.keep_globals], entries[-self.keep_globals:]
        self._commit([entry["file"] for entry in dropped])

    def forget_client(self, client_id: str) -> None:
        """Delete a client's stored contribution (a removal uses :meth:`commit_removal`)."""
        entry = self._index["clients"].pop(client_id, None)
        if entry is None:
            raise LedgerError(f"unknown client id {client_id!r}.")
        self._commit([entry["file"]])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one commit: the index is written once, when the block ends
        without an exception. If the block raises (or the process dies), the ledger stays
        as it was before the block; the data files it wrote are deleted by the next writer's
        first commit."""
        self._batch_depth += 1
        try:
            yield
        except BaseException:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                self._superseded.clear()
                self._index = self._read_index()  # back to the last commit
            raise
        self._batch_depth -= 1
        self._commit([])

    # ------------------------------------------------------------------ internals

    def _check_settings(self, settings: Mapping[str, object]) -> None:
        """Refuse history settings that differ from the stored ones; stage new ones (they
        are committed with the next write)."""
        stored = self.meta
        differ = [f"{k}: stored {stored[k]!r}, asked {v!r}" for k, v in settings.items()
                  if k in stored and stored[k] != v]
        if differ:
            raise LedgerMismatchError(f"the ledger at {self.directory} keeps its history with "
                                      f"other settings ({'; '.join(differ)}); open it with the "
                                      "stored ones, or use a new ledger directory.")
        self._index.setdefault("meta", {}).update(settings)

    def _generation(self) -> int:
        """Bumped by every history rewrite, so that no data file name is ever reused."""
        return int(self._index.get("generation", 0))

    def _record_history(self, entry: HistoryRound) -> None:
        """Store one round's history and drop rounds beyond ``history_rounds``."""
        dtype = HISTORY_DTYPES[self.history_dtype]
        tensors = {f"start/{k}": v for k, v in entry.start.items()}
        tensors.update({f"momentum/{k}": v for k, v in entry.momentum.items()})
        tensors.update({f"second-moment/{k}": v for k, v in entry.second_moment.items()})
        tensors.update({f"carried/{k}": v for k, v in entry.carried.items()})
        for index, item in enumerate(entry.participants):
            for kind, values in (("delta", item.delta), ("fisher", item.fisher)):
                tensors.update({f"c{index}/{kind}/{k}": _stored(v, dtype)
                                for k, v in values.items()})
        name = f"history/round-{entry.round:06d}.g{self._generation():03d}.safetensors"
        digest = self._write_tensors(name, tensors)
        clients = [{"id": item.client_id, "num_examples": float(item.num_examples),
                    "alpha": float(item.alpha)} for item in entry.participants]
        entries = [e for e in self._index.get("history", []) if e["round"] != entry.round]
        entries.append({"round": entry.round, "file": name, "sha256": digest,
                        "clients": clients, "bytes": (self.directory / name).stat().st_size})
        if entry.remembered:
            entries[-1]["remembered"] = [{"id": m.client_id, "round": int(m.reply_round),
                                          "alpha": float(m.alpha)} for m in entry.remembered]
        entries.sort(key=lambda e: e["round"])
        keep = self.history_rounds or len(entries)
        dropped, self._index["history"] = entries[:-keep], entries[-keep:]
        self._commit([e["file"] for e in dropped])

    def _check_model(self, state: Mapping[str, Tensor]) -> None:
        """Store the model's signature with the first global; refuse another model later."""
        signature = _model_signature(state)
        stored = self.meta.get("model")
        if stored is None:
            self._index.setdefault("meta", {})["model"] = signature  # committed with the global
            return
        if stored == signature:
            return
        detail = ""
        if self._index["globals"]:
            _, previous = self.global_state()
            missing = sorted(set(previous) - set(state))[:5]
            extra = sorted(set(state) - set(previous))[:5]
            reshaped = [k for k in previous if k in state and (
                tuple(previous[k].shape) != tuple(state[k].shape)
                or previous[k].dtype != state[k].dtype)][:5]
            detail = f" (missing: {missing}, unexpected: {extra}, other shape or dtype: {reshaped})"
        raise LedgerMismatchError(
            f"the ledger at {self.directory} holds a different model than this run's global"
            f"{detail}. Give this run a new ledger directory.")

    def _commit(self, superseded: list[str]) -> None:
        """Write the index (outside a batch), then delete the files it no longer lists."""
        self._superseded.extend(superseded)
        if self._batch_depth:
            return
        self._write_index()
        for name in self._superseded:
            (self.directory / name).unlink(missing_ok=True)
        self._superseded.clear()
        if not self._cleaned:
            self._remove_unreferenced_files()
            self._cleaned = True

    def _remove_unreferenced_files(self) -> None:
        """Delete temporary files and data files the index does not list (left by a write
        that was interrupted before its commit). Only a writer does this (at its first
        commit), so a reader opening the ledger never touches a running writer's files."""
        listed = {e["file"] for e in self._index["clients"].values()}
        listed |= {e["file"] for e in self._index["globals"]}
        listed |= {e["file"] for e in self._index.get("history", [])}
        listed |= {self._index["prior"]["file"]} if "prior" in self._index else set()
        for folder in ("clients", "globals", "history"):
            for path in (self.directory / folder).iterdir():
                if f"{folder}/{path.name}" not in listed:
                    path.unlink(missing_ok=True)
        for path in self.directory.glob("*.tmp"):
            path.unlink(missing_ok=True)

    def _read_index(self) -> dict:
        path = self.directory / INDEX
        if not path.exists():
            return {"version": FORMAT_VERSION, "clients": {}, "globals": [], "meta": {},
                    "removed": {}}
        try:
            index = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerCorruptError(f"{path} is not valid JSON ({err}); the ledger index is "
                                     "corrupt. Restore it from a backup.") from None
        if not isinstance(index, dict) or index.get("version") != FORMAT_VERSION:
            raise LedgerCorruptError(f"{path} is not a version-{FORMAT_VERSION} fl_ugm ledger "
                                     "index.")
        return index

    def _load(self, name: str, sha256: str) -> dict[str, Tensor]:
        path = self.directory / name
        restore = ("Restore the ledger directory from a backup; until then, what needs this "
                   "file (resuming, removing a client) cannot run on this ledger.")
        if not path.exists():
            raise LedgerCorruptError(f"{path} is listed in the index but missing. {restore}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise LedgerCorruptError(f"{path}: checksum mismatch; the file was truncated or "
                                     f"modified outside the ledger. {restore}")
        return load_file(str(path))

    def _write_tensors(self, name: str, tensors: Mapping[str, Tensor]) -> str:
        """Atomically write a safetensors file; return its SHA-256."""
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        written = write_atomically(self.directory / name,
                                   lambda tmp: save_file(contiguous, str(tmp)))
        return hashlib.sha256(written).hexdigest()

    def _write_index(self) -> None:
        text = json.dumps(self._index, indent=1, sort_keys=True)
        write_atomically(self.directory / INDEX, lambda tmp: tmp.write_text(text))


def _group(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _stored(value: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``value`` in the history's storage dtype (float entries; clamped to its range, so a
    large Fisher sum in float16 saturates instead of becoming Inf)."""
    if dtype is None or not value.is_floating_point() or value.dtype == dtype:
        return value
    limit = torch.finfo(dtype).max
    return value.clamp(-limit, limit).to(dtype)


def _model_signature(state: Mapping[str, Tensor]) -> str:
    """A short fingerprint of a state dict's keys, shapes and dtypes."""
    text = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same(stored: object, value: object) -> bool:
    """Stored and given settings agree (floats up to JSON round-off)."""
    if isinstance(stored, int | float) and isinstance(value, int | float):
        return math.isclose(float(stored), float(value), rel_tol=1e-12, abs_tol=0.0)
    return stored == value


def write_atomically(path: Path, write: Callable[[Path], object]) -> bytes:
    """Have ``write`` fill a temporary file beside ``path``, fsync it, rename it over
    ``path``; return the bytes written. On any failure ``path`` is untouched and the
    temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            data = handle.read()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return data

