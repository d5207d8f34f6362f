"""Client dual variables: FedDyn's drift correction in UGM's units (docs/design.md §1,
"Client dual variables"). Pure torch; the Flower side is ``fl_ugm.client.handle_train``.

Client t keeps λ_t across the rounds it takes part in: one float32 tensor per trainable
parameter, in the units of a SUMMED loss's gradient (λ_0 = 0). In a round it

1. trains on ℓ_t(w) − ⟨λ_t, w⟩ + ½‖w − θ‖²_P from the global θ (P: the server's prior
   precision, δ or δ + C per entry; ``train_classifier(dual=λ_t)``),
2. reports Δ'_t = Δ_t − λ_t / (P + F_t) (:func:`reported_delta`), where Δ_t = θ_t − θ and
   F_t its Fisher (a sum over its examples),
3. keeps λ_t ← λ_t − ρ·P·Δ_t (:func:`next_dual`); ρ = 1 makes λ_t the gradient of ℓ_t at θ_t
   when training reached its optimum (FedDyn's update).

Why Δ'_t: on a quadratic ℓ_t with Hessian F_t, Δ'_t is exactly the Δ_t of training without
the linear term, so the merge, the ledger and replay removal see what they always saw and
the linear-regression oracle stays exact for any λ. On a real loss the linear term keeps
each client's training near the global optimum (λ_t → ∇ℓ_t(θ*), where Σ_t ∇ℓ_t = 0), so
the merge's Taylor expansion around θ_t is taken where it is needed, and FedUGM's fixed
point becomes a stationary point of the joint loss instead of a drift-biased one.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fl_ugm.merge import prior_at

#: The ArrayRecord of a node's persistent state (Flower's ``context.state``) holding λ_t.
DUAL_STATE_RECORD = "ugm-dual"


def reported_delta(delta: Mapping[str, Tensor], fisher: Mapping[str, Tensor],
                   prior: float | Mapping[str, Tensor | float],
                   dual: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Δ' = Δ − λ / (P + F) for the entries ``dual`` names; the other entries of ``delta``
    (buffers) as they are. ``prior`` P: a float or per parameter (tensor or float), > 0."""
    return {key: value - dual[key] / (prior_at(prior, key) + fisher[key]) if key in dual
            else value for key, value in delta.items()}


def next_dual(dual: Mapping[str, Tensor], delta: Mapping[str, Tensor],
              prior: float | Mapping[str, Tensor | float], step: float) -> dict[str, Tensor]:
    """λ − ρ·P·Δ, with Δ the training's own step (not the reported Δ'), ρ = ``step``."""
    return {key: value - step * prior_at(prior, key) * delta[key]
            for key, value in dual.items()}
