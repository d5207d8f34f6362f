"""Server momentum on the merged update (no Flower here): what FedAvgM does for FedAvg,
applied to FedUGM's Fisher-preconditioned step (docs/design.md §1, "Server momentum").

Round r merges the clients' replies into θ⁺_r (Eq. 6). With server learning rate η and
momentum β, the global moves by the momentum of the merged steps u_r = θ⁺_r − θ_{r−1}:

    m_r = β · m_{r−1} + u_r,        θ_r = θ_{r−1} + η · m_r,        m_0 = 0.

This is Flower's FedAvgM update (pseudo-gradient θ_{r−1} − θ⁺_r) with the plain average
replaced by the UGM merge. η = 1, β = 0 is the plain UGM round, which keeps the
linear-regression oracle exact; with β > 0 round 1 is still the UGM merge (m_0 = 0), later
rounds are not a MAP of anything but a heavy-ball step along the merged directions.
``server_optimizer="adam"`` applies Flower's FedAdam update to the merged step instead
(:func:`server_update`). The round engine (``fl_ugm.engine.step``) calls :func:`server_step`;
the ledger stores the state each round started from, so replay removal replays either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from torch import Tensor

SERVER_OPTIMIZERS = ("momentum", "adam")


#: The server optimizer's state after a round: (m_r,) for momentum, (m_r, v_r) for Adam; an
#: empty tuple (or a missing key) is the zero state.
OptimizerState = tuple[dict[str, Tensor], ...]


def server_update(step: Mapping[str, Tensor], state: OptimizerState, *, optimizer: str,
                  server_lr: float, server_momentum: float, server_round: int,
                  beta_2: float = 0.99, tau: float = 1e-3
                  ) -> tuple[dict[str, Tensor], OptimizerState]:
    """(θ_r − θ_{r−1}, the new state) for the merged step u_r = ``step`` (float entries) and
    the state the round started from.

    "momentum": m_r = β m_{r−1} + u_r, θ_r − θ_{r−1} = η m_r (Flower's FedAvgM).
    "adam": m_r = β₁ m_{r−1} + (1 − β₁) u_r, v_r = β₂ v_{r−1} + (1 − β₂) u_r², θ_r − θ_{r−1}
    = η̂ m_r / (√v_r + τ) with η̂ = η √(1 − β₂^{r+1}) / (1 − β₁^{r+1}), β₁ = ``server_momentum``
    (``flwr.serverapp.strategy.FedAdam``, whose defaults β₂ 0.99, τ 1e-3 these are)."""
    if optimizer == "momentum":
        previous = state[0] if state else {}
        momentum = {k: u + server_momentum * previous[k].to(u.dtype) if k in previous else u
                    for k, u in step.items()}
        return {k: server_lr * m for k, m in momentum.items()}, (momentum,)
    if optimizer != "adam":
        raise ValueError(f"server optimizer {optimizer!r}; choose one of {SERVER_OPTIMIZERS}.")
    beta_1 = server_momentum
    first, second = state if state else ({}, {})
    first = {k: beta_1 * first[k].to(u.dtype) + (1 - beta_1) * u if k in first
             else (1 - beta_1) * u for k, u in step.items()}
    second = {k: beta_2 * second[k].to(u.dtype) + (1 - beta_2) * u * u if k in second
              else (1 - beta_2) * u * u for k, u in step.items()}
    rate = server_lr * math.sqrt(1 - beta_2 ** (server_round + 1)) / (
        1 - beta_1 ** (server_round + 1))
    return {k: rate * first[k] / (second[k].sqrt() + tau) for k in step}, (first, second)


def server_step(start: Mapping[str, Tensor], merged: Mapping[str, Tensor],
                state: OptimizerState, *, keys: Iterable[str] | None = None,
                **options) -> tuple[dict[str, Tensor], OptimizerState]:
    """(θ_r, the new state) from θ_{r−1} = ``start``, θ⁺_r = ``merged`` and the state the
    round started from; ``options`` as :func:`server_update`'s. Only the parameters ``keys``
    (default: every floating-point entry) move by the optimizer; every other entry takes the
    merged value: integer buffers such as BatchNorm's ``num_batches_tracked``, and float
    buffers such as its running statistics, which a server step can push out of their range
    (a momentum step on a running variance makes it negative: Flower's FedAvgM does). The
    state has those keys, in the state's dtype."""
    keys = [k for k, v in merged.items() if v.is_floating_point()] if keys is None else keys
    change, state = server_update({k: merged[k] - start[k] for k in keys}, state, **options)
    new_state = dict(merged)
    new_state.update({k: start[k] + c for k, c in change.items()})
    return new_state, state
