"""The client memory (``client_memory``): every client's latest reply, re-centred to the
current global, merged in the rounds it does not reply in (docs/design.md §1). No Flower here.

A reply that fine-tuned from the start s under the prior P, re-centred to θ, is
Δ̃ = Δ + G (s − θ) with G = F / (P + F) (``fl_ugm.merge.recentred_delta``; P is the same
every round: the memory is refused with a carried precision). So it is u − G θ with the
*anchored* reply u = Δ + G s, its re-centring to θ = 0, which the memory keeps instead of Δ
and s: no start global has to be kept. A round merges the remembered clients through five
per-parameter running sums over them, weighted by w (n_t for α = num-examples, else 1):

    Σ w u,  Σ w G,  Σ w F u,  Σ w F G,  Σ w F      (+ Σ n Δ for float buffers)

and at θ their Σ α Δ̃, Σ α F Δ̃ and Σ α F (α = c w) are sums minus sums × θ. So a round
costs O(participants × model) and the server holds O(model) for the memory (float64 sums),
whatever the number of clients; each anchored reply lives in a :class:`TermStore` (in RAM,
or one safetensors file per client on disk: :class:`TermsOnDisk`) and is read back only when
the client replies again (its old term leaves the sums) or is left out of a round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fl_ugm.contribution import Contribution
from fl_ugm.merge import PriorPrecision, prior_at
from fl_ugm.storage import group

#: The running sums per parameter key ("buffer": per float buffer key).
_SUMS = ("u", "g", "fu", "fg", "f")


class TermStore(Protocol):
    """Where the anchored replies live, by (client id, reply round)."""

    def put(self, client: str, reply_round: int, term: Contribution) -> Contribution:
        """Keep ``term``; return it as stored (what the sums must add)."""

    def get(self, client: str, reply_round: int) -> Contribution: ...

    def keep_only(self, keys: Iterable[tuple[str, int]]) -> None:
        """Drop every term but ``keys`` (those of the memory the server holds now)."""


class TermsInMemory:
    """Anchored replies in RAM (the default: 2 model-sized tensors per remembered client)."""

    def __init__(self) -> None:
        self._terms: dict[tuple[str, int], Contribution] = {}

    def put(self, client: str, reply_round: int, term: Contribution) -> Contribution:
        self._terms[client, reply_round] = term
        return term

    def get(self, client: str, reply_round: int) -> Contribution:
        return self._terms[client, reply_round]

    def keep_only(self, keys: Iterable[tuple[str, int]]) -> None:
        keep = set(keys)
        self._terms = {k: v for k, v in self._terms.items() if k in keep}


class TermsOnDisk:
    """Anchored replies as safetensors files in ``directory`` (one per client and reply
    round, in the dtype they were computed in: float32 for a float32 model, since u − G θ
    subtracts nearly equal numbers). A cache: a resumed server rebuilds it from the ledger."""

    #: The files it writes (and the only ones it ever deletes): ``<client>.r<round>.safetensors``.
    PATTERN = "*.r[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(self.PATTERN):
            stale.unlink()  # a cache of an earlier process: its sums are gone

    def _path(self, client: str, reply_round: int) -> Path:
        return self.directory / f"{client}.r{int(reply_round):06d}.safetensors"

    def put(self, client: str, reply_round: int, term: Contribution) -> Contribution:
        tensors = {f"delta/{k}": v.contiguous() for k, v in term.delta.items()}
        tensors.update({f"fisher/{k}": v.contiguous() for k, v in term.fisher.items()})
        save_file(tensors, str(self._path(client, reply_round)),
                  metadata={"num_examples": repr(float(term.num_examples))})
        return term

    def get(self, client: str, reply_round: int) -> Contribution:
        with safe_open(str(self._path(client, reply_round)), framework="pt") as handle:
            n = float(handle.metadata()["num_examples"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        return Contribution(client, n, group(tensors, "delta/"), group(tensors, "fisher/"))

    def keep_only(self, keys: Iterable[tuple[str, int]]) -> None:
        keep = {self._path(c, r).name for c, r in keys}
        for path in self.directory.glob(self.PATTERN):
            if path.name not in keep:
                path.unlink()


@dataclass(frozen=True)
class ClientMemory:
    """Each remembered client's reply round and size (``index``), the running sums over
    them (float64) and the store of their anchored replies. Immutable: a new memory shares
    the store, whose older terms stay until :meth:`keep_only_current` is called."""

    store: TermStore = field(default_factory=TermsInMemory, compare=False)
    index: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    sums: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def rounds(self) -> dict[str, int]:
        """Reply round of each remembered client."""
        return {c: r for c, (r, _) in self.index.items()}

    def term(self, client: str) -> Contribution:
        """The anchored reply of ``client`` (u in ``delta``, F in ``fisher``)."""
        return self.store.get(client, self.index[client][0])

    def remember(self, server_round: int, start: Mapping[str, Tensor],
                 contributions: Iterable[Contribution], *, prior: PriorPrecision | None,
                 weighted: bool) -> ClientMemory:
        """This memory with the ``contributions`` of ``server_round`` (fine-tuned from
        ``start``; one without a client id is not remembered) replacing each client's
        earlier reply. ``prior``: the merge's P (None: a rule that ignores the Fisher, so
        no re-centring); ``weighted``: w = n_t (α = num-examples) or 1."""
        index, sums = dict(self.index), {k: v.clone() for k, v in self.sums.items()}
        for item in contributions:
            if item.client_id is None:
                continue
            if item.client_id in index:
                _accumulate(sums, self.term(item.client_id), prior, weighted, -1.0)
            term = self.store.put(item.client_id, server_round,
                                  _anchored(item, start, prior))
            _accumulate(sums, term, prior, weighted, 1.0)
            index[item.client_id] = (server_round, float(item.num_examples))
        return ClientMemory(self.store, index, sums)

    def without(self, clients: Iterable[str], *, prior: PriorPrecision | None,
                weighted: bool) -> ClientMemory:
        """This memory without the replies of ``clients``."""
        leaving = sorted(set(clients) & set(self.index))
        if not leaving:
            return self
        index, sums = dict(self.index), {k: v.clone() for k, v in self.sums.items()}
        for client in leaving:
            _accumulate(sums, self.term(client), prior, weighted, -1.0)
            del index[client]
        return ClientMemory(self.store, index, sums)

    def recalled(self, current: Mapping[str, Tensor], remembered: Sequence[str], *,
                 prior: PriorPrecision | None, weighted: bool, factor: float,
                 fisher_weighted: bool) -> Contribution:
        """The ``remembered`` clients re-centred to ``current`` as ONE contribution that any
        merge rule of ``fl_ugm.merge_rules`` merges with α = 1 exactly as it merges them
        one by one with α_t = ``factor`` × w_t: F* = Σ α F and Δ* with (H0 + F*) Δ* =
        Σ α (H0 + F) Δ̃ (``fisher_weighted``; else Δ* = Σ α Δ̃); float buffers: Σ n Δ / Σ n
        with n* = Σ n. A client the memory does not hold raises KeyError."""
        missing = [c for c in remembered if c not in self.index]
        if missing:
            raise KeyError(missing[0])
        sums = self.without(set(self.index) - set(remembered), prior=prior,
                            weighted=weighted).sums
        size = sum(self.index[c][1] for c in remembered)
        delta, fisher = {}, {}
        for key in {k.split("/", 1)[1] for k in sums if k.startswith("f/")}:
            theta = current[key].double()
            a = factor * (sums[f"u/{key}"] - sums[f"g/{key}"] * theta)  # Σ α Δ̃
            b = factor * sums[f"f/{key}"].clamp(min=0)  # Σ α F (≥ 0 after round-off)
            if fisher_weighted:
                h0 = _prior_in(prior, key, torch.float64)
                c = factor * (sums[f"fu/{key}"] - sums[f"fg/{key}"] * theta)  # Σ α F Δ̃
                a = (h0 * a + c) / (h0 + b)
            delta[key], fisher[key] = a.to(current[key].dtype), b.to(current[key].dtype)
        for key in (k.split("/", 1)[1] for k in sums if k.startswith("buffer/")):
            delta[key] = (sums[f"buffer/{key}"] / size).to(current[key].dtype)
        return Contribution(None, size, delta, fisher)

    def keep_only_current(self) -> None:
        """Drop from the store every term this memory does not hold (the server's older
        states are then gone)."""
        self.store.keep_only((c, r) for c, (r, _) in self.index.items())


def _prior_in(prior: PriorPrecision, key: str, dtype: torch.dtype) -> float | Tensor:
    """P of ``key``: a float, or its tensor in ``dtype``."""
    p = prior_at(prior, key)
    return p.to(dtype) if isinstance(p, Tensor) else p


def _gain(fisher: Tensor, prior: PriorPrecision | None, key: str) -> Tensor:
    """G = F / (P + F) in ``fisher``'s dtype (0 without a prior: no re-centring)."""
    if prior is None:
        return torch.zeros_like(fisher)
    return fisher / (_prior_in(prior, key, fisher.dtype) + fisher)


