"""On-disk ledger of client contributions and global checkpoints, for client removal.

Layout of a ledger directory (safetensors for tensors, one small JSON index; docs/design.md
§5 has the full format)::

    index.json                      what is stored, with a SHA-256 per file; the run settings
                                     ("meta"); the removed clients and their removal rounds
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
    applied: dict[str, Tensor]  # Σ over rounds of what the merges added for this client


@dataclass(frozen=True)
class Contribution:
    """What one client's reply added in one round, as :meth:`Ledger.record_round` stores it:
    its Δ_t and F_t (a sum over n_t examples), n_t, α_t, and its ``share`` of the merged
    update (per parameter key; added to the client's ``applied`` sum)."""

    client_id: str
    num_examples: float
    alpha: float
    delta: Mapping[str, Tensor]
    fisher: Mapping[str, Tensor]
    share: Mapping[str, Tensor]


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
    """

    def __init__(self, directory: str | Path, *, keep_globals: int = 3,
                 create: bool = True) -> None:
        if keep_globals < 1:
            raise LedgerError(f"keep_globals must be ≥ 1, got {keep_globals}.")
        self.directory = Path(directory)
        self.keep_globals = keep_globals
        if not create and not self.directory.is_dir():
            raise LedgerError(f"the ledger directory {self.directory} does not exist.")
        if not create and not (self.directory / INDEX).exists():
            raise LedgerError(f"{self.directory} is not an fl_ugm ledger (it has no {INDEX}).")
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
        if client_id in self.removed_clients():
            raise LedgerError(f"client {client_id!r} was removed from this run; its "
                              "contributions are not recorded again.")
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

    def record_round(self, round_: int, contributions: Sequence[Contribution],
                     new_global: Mapping[str, Tensor]) -> None:
        """Store one merged round as one commit: each contribution (its ``share`` added to the
        client's ``applied`` sum, in float64) and the global after the round."""
        with self.batch():
            for item in contributions:
                previous = (self.client(item.client_id).applied
                            if item.client_id in self._index["clients"] else {})
                applied = {k: (v.double() + previous[k].double() if k in previous else v)
                           .to(new_global[k].dtype) for k, v in item.share.items()}
                self.record_client(item.client_id, round_=round_, delta=item.delta,
                                   fisher=item.fisher, num_examples=item.num_examples,
                                   alpha=item.alpha, applied=applied)
            self.record_global(round_, new_global)

    def commit_removal(self, client_id: str, round_: int, state: Mapping[str, Tensor]) -> None:
        """Apply a client's removal as one commit: ``state`` (the global without the client)
        becomes round ``round_``'s global, the client's record is deleted and its id joins
        the removed clients. A crash leaves the ledger before or after, never between."""
        with self.batch():
            self.record_global(round_, state)
            self.forget_client(client_id)
            self._index.setdefault("removed", {})[client_id] = int(round_)

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
        for folder in ("clients", "globals"):
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

