"""Crash-safe storage under the ledger (no Flower here): one writer at a time, data files
that are never overwritten, a JSON index as the one commit point, and deletes that follow
the commit and are finished by whoever opens the directory next.

The contract (docs/design.md §5). A writer holds an OS lock on the directory's ``lock`` file
(its pid written in it; a second writing process gets :class:`LedgerLockedError` naming it;
objects of one process share the lock). A commit writes every new data file under a name no
earlier write used (temporary file, fsync, rename), fsyncs the folders, writes the index the
same way (the commit point), fsyncs the directory, then deletes the files the new index no
longer lists; the index records them, so a crash before they are gone is finished by the
next opener, reader or writer. If any step before the index's rename fails, the in-memory
index is restored from disk: memory never runs ahead of disk. A directory with data files
but no readable index is refused with the recovery step, never taken as a new ledger. Every
path the index names must lie inside the directory. Every data file is listed with its
SHA-256, checked on every read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

INDEX = "index.json"
LOCK = "lock"
#: The folders a ledger's data files live in (the per-tensor prior lies at the top).
FOLDERS = ("clients", "globals", "history", "state")
_NAME = re.compile(r"^(?:(?:clients|globals|history|state)/)?[A-Za-z0-9_-][A-Za-z0-9._-]*$")


class LedgerError(ValueError):
    """The ledger cannot do what was asked (unknown client, empty ledger, bad input)."""


class LedgerCorruptError(LedgerError):
    """A ledger file is missing, truncated or was modified outside the ledger."""


class LedgerMismatchError(LedgerError):
    """The ledger was written by a run with other settings or another model."""


class LedgerLockedError(LedgerError):
    """Another process is writing the ledger, or it changed since this object read it."""


#: The directories this process holds the writer's lock on: path → [file descriptor, users].
_LOCKS: dict[Path, list[int]] = {}


class Store:
    """A directory of safetensors files and the JSON index that lists them.

    ``index`` is the in-memory index (edit it, then :meth:`commit`); ``empty`` is the index
    of a directory that has none yet; ``version`` the format every index must carry.
    """

    def __init__(self, directory: Path, empty: dict, version: int) -> None:
        self.directory = directory
        self.version = version
        self._empty = empty
        self.index = self.read_index()
        self._batch_depth = 0
        self._superseded: list[str] = []
        self._dirty: set[Path] = set()  # folders with renames not yet fsynced
        self._locked = False
        self._cleaned = False  # leftovers are removed by this object's first commit
        for name in self.index.get("superseded", []):  # finish the last commit's deletes
            self.path(name).unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """The path of a file the index names; a name outside the directory is corruption."""
        if not isinstance(name, str) or not _NAME.match(name) or ".." in name.split("/"):
            raise LedgerCorruptError(f"{self.directory / INDEX} names the file {name!r}, "
                                     "which is not a ledger file name inside the directory; "
                                     "the index was modified outside the ledger. Restore the "
                                     "ledger directory from a backup.")
        return self.directory / name

    def read_index(self) -> dict:
        path = self.directory / INDEX
        if not path.exists():
            data = [p for folder in FOLDERS if (self.directory / folder).is_dir()
                    for p in (self.directory / folder).iterdir() if p.suffix != ".tmp"]
            if data or (self.directory / "prior.safetensors").exists():
                raise LedgerCorruptError(
                    f"{self.directory} holds ledger data files but no {INDEX}: the index was "
                    "lost or deleted. Restore the directory from a backup; it is not taken as "
                    "a new ledger (a new run's first commit would delete those files).")
            return json.loads(json.dumps(self._empty))
        try:
            index = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerCorruptError(f"{path} is not valid JSON ({err}); the ledger index is "
                                     "corrupt. Restore it from a backup.") from None
        if not isinstance(index, dict) or index.get("version") != self.version:
            raise LedgerCorruptError(f"{path} is not a version-{self.version} fl_ugm ledger "
                                     "index.")
        return index

    def lock(self) -> None:
        """Become the directory's one writer (idempotent; released when this object goes).
        Raises :class:`LedgerLockedError` naming the process that writes it."""
        if self._locked:
            return
        key = self.directory.resolve()
        held = _LOCKS.get(key)
        if held is None:
            fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LedgerLockedError(
                    f"the ledger at {self.directory} is being written by process {holder} "
                    "(a running server, or fl-ugm remove --forget); one writer at a time: "
                    "wait for it or stop it, or remove a client from inside the running app "
                    "(FedUGM.remove).") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            held = _LOCKS[key] = [fd, 0]
        held[1] += 1
        self._locked = True
        weakref.finalize(self, _release, key)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one commit: the index is written once, when the block ends
        without an exception. If the block or its commit fails (or the process dies), the
        store stays as it was before the block, in memory and on disk; the data files it
        wrote are deleted by the next writer's first commit."""
        self._batch_depth += 1
        try:
            yield
            if self._batch_depth == 1:
                self._write_index()
        except BaseException:
            if self._batch_depth == 1:
                self._rollback()
            raise
        finally:
            self._batch_depth -= 1
        if self._batch_depth == 0:
            self._delete_superseded()

    def commit(self, superseded: list[str]) -> None:
        """Commit the in-memory index (inside a batch: at its end) and then delete
        ``superseded``, files it no longer lists."""
        self._superseded.extend(superseded)
        if self._batch_depth:
            return
        try:
            self._write_index()
        except BaseException:
            self._rollback()
            raise
        self._delete_superseded()

    def pending(self) -> list[str]:
        """The files the current commit (or batch) will delete once it is durable."""
        return list(self._superseded)

    def bind(self, values: Mapping[str, object], *, asked: str, problem: str, fix: str
             ) -> dict[str, object]:
        """Refuse ``values`` that differ from the ones in the index's "meta" (floats up to
        JSON round-off) with a :class:`LedgerMismatchError` naming each difference; return
        the ones not stored yet."""
        meta = self.index.get("meta", {})
        differ = [f"{k}: stored {meta[k]!r}, {asked} {v!r}" for k, v in values.items()
                  if k in meta and not _same(meta[k], v)]
        if differ:
            raise LedgerMismatchError(f"the ledger at {self.directory} {problem} "
                                      f"({'; '.join(differ)}){fix}")
        return {k: v for k, v in values.items() if k not in meta}

    def load(self, name: str, sha256: str) -> dict[str, Tensor]:
        """The tensors of data file ``name``, after checking its SHA-256."""
        path = self.path(name)
        restore = ("Restore the ledger directory from a backup; until then, what needs this "
                   "file (resuming, removing a client) cannot run on this ledger.")
        if not path.exists():
            raise LedgerCorruptError(f"{path} is listed in the index but missing. {restore}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise LedgerCorruptError(f"{path}: checksum mismatch; the file was truncated or "
                                     f"modified outside the ledger. {restore}")
        return load_file(str(path))

    def new_name(self, folder: str, stem: str) -> str:
        """A data file name no earlier write of this directory used."""
        serial = int(self.index.get("serial", 0))
        self.index["serial"] = serial + 1
        return f"{folder}/{stem}.s{serial:06d}.safetensors"

    def write_tensors(self, name: str, tensors: Mapping[str, Tensor]) -> str:
        """Write a safetensors file (to be listed by the next commit); return its SHA-256."""
        self.lock()
        path = self.path(name)
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        written = write_atomically(path, lambda tmp: save_file(contiguous, str(tmp)),
                                   sync_folder=False)
        self._dirty.add(path.parent)
        return hashlib.sha256(written).hexdigest()

    def _write_index(self) -> None:
        """The commit point: the folders' renames made durable, then the index."""
        self.lock()
        on_disk = self.read_index().get("commit", 0) if (self.directory / INDEX).exists() else 0
        if on_disk != self.index.get("commit", 0):
            raise LedgerLockedError(f"the ledger at {self.directory} changed since this object "
                                    "read it (another Ledger object wrote it); open it again.")
        for folder in sorted(self._dirty):
            _fsync_folder(folder)
        self._dirty.clear()
        self.index["commit"] = int(self.index.get("commit", 0)) + 1
        self.index["superseded"] = sorted(set(self._superseded))
        text = json.dumps(self.index, indent=1, sort_keys=True)
        write_atomically(self.directory / INDEX, lambda tmp: tmp.write_text(text))

    def _rollback(self) -> None:
        self._superseded.clear()
        self.index = self.read_index()  # back to the last commit

    def _delete_superseded(self) -> None:
        for name in self._superseded:
            self.path(name).unlink(missing_ok=True)
        self._superseded.clear()
        if not self._cleaned:
            self._remove_unlisted_files()
            self._cleaned = True

    def _remove_unlisted_files(self) -> None:
        """Delete temporary files and data files the index does not list (left by a write
        interrupted before its commit). Only a writer does this (at its first commit), so a
        reader opening the ledger never touches a running writer's files."""
        listed = set(_files(self.index)) - set(self.index.get("superseded", []))
        for folder in FOLDERS:
            path = self.directory / folder
            for item in path.iterdir() if path.is_dir() else ():
                if f"{folder}/{item.name}" not in listed:
                    item.unlink(missing_ok=True)
        for path in self.directory.glob("*.tmp"):
            path.unlink(missing_ok=True)


