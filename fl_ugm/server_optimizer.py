"""Server momentum on the merged update (no Flower here): what FedAvgM does for FedAvg,
applied to FedUGM's Fisher-preconditioned step (docs/design.md §1, "Server momentum").

Round r merges the clients' replies into θ⁺_r (Eq. 6). With server learning rate η and
momentum β, the global moves by the momentum of the merged steps u_r = θ⁺_r − θ_{r−1}:

    m_r = β · m_{r−1} + u_r,        θ_r = θ_{r−1} + η · m_r,        m_0 = 0.

This is Flower's FedAvgM update (pseudo-gradient θ_{r−1} − θ⁺_r) with the plain average
replaced by the UGM merge. η = 1, β = 0 is the plain UGM round, which keeps the
linear-regression oracle exact; with β > 0 round 1 is still the UGM merge (m_0 = 0), later
rounds are not a MAP of anything but a heavy-ball step along the merged directions.
Replay removal (``fl_ugm.removal``) replays the momentum too, from the buffer each round
started with (stored in the ledger's history).

``server_optimizer="adam"`` applies Flower's FedAdam update to the merged step instead
(:func:`adam_step`); it is not yet combinable with a ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

SERVER_OPTIMIZERS = ("momentum", "adam")


def check_server_optimizer(server_lr: float, server_momentum: float) -> None:
    """Raise ``ValueError`` unless η is finite and > 0 and 0 ≤ β < 1."""
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr={server_lr}; the server learning rate η must be finite "
                         "and > 0 (1: apply the merged update as it is).")
    if not (math.isfinite(server_momentum) and 0 <= server_momentum < 1):
        raise ValueError(f"server_momentum={server_momentum}; β must be in [0, 1) "
                         "(0: no momentum).")


def uses_server_optimizer(server_lr: float, server_momentum: float) -> bool:
    """False for η = 1, β = 0: the merged state is the new global as it is."""
    return server_lr != 1.0 or server_momentum != 0.0


def _float_steps(start: Mapping[str, Tensor], merged: Mapping[str, Tensor]
                 ) -> dict[str, Tensor]:
    """u_r = θ⁺_r − θ_{r−1} for the floating-point entries (integer buffers do not move)."""
    return {k: v - start[k] for k, v in merged.items() if v.is_floating_point()}


def momentum_update(step: Mapping[str, Tensor], momentum: Mapping[str, Tensor] | None,
                    server_momentum: float) -> dict[str, Tensor]:
    """m_r = β · m_{r−1} + u_r per key of ``step`` (u_r); a missing m_{r−1} counts as 0."""
    if not momentum:
        return dict(step)
    return {k: u + server_momentum * momentum[k].to(u.dtype) if k in momentum else u
            for k, u in step.items()}


def momentum_step(
    start: Mapping[str, Tensor],
    merged: Mapping[str, Tensor],
    momentum: Mapping[str, Tensor] | None,
    *,
    server_lr: float,
    server_momentum: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(θ_r, m_r) from θ_{r−1} = ``start``, θ⁺_r = ``merged`` and m_{r−1} = ``momentum``
    (None or a missing key: 0). Only floating-point entries move (integer buffers such as
    BatchNorm's ``num_batches_tracked`` take the merged value); m_r has the float keys, in
    the state's dtype."""
    steps = _float_steps(start, merged)
    new_momentum = momentum_update(steps, momentum, server_momentum)
    new_state = dict(merged)
    new_state.update({k: start[k] + server_lr * m for k, m in new_momentum.items()})
    return new_state, new_momentum


def adam_step(
    start: Mapping[str, Tensor],
    merged: Mapping[str, Tensor],
    state: tuple[dict[str, Tensor], dict[str, Tensor]] | None,
    *,
    server_lr: float,
    server_round: int,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[dict[str, Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Flower's FedAdam update applied to the merged step u_r = θ⁺_r − θ_{r−1} (the float
    entries): m_r = β₁ m_{r−1} + (1 − β₁) u_r, v_r = β₂ v_{r−1} + (1 − β₂) u_r²,
    θ_r = θ_{r−1} + η̂ m_r / (√v_r + τ) with η̂ = η √(1 − β₂^{r+1}) / (1 − β₁^{r+1}) (as
    ``flwr.serverapp.strategy.FedAdam``, whose defaults β₁ 0.9, β₂ 0.99, τ 1e-3 these are).
    Returns (θ_r, (m_r, v_r)); ``state`` None is m_0 = v_0 = 0."""
    steps = _float_steps(start, merged)
    first, second = state if state is not None else ({}, {})
    first = {k: beta_1 * first.get(k, 0) + (1 - beta_1) * u for k, u in steps.items()}
    second = {k: beta_2 * second.get(k, 0) + (1 - beta_2) * u * u for k, u in steps.items()}
    rate = server_lr * math.sqrt(1 - beta_2 ** (server_round + 1)) / (
        1 - beta_1 ** (server_round + 1))
    new_state = dict(merged)
    new_state.update({k: start[k] + rate * first[k] / (second[k].sqrt() + tau) for k in steps})
    return new_state, (first, second)
