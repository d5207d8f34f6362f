"""The defences against hostile clients, as pure tensor math (no Flower).

UGM gives a client weight where its Fisher says it knows most, so a hostile client can do
more harm than under FedAvg: by inflating its Fisher (it takes over the merge) or by sending
a poisoned Δ (it is trusted most on its own classes). Two defences, both run by
``FedUGM.aggregate_train`` before the merge (docs/design.md §1, "Defences"):

* :func:`clip_num_examples` and :func:`clip_fisher_inflation` bound a client's **weight**:
  its claimed number of examples (α_t ∝ n_t) and its per-example Fisher mass, per tensor,
  each at most ``factor`` × the median client's.
* :class:`UpdateScreen` bounds a client's **content**: its Δ's norm at most ``norm_bound`` ×
  the median client's (scaled down to the bound), and, if asked (``min_cosine``), a Δ that
  points away from the coordinate-wise median of the round's deltas (cosine ≤
  ``min_cosine``) is dropped, at most ⌊(T − 1) / 2⌋ clients of T, the lowest cosines first.

A defence that does not fire changes nothing: the merge of the clients it keeps, with the
tensors it leaves alone, is exactly the plain UGM merge (the linear oracle of design §1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Params = Mapping[str, Tensor]


def clip_num_examples(num_examples: Sequence[float], factor: float,
                      known: Sequence[float | None] | None = None
                      ) -> tuple[list[float], list[tuple[int, float]]]:
    """The weight defence: (the claimed n_t, each at most ``factor`` × the lower median claim
    of the round and at most the size the server knows for it (``known``, None where it
    knows none), which clients were bounded with their claim / median).

    α_t is n_t / Σn, so a client that claims more examples than it has weighs more; bounded
    like its Fisher, it weighs at most ``factor`` median clients. With fewer than 2 claims
    the median bounds nothing (a known size still does)."""
    if factor < 1:
        raise ValueError(f"clip_num_examples: factor={factor}; it must be ≥ 1.")
    out = [float(n) for n in num_examples]
    median = sorted(out)[(len(out) - 1) // 2] if len(out) >= 2 else math.inf
    known = known or [None] * len(out)
    bounded = []
    for index, claimed in enumerate(out):
        limit = min(factor * median, known[index] or math.inf)
        if claimed > limit:
            out[index] = limit
            bounded.append((index, claimed / median if math.isfinite(median) else math.inf))
    return out, bounded


def clip_fisher_inflation(
    fishers: Sequence[Params], num_examples: Sequence[float], factor: float
) -> tuple[list[dict[str, Tensor]], list[tuple[int, str, float]]]:
    """The Fisher-inflation defence: (fishers with outliers scaled down, what was clipped).

    Per tensor, each client's per-example Fisher mass ΣF_t / n_t is compared with the lower
    median over clients (robust to any minority of inflated clients); a tensor above
    ``factor`` × median is multiplied by ``factor`` × median / mass, so its mass is exactly
    the bound. A client then weighs at most ``factor`` median clients of its size in the
    merge. Tensors are only replaced, never modified. Non-finite masses are left for
    validation to reject and do not count towards the median; with fewer than 2 finite
    masses or a zero median, that tensor is left as it is. The report lists
    (client index, key, mass / median) per clipped tensor.
    """
    if factor < 1:
        raise ValueError(f"clip_fisher_inflation: factor={factor}; it must be ≥ 1.")
    out = [dict(f) for f in fishers]
    clipped: list[tuple[int, str, float]] = []
    if len(out) < 2:
        return out, clipped
    for key in out[0]:
        masses = torch.tensor([float(f[key].double().sum()) / n
                               for f, n in zip(out, num_examples, strict=True)],
                              dtype=torch.float64)
        finite = masses[torch.isfinite(masses)]
        if len(finite) < 2 or not float(finite.median()) > 0:
            continue
        median = float(finite.median())  # the lower median
        for index, mass in enumerate(masses.tolist()):
            if math.isfinite(mass) and mass > factor * median:
                out[index][key] = out[index][key] * (factor * median / mass)
                clipped.append((index, key, mass / median))
    return out, clipped


@dataclass(frozen=True)
class ScreenVerdict:
    """What the screen measured and did to one client's Δ.

    ``cosine``: cos(Δ_t, m) with m the coordinate-wise median of the round's deltas (over the
    screened keys, all tensors as one vector); ``norm_ratio``: ‖Δ_t‖ / the lower median of
    the clients' ‖Δ‖; ``scale``: the factor Δ_t was multiplied by (1: untouched);
    ``dropped``: the client is left out of the round. NaN for a client with a non-finite Δ
    (left for the merge's validation to reject); the cosine is NaN too without the cosine
    screen (``min_cosine=None``: the median is not computed).
    """

    cosine: float
    norm_ratio: float
    scale: float = 1.0
    dropped: bool = False


@dataclass(frozen=True)
class UpdateScreen:
    """The update screen: a norm bound, then a cosine screen against a robust centre.

    Parameters
    ----------
    norm_bound : float or None (default: 3.0)
        A Δ longer than ``norm_bound`` × the lower median of the round's ‖Δ‖ is scaled down
        to exactly that length (a ×10 update becomes a 3× one). ≥ 1; None: no bound
        (docs/design.md §1 has how far honest clients reach).
    min_cosine : float or None (default: None, off)
        A Δ whose cosine with the coordinate-wise median of the round's deltas is ≤
        ``min_cosine`` (0: it points away from what most clients ask for) is dropped; at
        most ⌊(T − 1) / 2⌋ of T clients, the lowest cosines first, so the majority the
        median stands for is never overruled. In (−1, 1). Off by default: on non-IID
        clients it also drops honest ones (docs/design.md §1 has the measured cost); it pays
        against update poisoning.
    min_clients : int (default: 3)
        With fewer (finite) deltas than this in a round there is no robust centre: the
        screen leaves the round alone.
    """

    norm_bound: float | None = 3.0
    min_cosine: float | None = None
    min_clients: int = 3

    def __post_init__(self) -> None:
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound)
                                                and self.norm_bound >= 1):
            raise ValueError(f"UpdateScreen: norm_bound={self.norm_bound}; it must be ≥ 1, "
                             "or None.")
        if self.min_cosine is not None and not -1 < self.min_cosine < 1:
            raise ValueError(f"UpdateScreen: min_cosine={self.min_cosine}; it must be in "
                             "(-1, 1), or None.")
        if self.min_clients < 3:
            raise ValueError(f"UpdateScreen: min_clients={self.min_clients}; a median needs "
                             "at least 3 clients.")

    def __call__(self, deltas: Sequence[Params], keys: Sequence[str] | None = None
                 ) -> tuple[list[dict[str, Tensor]], list[ScreenVerdict]]:
        """(the deltas, those out of bounds scaled down, and one verdict per client).

        ``keys``: the entries to measure and scale (default: every key of ``deltas[0]``; FedUGM
        passes the Fisher's keys, the parameters, so buffers are neither measured nor
        scaled). Tensors are only replaced, never modified; a dropped client's Δ is returned
        as it came (the caller leaves it out).
        """
        keys = list(deltas[0] if keys is None else keys)
        out = [dict(d) for d in deltas]
        cosines, norms = _cosines_and_norms(deltas, keys, self.min_cosine is not None)
        finite = [i for i, n in enumerate(norms) if math.isfinite(n)]
        if len(finite) < self.min_clients:
            return out, [ScreenVerdict(c, math.nan) for c in cosines]
        median_norm = sorted(norms[i] for i in finite)[(len(finite) - 1) // 2]
        ratios = [n / median_norm if median_norm > 0 else math.nan for n in norms]
        scales = [1.0] * len(out)
        if self.norm_bound is not None:
            for i in finite:
                if ratios[i] > self.norm_bound:
                    scales[i] = self.norm_bound / ratios[i]
                    out[i].update({k: out[i][k] * scales[i] for k in keys})
        dropped: set[int] = set()
        if self.min_cosine is not None:
            below = sorted((cosines[i], i) for i in finite if cosines[i] <= self.min_cosine)
            dropped = {i for _, i in below[:(len(finite) - 1) // 2]}
        verdicts = [ScreenVerdict(cosines[i], ratios[i], scales[i], i in dropped)
                    for i in range(len(out))]
        return out, verdicts


def _cosines_and_norms(deltas: Sequence[Params], keys: Sequence[str], with_cosines: bool
                       ) -> tuple[list[float], list[float]]:
    """Per client, cos(Δ_t, m) and ‖Δ_t‖ over ``keys`` taken as one vector, with m the
    coordinate-wise median of the finite clients' deltas (float64; one tensor stacked at a
    time, so memory stays at T × the largest tensor). NaN for a non-finite Δ, and every
    cosine NaN unless ``with_cosines``; a cosine with a zero Δ or a zero centre is 1
    (nothing to screen)."""

    def stacked(key: str) -> Tensor:
        return torch.stack([d[key].detach().reshape(-1) for d in deltas]).double()

    squares = torch.tensor([sum(float(d[key].double().square().sum()) for key in keys)
                            for d in deltas], dtype=torch.float64)
    finite = torch.isfinite(squares)
    dots = torch.zeros(len(deltas), dtype=torch.float64)
    centre_square = 0.0
    if with_cosines and bool(finite.any()):
        for key in keys:
            rows = stacked(key)
            centre = rows[finite].median(dim=0).values
            dots += rows @ centre
            centre_square += float(centre @ centre)
    cosines, norms = [], []
    for dot, square, ok in zip(dots.tolist(), squares.tolist(), finite.tolist(), strict=True):
        scale = math.sqrt(square * centre_square)
        cosines.append(math.nan if not (ok and with_cosines) else dot / scale if scale > 0
                       else 1.0)
        norms.append(math.sqrt(square) if ok else math.nan)
    return cosines, norms