def _anchored(item: Contribution, start: Mapping[str, Tensor],
              prior: PriorPrecision | None) -> Contribution:
    """The reply re-centred to θ = 0: u = Δ + G s per parameter, in the reply's dtype
    (buffers as they are)."""
    delta = dict(item.delta)
    for key, fisher in item.fisher.items():
        gain = _gain(fisher.to(delta[key].dtype), prior, key)
        delta[key] = torch.addcmul(delta[key], gain, start[key].to(gain.dtype))
    return dataclasses.replace(item, delta=delta)


def _accumulate(sums: dict[str, Tensor], term: Contribution, prior: PriorPrecision | None,
                weighted: bool, sign: float) -> None:
    """Add (``sign`` 1) or take out (−1) one anchored reply's terms, in place (float64)."""
    w = sign * (float(term.num_examples) if weighted else 1.0)
    for key, fisher in term.fisher.items():
        f, u = fisher.double(), term.delta[key].double()
        g = _gain(f, prior, key)
        if f"f/{key}" not in sums:
            sums.update({f"{name}/{key}": torch.zeros_like(f) for name in _SUMS})
        sums[f"u/{key}"].add_(u, alpha=w)
        sums[f"g/{key}"].add_(g, alpha=w)
        sums[f"fu/{key}"].addcmul_(f, u, value=w)
        sums[f"fg/{key}"].addcmul_(f, g, value=w)
        sums[f"f/{key}"].add_(f, alpha=w)
    for key, value in term.delta.items():
        if key not in term.fisher and value.is_floating_point():
            total = sums.setdefault(f"buffer/{key}", torch.zeros_like(value, dtype=torch.float64))
            total.add_(value.double(), alpha=sign * float(term.num_examples))
