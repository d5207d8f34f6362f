"""UGM merging, client removal and the one-shot baselines, as pure tensor math.

Every function takes models as ``Mapping[str, Tensor]`` (one entry per parameter tensor, the
same keys and shapes everywhere) and returns a new ``dict[str, Tensor]``; inputs are never
modified. Products and quotients are element-wise (diagonal curvature). Units
(docs/design.md §1):

* ``deltas[t]`` = θ_t − θ, the client's fine-tuned weights minus the weights it started from.
* ``fishers[t]`` = F_t, the diagonal Fisher summed (not averaged) over the client's examples.
* ``prior_precision`` = H0, in the same units as F: a positive float (δ) or a mapping of
  per-tensor positive tensors (e.g. δ + n0·F0).
* ``alphas`` = α_t, already normalised and scaled by the caller.

Arithmetic is done in float32 or wider (the widest float dtype among the inputs); results
come back in the dtype of ``base``. No Flower here: see ``fl_ugm.strategy`` for that.

Bad input raises :class:`InvalidClientInput` (a ``ValueError`` naming the client index and
tensor key) when one client's delta, Fisher or α is at fault, and a plain ``ValueError``
when the call as a whole is (the base model, the prior, the number of clients or alphas);
nothing is ever partially written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from fl_ugm import _kernels

Params = Mapping[str, Tensor]
PriorPrecision = float | Mapping[str, Tensor | float]
Backend = Literal["auto", "numba", "torch"]

#: Prior precision standing in for H0 → 0 in :func:`fisher_averaging`.
FISHER_AVERAGING_EPS = 1e-12


class InvalidClientInput(ValueError):
    """A client's delta, Fisher or alpha is unusable.

    ``client_index`` is its position in the sequences passed in (None for the single client of
    :func:`remove_client`); ``key`` the tensor, when one tensor is at fault.
    """

    def __init__(
        self, message: str, *, client_index: int | None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.client_index = client_index
        self.key = key


# --------------------------------------------------------------------------- public API


def ugm_merge(
    base: Params,
    deltas: Sequence[Params],
    fishers: Sequence[Params],
    *,
    alphas: Sequence[float],
    prior_precision: PriorPrecision,
    backend: Backend = "auto",
) -> dict[str, Tensor]:
    """Merge client deltas with Fisher preconditioning (Eq. 6, docs/design.md §1).

    θ⁺ = θ + Σ_t α_t (H0 + F_t) / (H0 + Σ_s α_s F_s) · Δ_t

    Parameters
    ----------
    base : Mapping[str, Tensor]
        θ, the model every client started from.
    deltas, fishers : Sequence[Mapping[str, Tensor]]
        One Δ_t and one F_t (sum over the client's examples, ≥ 0) per client.
    alphas : Sequence[float]
        One weight α_t ≥ 0 per client, already normalised/scaled.
    prior_precision : float or Mapping[str, Tensor | float]
        H0 > 0, a scalar or one positive tensor (or scalar) per key.
    backend : {"auto", "numba", "torch"}
        ``"numba"``: the fused cache-blocked CPU kernel (CPU tensors only); ``"torch"``: one
        torch op per client and tensor (any device); ``"auto"``: numba on the CPU.

    Returns
    -------
    dict[str, Tensor]
        θ⁺ in the dtype and device of ``base``.
    """
    _check_clients("ugm_merge", base, deltas, fishers)
    weights = _check_alphas("ugm_merge", alphas, len(deltas), allow_negative=False)
    priors = _check_prior("ugm_merge", prior_precision, base)
    compute = {key: _compute_dtype(theta, *(d[key] for d in deltas),
                                   *(f[key] for f in fishers), priors[key])
               for key, theta in base.items()}
    on_cpu = all(theta.device.type == "cpu" for theta in base.values())
    if backend == "numba" and not on_cpu:
        raise ValueError("ugm_merge: backend='numba' needs CPU tensors; use 'torch' or 'auto'.")
    merge = _merge_numba if backend == "numba" or (backend == "auto" and on_cpu) else _merge_torch
    merged, clean = merge(base, deltas, fishers, weights, priors, compute)
    for key, out in merged.items():
        if clean[key]:
            continue
        _raise_first_bad_client("ugm_merge", key, base, deltas, fishers)
        if not bool(torch.isfinite(out).all()):
            _raise_largest_client("ugm_merge", key, compute[key], deltas, weights,
                                  fishers, priors[key])
    return {key: out.to(base[key].dtype) for key, out in merged.items()}


def fisher_averaging(
    base: Params,
    deltas: Sequence[Params],
    fishers: Sequence[Params],
    *,
    alphas: Sequence[float],
    eps: float = FISHER_AVERAGING_EPS,
) -> dict[str, Tensor]:
    """Fisher-weighted averaging of the deltas: the H0 → 0 limit of :func:`ugm_merge`.

    θ⁺ = θ + Σ_t α_t F_t Δ_t / Σ_s α_s F_s, computed as ``ugm_merge`` with H0 = ``eps`` so a
    coordinate where every Fisher is zero gets Σ_t α_t Δ_t instead of 0/0.
    """
    return ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=eps)


def task_arithmetic(
    base: Params, deltas: Sequence[Params], *, alphas: Sequence[float]
) -> dict[str, Tensor]:
    """θ⁺ = θ + Σ_t α_t Δ_t (task arithmetic; α_t may be negative, e.g. for negation)."""
    _check_clients("task_arithmetic", base, deltas)
    weights = _check_alphas("task_arithmetic", alphas, len(deltas), allow_negative=True)
    merged = {}
    for key, theta in base.items():
        compute = _compute_dtype(theta, *(d[key] for d in deltas))
        acc = theta.detach().to(compute, copy=True)
        for weight, delta in zip(weights, deltas, strict=True):
            acc.add_(delta[key].detach().to(compute), alpha=weight)
        if not bool(torch.isfinite(acc).all()):
            _raise_first_bad_client("task_arithmetic", key, base, deltas)
            _raise_largest_client("task_arithmetic", key, compute, deltas, weights)
        merged[key] = acc.to(theta.dtype)
    return merged


def weighted_average(base: Params, deltas: Sequence[Params], *, alphas: Sequence[float]
                     ) -> dict[str, Tensor]:
    """FedAvg arithmetic: θ⁺ = θ + Σ_t α_t Δ_t / Σ_s α_s (α_t ≥ 0, e.g. n_t; normalised here)."""
    checked = _check_alphas("weighted_average", alphas, len(deltas), allow_negative=False)
    if not any(a > 0 for a in checked):
        raise ValueError("weighted_average: the alphas sum to 0; give at least one client > 0.")
    return task_arithmetic(base, deltas, alphas=proportions(checked))


def proportions(weights: Sequence[float]) -> list[float]:
    """w_t / Σ_s w_s for finite w_t ≥ 0 with a positive sum (float64)."""
    try:
        total = math.fsum(weights)
    except OverflowError:  # too large to sum: the same ratios, scaled down first
        top = max(weights)
        return proportions([w / top for w in weights])
    return [w / total for w in weights]


def ugm_shares(
    base: Params,
    deltas: Sequence[Params],
    fishers: Sequence[Params],
    *,
    alphas: Sequence[float],
    prior_precision: PriorPrecision,
) -> list[dict[str, Tensor]]:
    """Each client's term of Eq. 6: α_t (H0 + F_t) Δ_t / (H0 + Σ_s α_s F_s).

    Σ_t of the shares is ``ugm_merge(...) − base`` (to round-off): what the merge added to
    the global on each client's behalf (the ledger's ``applied`` sums). Computed in float64,
    returned in ``base``'s dtypes. Same arguments and checks as :func:`ugm_merge`.
    """
    _check_clients("ugm_shares", base, deltas, fishers)
    weights = _check_alphas("ugm_shares", alphas, len(deltas), allow_negative=False)
    priors = _check_prior("ugm_shares", prior_precision, base)
    shares: list[dict[str, Tensor]] = [{} for _ in deltas]
    for key, theta in base.items():
        h0 = _as_tensor(priors[key], torch.float64, theta.device)
        denominator = h0 + sum(a * f[key].double() for a, f in zip(weights, fishers, strict=True))
        for share, alpha, delta, fisher in zip(shares, weights, deltas, fishers, strict=True):
            value = alpha * (h0 + fisher[key].double()) * delta[key].double() / denominator
            share[key] = value.to(theta.dtype)
    return shares


def remove_client(
    params: Params,
    delta: Params,
    fisher: Params,
    fisher_rest: Params,
    *,
    alpha: float,
    prior_precision: PriorPrecision,
) -> dict[str, Tensor]:
    """Remove client t's contribution from a model that includes it (Eq. 13, docs/design.md §1).

    θ₋t = θ − α_t (H0 + F_t) / (H0 + Σ_{s≠t} α_s F_s) · Δ_t

    ``params`` is θ (it includes client t); ``delta``, ``fisher`` are client t's Δ_t and F_t
    (a sum over its examples), from fine-tuning from ``params`` (online removal) or its last
    stored contribution (offline); ``fisher_rest`` is Σ_{s≠t} α_s F_s over the clients that
    stay (≥ 0); ``alpha`` is α_t ≥ 0, the weight t had; ``prior_precision`` H0 > 0, as in
    :func:`ugm_merge`.
    """
    fn = "remove_client"
    _check_base(fn, params)
    for name, mapping in (("delta", delta), ("fisher", fisher), ("fisher_rest", fisher_rest)):
        _check_like(fn, params, name, mapping)
    (weight,) = _check_alphas(fn, [alpha], 1, allow_negative=False)
    priors = _check_prior(fn, prior_precision, params)
    result = {}
    for key, theta in params.items():
        compute = _compute_dtype(theta, delta[key], fisher[key], fisher_rest[key], priors[key])
        client_fisher = fisher[key].detach().to(compute)
        rest = fisher_rest[key].detach().to(compute)
        for name, values in (("fisher", client_fisher), ("fisher_rest", rest)):
            if not bool((values >= 0).all()):  # NaN fails this too
                raise InvalidClientInput(
                    f"{fn}: {name}['{key}'] has negative or NaN entries; a diagonal Fisher is "
                    "a sum of squares and must be ≥ 0.",
                    client_index=None, key=key)
        h0 = _as_tensor(priors[key], compute, theta.device)
        step = (h0 + client_fisher) * delta[key].detach().to(compute) / (h0 + rest)
        out = theta.detach().to(compute) - weight * step
        if not bool(torch.isfinite(out).all()):
            if not bool(torch.isfinite(theta).all()):
                raise ValueError(f"{fn}: params['{key}'] contains NaN or Inf.")
            raise InvalidClientInput(
                f"{fn}: the update of '{key}' is not finite; delta['{key}'] or the Fishers "
                "contain Inf/NaN or overflow.",
                client_index=None, key=key)
        result[key] = out.to(theta.dtype)
    return result


# --------------------------------------------------------------------------- merge backends


def _merge_numba(base, deltas, fishers, alphas, priors, compute):
    """All tensors through the fused kernel, one call per compute dtype."""

    def ready(tensor: Tensor, dtype: torch.dtype) -> Tensor:
        return tensor.detach().to(dtype).contiguous()

    merged: dict[str, Tensor] = {}
    clean: dict[str, bool] = {}
    for dtype in set(compute.values()):
        keys = [key for key in base if compute[key] == dtype]
        outs = [torch.empty(base[key].shape, dtype=dtype) for key in keys]
        flags = _kernels.ugm_merge_tensors(
            [ready(base[key], dtype) for key in keys],
            [[ready(d[key], dtype) for key in keys] for d in deltas],
            [[ready(f[key], dtype) for key in keys] for f in fishers],
            alphas,
            [ready(priors[k], dtype) if isinstance(priors[k], Tensor) else priors[k]
             for k in keys],
            outs,
        )
        merged.update(zip(keys, outs, strict=True))
        clean.update(zip(keys, flags, strict=True))
    return merged, clean


def _merge_torch(base, deltas, fishers, alphas, priors, compute):
    """One torch op per client and tensor; works on any device."""
    merged: dict[str, Tensor] = {}
    clean: dict[str, bool] = {}
    for key, theta in base.items():
        dtype = compute[key]
        weighted_sum = torch.zeros(theta.shape, dtype=dtype, device=theta.device)  # Σ α Δ
        fisher_delta = torch.zeros_like(weighted_sum)  # Σ α F Δ
        fisher_sum = torch.zeros_like(weighted_sum)  # Σ α F
        ok = True
        for alpha, delta, fisher in zip(alphas, deltas, fishers, strict=True):
            delta_t = delta[key].detach().to(dtype)
            fisher_t = fisher[key].detach().to(dtype)
            ok = ok and bool((fisher_t >= 0).all())  # NaN fails this too
            weighted_sum.add_(delta_t, alpha=alpha)
            fisher_delta.addcmul_(fisher_t, delta_t, value=alpha)
            fisher_sum.add_(fisher_t, alpha=alpha)
        h0 = _as_tensor(priors[key], dtype, theta.device)
        out = theta.detach().to(dtype) + (h0 * weighted_sum + fisher_delta) / (h0 + fisher_sum)
        merged[key] = out
        clean[key] = ok and bool(torch.isfinite(out).all())
    return merged, clean


# --------------------------------------------------------------------------- validation


def _check_clients(
    fn: str, base: Params, deltas: Sequence[Params], fishers: Sequence[Params] | None = None
) -> None:
    """At least one client; per client, the same keys, shapes, float dtypes as ``base``."""
    if len(deltas) == 0:
        raise ValueError(f"{fn}: no clients given (deltas is empty); nothing to merge.")
    if fishers is not None and len(fishers) != len(deltas):
        raise ValueError(f"{fn}: got {len(deltas)} deltas but {len(fishers)} fishers; give "
                         "one of each per client.")
    _check_base(fn, base)
    for index, delta in enumerate(deltas):
        _check_like(fn, base, f"deltas[{index}]", delta, client_index=index)
    for index, fisher in enumerate(fishers or ()):
        _check_like(fn, base, f"fishers[{index}]", fisher, client_index=index)


def _check_base(fn: str, base: Params) -> None:
    if len(base) == 0:
        raise ValueError(f"{fn}: the base model has no tensors.")
    for key, theta in base.items():
        if not isinstance(theta, Tensor) or not theta.is_floating_point():
            kind = theta.dtype if isinstance(theta, Tensor) else type(theta).__name__
            raise ValueError(
                f"{fn}: base['{key}'] is {kind}; only float tensors can be merged. Pass the "
                "parameters (dict(model.named_parameters())) or the float entries of a "
                "state_dict ({k: v for k, v in state.items() if v.is_floating_point()}); "
                "integer buffers such as BatchNorm's num_batches_tracked are not merged."
            )


def _check_like(
    fn: str, base: Params, name: str, params: Params, *, client_index: int | None = None
) -> None:
    """``params`` has exactly ``base``'s keys, and float tensors of its shapes on its device."""

    def fail(message: str, key: str | None = None) -> InvalidClientInput:
        return InvalidClientInput(f"{fn}: {message}", client_index=client_index, key=key)

    if set(params) != set(base):
        missing = sorted(set(base) - set(params))
        extra = sorted(set(params) - set(base))
        raise fail(f"{name} has different keys than the base model (missing: {missing[:5]}, "
                   f"unexpected: {extra[:5]}).")
    for key, theta in base.items():
        tensor = params[key]
        where = f"{name}['{key}']"
        if not isinstance(tensor, Tensor):
            raise fail(f"{where} is a {type(tensor).__name__}, not a torch.Tensor.", key)
        if tensor.shape != theta.shape:
            raise fail(f"{where} has shape {tuple(tensor.shape)}, expected "
                       f"{tuple(theta.shape)} like the base model.", key)
        if not tensor.is_floating_point():
            raise fail(f"{where} has dtype {tensor.dtype}; expected a float tensor.", key)
        if tensor.device != theta.device:
            raise fail(f"{where} is on {tensor.device}, the base model on {theta.device}.", key)