def _release(key: Path) -> None:
    held = _LOCKS.get(key)
    if held is not None:
        held[1] -= 1
        if held[1] == 0:
            del _LOCKS[key]
            os.close(held[0])  # closing the descriptor releases the lock


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(node: object) -> Iterator[str]:
    """Every data file an index lists: the "file" value of each entry, at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("file"), str):
            yield node["file"]
        for value in node.values():
            yield from _files(value)
    elif isinstance(node, list):
        for value in node:
            yield from _files(value)


def group(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix``, without it (a file's sections)."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def signature(state: Mapping[str, Tensor]) -> str:
    """A short fingerprint of a state dict's keys, shapes and dtypes."""
    text = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def difference(previous: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """How ``state``'s layout differs from ``previous``'s (for an error message)."""
    missing = sorted(set(previous) - set(state))[:5]
    extra = sorted(set(state) - set(previous))[:5]
    reshaped = [k for k in previous if k in state and (
        tuple(previous[k].shape) != tuple(state[k].shape)
        or previous[k].dtype != state[k].dtype)][:5]
    return f" (missing: {missing}, unexpected: {extra}, other shape or dtype: {reshaped})"


def _same(stored: object, value: object) -> bool:
    """Stored and given settings agree (floats up to JSON round-off)."""
    if isinstance(stored, int | float) and isinstance(value, int | float):
        return math.isclose(float(stored), float(value), rel_tol=1e-12, abs_tol=0.0)
    return stored == value


def write_atomically(path: Path, write: Callable[[Path], object], *,
                     sync_folder: bool = True) -> bytes:
    """Have ``write`` fill a temporary file beside ``path``, fsync it, rename it over
    ``path`` and (``sync_folder``) fsync the folder, so the rename survives a power loss;
    return the bytes written. On any failure ``path`` is untouched and the temporary file
    is removed."""
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
    if sync_folder:
        _fsync_folder(path.parent)
    return data
