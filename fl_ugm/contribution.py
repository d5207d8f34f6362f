"""A client's reply as merged: the one representation the strategy, the memory, the ledger
and the replay share (``fl_ugm.engine`` merges it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Contribution:
    """One client's reply as merged: Δ_t (every float entry it trained: parameters and
    float buffers), F_t (the parameters; a sum over its n_t examples, after the Fisher clip)
    and n_t. ``client_id`` is its stable id (None: it cannot be recorded or remembered)."""

    client_id: str | None
    num_examples: float
    delta: Mapping[str, Tensor]
    fisher: Mapping[str, Tensor]

    def to(self, dtype: torch.dtype) -> Contribution:
        """The float tensors in ``dtype``."""
        return dataclasses.replace(self, delta=cast_tensors(self.delta, dtype),
                                   fisher=cast_tensors(self.fisher, dtype))

    def like(self, reference: Mapping[str, Tensor]) -> Contribution:
        """Each tensor in the dtype of ``reference``'s entry of the same key."""
        return dataclasses.replace(self, delta=like_tensors(self.delta, reference),
                                   fisher=like_tensors(self.fisher, reference))


def cast_tensors(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The float tensors in ``dtype`` (the others as they are)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def like_tensors(tensors: Mapping[str, Tensor], reference: Mapping[str, Tensor]
                 ) -> dict[str, Tensor]:
    """Each tensor in the dtype of ``reference``'s entry of the same key."""
    return {k: v.to(reference[k].dtype) for k, v in tensors.items()}