def _check_alphas(
    fn: str, alphas: Sequence[float], num_clients: int, *, allow_negative: bool
) -> list[float]:
    values = [float(a) for a in alphas]
    if len(values) != num_clients:
        raise ValueError(f"{fn}: got {len(values)} alphas for {num_clients} clients; give "
                         "one per client.")
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise InvalidClientInput(f"{fn}: alphas[{index}] = {value} is not finite.",
                                     client_index=index)
        if value < 0 and not allow_negative:
            raise InvalidClientInput(f"{fn}: alphas[{index}] = {value} is negative; UGM "
                                     "weights must be ≥ 0 (use remove_client to take a client "
                                     "out).", client_index=index)
    return values


def _check_prior(fn: str, prior: PriorPrecision, base: Params) -> dict[str, float | Tensor]:
    """Return H0 per key (a float or a tensor of the key's shape); each value finite and > 0."""
    if isinstance(prior, Mapping):
        if set(prior) != set(base):
            raise ValueError(
                f"{fn}: prior_precision has different keys than the model (missing: "
                f"{sorted(set(base) - set(prior))[:5]}, unexpected: "
                f"{sorted(set(prior) - set(base))[:5]})."
            )
        per_key = dict(prior)
    else:
        per_key = dict.fromkeys(base, prior)
    checked: dict[str, float | Tensor] = {}
    for key, value in per_key.items():
        if isinstance(value, Tensor):
            if value.numel() == 1:
                value = float(value)
            elif value.shape != base[key].shape:
                raise ValueError(f"{fn}: prior_precision['{key}'] has shape "
                                 f"{tuple(value.shape)}, expected {tuple(base[key].shape)} or "
                                 "a scalar.")
            elif not bool((value > 0).all()) or not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"{fn}: prior_precision['{key}'] must be finite and > 0 everywhere (it is "
                    "the prior's precision H0; use a small positive δ, not 0)."
                )
        if not isinstance(value, Tensor):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{fn}: prior_precision must be a float or a mapping of tensors, got "
                    f"{type(value).__name__}."
                ) from None
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{fn}: prior_precision = {value} for '{key}'; it must be finite and > 0 "
                    "(it is the prior's precision H0; use a small positive δ, not 0)."
                )
        checked[key] = value
    return checked


