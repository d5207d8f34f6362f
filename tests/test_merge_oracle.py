"""The exactness oracle (DESIGN §1, appendix §1.4): linear regression with diagonal XᵀX.

Each client t solves  min_θ ½‖y_t − X_t θ‖² + ½‖θ − θ0‖²_{H0}  exactly, so F_t = diag(X_tᵀX_t)
is its exact Hessian and the UGM merge must equal the α-weighted joint MAP, and the removal
update must equal exact retraining without the client, to float64 round-off.
"""

from __future__ import annotations

import pytest
import torch

from fl_ugm.merge import remove_client, ugm_merge

SHAPES = {"layer.weight": (3, 4), "layer.bias": (5,)}
DIM = sum(torch.Size(s).numel() for s in SHAPES.values())


def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, shape in SHAPES.items():
        size = torch.Size(shape).numel()
        out[key] = vector[start : start + size].reshape(shape).clone()
        start += size
    return out


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[key].reshape(-1) for key in SHAPES])


class Problem:
    """T clients with X_t = Q_t diag(s_t): orthonormal Q_t, so X_tᵀX_t = diag(s_t²)."""

    def __init__(self, num_clients: int, seed: int, per_tensor_prior: bool) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.theta0 = torch.randn(DIM, generator=gen, dtype=torch.float64)
        if per_tensor_prior:
            self.h0 = 0.05 + 2.0 * torch.rand(DIM, generator=gen, dtype=torch.float64)
        else:
            self.h0 = torch.full((DIM,), 0.3, dtype=torch.float64)
        self.hessians, self.xty = [], []
        for t in range(num_clients):
            rows = DIM + 3 + 4 * t
            q, _ = torch.linalg.qr(torch.randn(rows, DIM, generator=gen, dtype=torch.float64))
            scales = 0.2 + 3.0 * torch.rand(DIM, generator=gen, dtype=torch.float64)
            x = q * scales
            y = x @ torch.randn(DIM, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
                rows, generator=gen, dtype=torch.float64
            )
            assert torch.allclose(x.T @ x, torch.diag(scales**2), atol=1e-10)
            self.hessians.append(scales**2)
            self.xty.append(x.T @ y)

    def prior_mapping(self) -> dict[str, torch.Tensor]:
        return unflatten(self.h0)

    def fine_tune(self, t: int, start: torch.Tensor) -> torch.Tensor:
        """Client t's exact solution under the prior ½‖θ − start‖²_{H0}."""
        return (self.h0 * start + self.xty[t]) / (self.h0 + self.hessians[t])

    def joint_map(self, alphas: dict[int, float]) -> torch.Tensor:
        """argmin Σ_t α_t ℓ_t(θ) + ½‖θ − θ0‖²_{H0} over the clients in ``alphas``."""
        precision = self.h0 + sum(a * self.hessians[t] for t, a in alphas.items())
        return (self.h0 * self.theta0 + sum(a * self.xty[t] for t, a in alphas.items())) / precision


CASES = [
    pytest.param([1.0, 1.0, 1.0], False, id="ones-scalar-prior"),
    pytest.param([0.5, 0.2, 0.3], False, id="weights-scalar-prior"),
    pytest.param([0.7, 1.3, 0.4, 2.0], True, id="weights-per-tensor-prior"),
]


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize(("alphas", "per_tensor"), CASES)
def test_merge_equals_joint_map(alphas, per_tensor, backend):
    problem = Problem(len(alphas), seed=len(alphas), per_tensor_prior=per_tensor)
    base = unflatten(problem.theta0)
    deltas = [unflatten(problem.fine_tune(t, problem.theta0) - problem.theta0) for t in
              range(len(alphas))]
    fishers = [unflatten(h) for h in problem.hessians]
    prior = problem.prior_mapping() if per_tensor else float(problem.h0[0])

    merged = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=prior,
                       backend=backend)

    expected = problem.joint_map(dict(enumerate(alphas)))
    assert all(v.dtype == torch.float64 for v in merged.values())
    torch.testing.assert_close(flatten(merged), expected, rtol=0, atol=1e-10)
    # and the merge really moved: it is far from both the start and plain task arithmetic
    task_arithmetic = problem.theta0 + sum(a * flatten(d) for a, d in zip(alphas, deltas))
    assert (expected - task_arithmetic).abs().max() > 1e-2


@pytest.mark.parametrize(("alphas", "per_tensor"), CASES)
@pytest.mark.parametrize("removed", [0, 2])
def test_online_removal_equals_retraining(alphas, per_tensor, removed):
    problem = Problem(len(alphas), seed=10 + len(alphas), per_tensor_prior=per_tensor)
    prior = problem.prior_mapping() if per_tensor else float(problem.h0[0])
    everyone = problem.joint_map(dict(enumerate(alphas)))
    # online removal: the client fine-tunes from the current model under the same prior
    delta = problem.fine_tune(removed, everyone) - everyone
    rest = sum(a * problem.hessians[s] for s, a in enumerate(alphas) if s != removed)

    result = remove_client(
        unflatten(everyone),
        unflatten(delta),
        unflatten(problem.hessians[removed]),
        unflatten(rest),
        alpha=alphas[removed],
        prior_precision=prior,
    )

    retrained = problem.joint_map({s: a for s, a in enumerate(alphas) if s != removed})
    torch.testing.assert_close(flatten(result), retrained, rtol=0, atol=1e-10)
    assert (retrained - everyone).abs().max() > 1e-2  # removal had something to undo


def test_merge_then_remove_round_trip_is_exact():
    """Merge 4 clients with ugm_merge, then remove one: same as merging the other 3."""
    alphas = [0.4, 0.1, 0.3, 0.2]
    problem = Problem(4, seed=99, per_tensor_prior=True)
    prior = problem.prior_mapping()
    base = unflatten(problem.theta0)
    deltas = [unflatten(problem.fine_tune(t, problem.theta0) - problem.theta0) for t in range(4)]
    fishers = [unflatten(h) for h in problem.hessians]
    merged = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=prior)
    start = flatten(merged)
    delta = problem.fine_tune(1, start) - start
    rest = sum(alphas[s] * problem.hessians[s] for s in (0, 2, 3))
    removed = remove_client(merged, unflatten(delta), fishers[1], unflatten(rest),
                            alpha=alphas[1], prior_precision=prior)
    three = ugm_merge(base, [deltas[s] for s in (0, 2, 3)], [fishers[s] for s in (0, 2, 3)],
                      alphas=[alphas[s] for s in (0, 2, 3)], prior_precision=prior)
    torch.testing.assert_close(flatten(removed), flatten(three), rtol=0, atol=1e-10)
