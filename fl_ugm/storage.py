"""Crash-safe storage under the ledger (no Flower here): data files that are never
overwritten, a JSON index as the one commit point, and deletes that follow the commit.

A write goes: each new data file to a temporary name, fsync, rename; then the index, the same
way (the commit); then the files the new index no longer lists are deleted. Inside
:meth:`Store.batch` the index is written once for everything, so a crash leaves the
directory at the previous commit or the new one, never between. Files left by an
interrupted write are deleted by the next writer's first commit; readers never delete.
Every data file is listed in the index with its SHA-256, checked on every read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

INDEX = "index.json"


class LedgerError(ValueError):
    """The ledger cannot do what was asked (unknown client, empty ledger, bad input)."""


class LedgerCorruptError(LedgerError):
    """A ledger file is missing, truncated or was modified outside the ledger."""


class LedgerMismatchError(LedgerError):
    """The ledger was written by a run with other settings or another model."""


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
        self._cleaned = False  # leftovers are removed by this object's first commit

    def read_index(self) -> dict:
        path = self.directory / INDEX
        if not path.exists():
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

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one commit: the index is written once, when the block ends
        without an exception. If the block raises (or the process dies), the store stays as
        it was before the block; the data files it wrote are deleted by the next writer's
        first commit."""
        self._batch_depth += 1
        try:
            yield
        except BaseException:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                self._superseded.clear()
                self.index = self.read_index()  # back to the last commit
            raise
        self._batch_depth -= 1
        self.commit([])

    def commit(self, superseded: list[str]) -> None:
        """Write the index (outside a batch), then delete the files it no longer lists."""
        self._superseded.extend(superseded)
        if self._batch_depth:
            return
        text = json.dumps(self.index, indent=1, sort_keys=True)
        write_atomically(self.directory / INDEX, lambda tmp: tmp.write_text(text))
        for name in self._superseded:
            (self.directory / name).unlink(missing_ok=True)
        self._superseded.clear()
        if not self._cleaned:
            self._remove_unlisted_files()
            self._cleaned = True

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
        path = self.directory / name
        restore = ("Restore the ledger directory from a backup; until then, what needs this "
                   "file (resuming, removing a client) cannot run on this ledger.")
        if not path.exists():
            raise LedgerCorruptError(f"{path} is listed in the index but missing. {restore}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise LedgerCorruptError(f"{path}: checksum mismatch; the file was truncated or "
                                     f"modified outside the ledger. {restore}")
        return load_file(str(path))

    def write_tensors(self, name: str, tensors: Mapping[str, Tensor]) -> str:
        """Atomically write a safetensors file; return its SHA-256."""
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        written = write_atomically(self.directory / name,
                                   lambda tmp: save_file(contiguous, str(tmp)))
        return hashlib.sha256(written).hexdigest()

    def _remove_unlisted_files(self) -> None:
        """Delete temporary files and data files the index does not list (left by a write
        interrupted before its commit). Only a writer does this (at its first commit), so a
        reader opening the ledger never touches a running writer's files."""
        listed = set(_files(self.index))
        for folder in {name.split("/")[0] for name in listed} | set(_FOLDERS):
            path = self.directory / folder
            for item in path.iterdir() if path.is_dir() else ():
                if f"{folder}/{item.name}" not in listed:
                    item.unlink(missing_ok=True)
        for path in self.directory.glob("*.tmp"):
            path.unlink(missing_ok=True)


#: The ledger's data folders (cleaned even when the index lists nothing in them).
_FOLDERS = ("clients", "globals", "history", "state")


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