def _raise_first_bad_client(
    fn: str, key: str, base: Params, deltas: Sequence[Params], fishers: Sequence[Params] = ()
) -> None:
    """Slow path after a bad result: raise for the base or the first client bad in ``key``."""
    if not bool(torch.isfinite(base[key]).all()):
        raise ValueError(f"{fn}: base['{key}'] contains NaN or Inf.")
    for index, delta in enumerate(deltas):
        if not bool(torch.isfinite(delta[key]).all()):
            raise InvalidClientInput(
                f"{fn}: deltas[{index}]['{key}'] contains NaN or Inf.",
                client_index=index, key=key)
    for index, fisher in enumerate(fishers):
        values = fisher[key]
        if not bool(torch.isfinite(values).all()):
            raise InvalidClientInput(
                f"{fn}: fishers[{index}]['{key}'] contains NaN or Inf.",
                client_index=index, key=key)
        if bool((values < 0).any()):
            raise InvalidClientInput(
                f"{fn}: fishers[{index}]['{key}'] has negative entries (min "
                f"{float(values.min()):.3g}); a diagonal Fisher is a sum of squares and must "
                "be ≥ 0.",
                client_index=index, key=key)


def _raise_largest_client(fn: str, key: str, compute: torch.dtype, deltas: Sequence[Params],
                          alphas: Sequence[float], fishers: Sequence[Params] = (),
                          prior: float | Tensor = 0.0) -> None:
    """After ``key`` overflowed: raise for the client with the largest |α (H0 + F) Δ| or αF."""
    sizes = []
    for index, (alpha, delta) in enumerate(zip(alphas, deltas, strict=True)):
        term = delta[key].detach().double().abs()
        fisher = fishers[index][key].detach().double() if fishers else None
        if fisher is not None:
            term = torch.maximum(term * (_as_tensor(prior, torch.float64, term.device) + fisher),
                                 fisher)
        sizes.append(abs(alpha) * float(term.max()) if term.numel() else 0.0)
    index = max(range(len(sizes)), key=sizes.__getitem__)
    raise InvalidClientInput(f"{fn}: '{key}' overflowed {compute}; deltas[{index}] (with its "
                             "Fisher) is too large for it.", client_index=index, key=key)


