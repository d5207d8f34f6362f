"""On-disk ledger of client contributions and global checkpoints, for client removal.

Layout of a ledger directory (safetensors for tensors, one small JSON index)::

    index.json                      what is stored, with a SHA-256 per file
    clients/<client-id>.r000007.safetensors  latest contribution (from round 7): "delta/<key>",
                                     "fisher/<key>", "applied/<key>"
    globals/round-000007.safetensors the global state after round 7 (the last ``keep_globals``)

Each client is stored under a stable id (partition id in simulation, a configured id in a
deployment; never Flower's ephemeral node id) with its latest Δ_t, F_t (a sum, float32),
n_t, α_t and round. Data files are never overwritten: a new one is written (temporary file,
fsync, rename), then the index, which is the commit point, then superseded files are
deleted. Inside :meth:`Ledger.batch` (FedUGM records a round that way) the index is written
once for everything, so a crash leaves the ledger at the previous round or the new one,
never in between; leftover files from an interrupted write are deleted by the next writer's
first commit (one writer at a time: the strategy, or ``fl-ugm remove --forget``). Reads
verify the checksums and say which file is corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

INDEX = "index.json"
FORMAT_VERSION = 1
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class LedgerError(ValueError):
    """The ledger cannot do what was asked (unknown client, empty ledger, bad input)."""


class LedgerCorruptError(LedgerError):
    """A ledger file is missing, truncated or was modified outside the ledger."""


@dataclass(frozen=True)
class ClientRecord:
    """A client's latest stored contribution."""

    client_id: str
    round: int
    num_examples: float
    alpha: float
    delta: dict[str, Tensor]
    fisher: dict[str, Tensor]
    applied: dict[str, Tensor]  # Σ over rounds of what the merges added for this client


class Ledger:
    """Persistent per-client contributions and the last ``keep_globals`` global states.

    Parameters
    ----------
    directory : str or Path
        Created if missing. An existing ledger there is opened (and its index verified).
    keep_globals : int (default: 3)
        How many global checkpoints to keep on disk (the newest); ≥ 1.
    """

    def __init__(self, directory: str | Path, *, keep_globals: int = 3) -> None:
        if keep_globals < 1:
            raise LedgerError(f"keep_globals must be ≥ 1, got {keep_globals}.")
        self.directory = Path(directory)
        self.keep_globals = keep_globals
        (self.directory / "clients").mkdir(parents=True, exist_ok=True)
        (self.directory / "globals").mkdir(parents=True, exist_ok=True)
        self._index = self._read_index()
        self._batch_depth = 0
        self._superseded: list[str] = []
        self._cleaned = False  # leftovers are removed by this object's first commit

    # ------------------------------------------------------------------ queries

    @property
    def meta(self) -> dict:
        """Run settings stored with the ledger (e.g. ``prior_precision``)."""
        return dict(self._index.get("meta", {}))

    def set_meta(self, **values: float | str | int) -> None:
        """Store run settings (JSON scalars) that removal needs later, e.g. the prior δ."""
        self._index.setdefault("meta", {}).update(values)
        self._write_index()

    def client_ids(self) -> list[str]:
        return sorted(self._index["clients"])

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
            known = ", ".join(self.client_ids()[:20]) or "none"
            raise LedgerError(f"unknown client id {client_id!r}; the ledger has: {known}.")
        tensors = self._load(entry["file"], entry["sha256"])
        def group(prefix: str) -> dict[str, Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        return ClientRecord(client_id, entry["round"], entry["num_examples"], entry["alpha"],
                            group("delta/"), group("fisher/"), group("applied/"))

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
        if not set(fisher) <= set(delta):
            raise LedgerError("the Fisher's keys must be a subset of the delta's keys.")
        tensors = {f"delta/{k}": v for k, v in delta.items()}
        tensors.update({f"fisher/{k}": v for k, v in fisher.items()})
        tensors.update({f"applied/{k}": v for k, v in (applied or {}).items()})
        name = f"clients/{client_id}.r{int(round_):06d}.safetensors"
        digest = self._write_tensors(name, tensors)
        previous = self._index["clients"].get(client_id)
        self._index["clients"][client_id] = {
            "file": name, "sha256": digest, "round": int(round_),
            "num_examples": float(num_examples), "alpha": float(alpha),
        }  # fmt: skip
        self._commit([previous["file"]] if previous and previous["file"] != name else [])

    def record_global(self, round_: int, state: Mapping[str, Tensor]) -> None:
        """Store the global state after ``round_``; drop checkpoints beyond ``keep_globals``."""
        name = f"globals/round-{int(round_):06d}.safetensors"
        digest = self._write_tensors(name, state)
        entries = [e for e in self._index["globals"] if e["round"] != round_]
        entries.append({"round": int(round_), "file": name, "sha256": digest})
        entries.sort(key=lambda e: e["round"])
        dropped, self._index["globals"] = entries[:-self.keep_globals], entries[-self.keep_globals:]
        self._commit([entry["file"] for entry in dropped])

    def forget_client(self, client_id: str) -> None:
        """Delete a client's stored contribution (after its removal was applied)."""
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
        for folder in ("clients", "globals"):
            for path in (self.directory / folder).iterdir():
                if f"{folder}/{path.name}" not in listed:
                    path.unlink(missing_ok=True)
        for path in self.directory.glob("*.tmp"):
            path.unlink(missing_ok=True)

    def _read_index(self) -> dict:
        path = self.directory / INDEX
        if not path.exists():
            return {"version": FORMAT_VERSION, "clients": {}, "globals": [], "meta": {}}
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
        if not path.exists():
            raise LedgerCorruptError(f"{path} is listed in the index but missing.")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise LedgerCorruptError(f"{path}: checksum mismatch; the file was truncated or "
                                     "modified outside the ledger.")
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