# --------------------------------------------------------------------------- dtype helpers


def prior_at(prior: PriorPrecision, key: str) -> float | Tensor:
    """H0 for tensor ``key``: the scalar, or the mapping's entry (not validated)."""
    return prior[key] if isinstance(prior, Mapping) else prior


def recentred_delta(delta: Params, fisher: Params, offset: Params, prior: PriorPrecision,
                    new_prior: PriorPrecision | None = None) -> dict[str, Tensor]:
    """A client's Δ moved to another start by the quadratic model (docs/design.md §1).

    A client that minimised a loss of Hessian F under the prior ½‖w − s‖²_P from s stopped at
    (P + F) θ_t = P s + F θ*; from θ = s − ``offset`` under the prior P' = ``new_prior``
    (default P) it would return ((P + F) Δ + F · offset) / (P' + F), i.e.
    Δ + F (s − θ) / (P + F) when P' = P. For the entries ``fisher`` names; the others
    (buffers) are kept as they are. Units: F a sum over examples, P in F's units.
    """
    out = dict(delta)
    for key, f in fisher.items():
        p = prior_at(prior, key)
        shift = f * offset[key].to(f.dtype)
        if new_prior is None:
            out[key] = delta[key] + shift / (p + f)
        else:
            out[key] = ((p + f) * delta[key] + shift) / (prior_at(new_prior, key) + f)
    return out


def _compute_dtype(*values: Tensor | float) -> torch.dtype:
    """float32, or float64 if any tensor among ``values`` is float64."""
    dtype = torch.float32
    for value in values:
        if isinstance(value, Tensor):
            dtype = torch.promote_types(dtype, value.dtype)
    return dtype


def _as_tensor(value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(dtype=dtype, device=device)
    return torch.tensor(value, dtype=dtype, device=device)
