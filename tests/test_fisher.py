"""diagonal_fisher and TrainingFisher against plain per-example loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_ugm.fisher import (
    CategoricalLikelihood,
    GaussianLikelihood,
    TrainingFisher,
    diagonal_fisher,
    iterate_batches,
)


class MixedNet(nn.Module):
    """Closed-form layers (Conv2d, Linear with and without bias, a 3-D Linear input) and
    fallback ones (BatchNorm affine with running stats, LayerNorm, a shared Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, dilation=1)
        self.seq = nn.Linear(3, 6)  # applied to a (batch, tokens, features) input
        self.norm = nn.LayerNorm(54)
        self.fc = nn.Linear(54, 5)
        self.shared = nn.Linear(5, 5, bias=False)  # called twice: no closed form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.tanh(self.conv2(x))  # (B, 3, 3, 3)
        x = self.seq(x.flatten(2).transpose(1, 2))  # (B, 9, 6)
        x = self.norm(x.flatten(1))
        return self.shared(torch.relu(self.shared(torch.relu(self.fc(x)))))


def loop_fisher(model, inputs, targets, nll) -> dict[str, torch.Tensor]:
    """The definition: one backward per example, square, sum."""
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(inputs.shape[0]):
        model.zero_grad()
        nll(model(inputs[i : i + 1]), targets[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            total[n] += p.grad**2
    return total


def make_net(seed=0) -> MixedNet:
    torch.manual_seed(seed)
    net = MixedNet()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    return net


def test_empirical_matches_per_example_loop_for_every_layer_kind():
    net = make_net()
    net.train()
    x = torch.randn(37, 1, 7, 7)
    y = torch.randint(0, 5, (37,))
    fisher = diagonal_fisher(net, iterate_batches(x, y, 10), kind="empirical", chunk_size=4)
    assert net.training  # mode restored
    expected = loop_fisher(net, x, y, CategoricalLikelihood().nll)
    assert list(fisher) == [n for n, _ in net.named_parameters()]
    for name, values in fisher.items():
        assert values.dtype == torch.float32
        assert values.abs().max() > 0, name
        torch.testing.assert_close(values, expected[name], rtol=1e-4, atol=1e-7)


class ArgmaxLikelihood(CategoricalLikelihood):
    """Deterministic "sample": the most likely class, so the sampled path can be checked."""

    def sample(self, outputs, generator):
        return outputs.argmax(-1)


def test_sampled_uses_model_targets_not_true_labels():
    net = make_net(1)
    x = torch.randn(20, 1, 7, 7)
    y_true = torch.randint(0, 5, (20,))
    sampled = diagonal_fisher(net, iterate_batches(x, y_true, 8), likelihood=ArgmaxLikelihood())
    with torch.no_grad():
        y_model = net.eval()(x).argmax(-1)
    assert not torch.equal(y_model, y_true)
    expected = loop_fisher(net, x, y_model, CategoricalLikelihood().nll)
    for name, values in sampled.items():
        torch.testing.assert_close(values, expected[name], rtol=1e-4, atol=1e-7)


def test_sampled_is_reproducible_with_a_seeded_generator_and_random_otherwise():
    net = make_net(2)
    x = torch.randn(30, 1, 7, 7)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return diagonal_fisher(net, [(x, None)], kind="sampled", generator=gen)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sampled_categorical_expectation_matches_analytic_fisher():
    """For softmax regression the true Fisher is Σ_i x_i² ⊗ diag(p_i(1 − p_i)) + cross terms:
    E_y[(p − e_y)²]_k = p_k(1 − p_k) (the bias) — compare the Monte-Carlo mean to it."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3)
    x = torch.randn(50, 4)
    draws = 400
    gen = torch.Generator().manual_seed(0)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = [(x, None)] * draws
    for name, values in diagonal_fisher(model, batches, generator=gen).items():
        total[name] = values / draws
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    expected_bias = (p * (1 - p)).sum(0)
    torch.testing.assert_close(total["bias"], expected_bias, rtol=0.05, atol=0)


def test_sampled_gaussian_fisher_converges_to_xtx_diagonal():
    """Linear-Gaussian regression: F = Σ_i ε_i² x_i² with ε ~ N(0, 1), so E[F] = diag(XᵀX)
    and Var[F_j] = 2 Σ_i x_ij⁴ per draw; the mean of R draws must be within 5 standard errors."""
    torch.manual_seed(4)
    n, d, draws = 60, 5, 300
    x = torch.randn(n, d) * torch.linspace(0.5, 2.0, d)
    model = nn.Linear(d, 1, bias=False)
    gen = torch.Generator().manual_seed(1)
    fisher = diagonal_fisher(model, [(x, None)] * draws, likelihood="gaussian", generator=gen)
    mean = fisher["weight"][0] / draws
    expected = (x**2).sum(0)
    standard_error = torch.sqrt(2 * (x**4).sum(0) / draws)
    assert torch.all((mean - expected).abs() < 5 * standard_error), (mean, expected)
    assert not torch.allclose(mean, expected, rtol=1e-6)  # it is an estimate, not a formula


def test_gaussian_variance_scales_the_fisher():
    torch.manual_seed(5)
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    unit = diagonal_fisher(model, [(x, y)], kind="empirical", likelihood="gaussian")
    half = diagonal_fisher(model, [(x, y)], kind="empirical",
                           likelihood=GaussianLikelihood(variance=0.5))
    expected = loop_fisher(model, x, y, GaussianLikelihood().nll)
    for name in unit:
        torch.testing.assert_close(unit[name], expected[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(half[name], 4 * unit[name], rtol=1e-5, atol=1e-7)


def test_fisher_is_a_sum_over_examples_independent_of_batching():
    net = make_net(6)
    x = torch.randn(24, 1, 7, 7)
    y = torch.randint(0, 5, (24,))
    whole = diagonal_fisher(net, [(x, y)], kind="empirical")
    split = diagonal_fisher(net, iterate_batches(x, y, 5), kind="empirical")
    first_half = diagonal_fisher(net, [(x[:12], y[:12])], kind="empirical")
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], rtol=1e-4, atol=1e-7)
        assert torch.all(first_half[name] <= whole[name] + 1e-6)


def test_frozen_parameters_get_a_fisher_and_stay_frozen():
    net = make_net(7)
    net.fc.weight.requires_grad_(False)
    x = torch.randn(8, 1, 7, 7)
    y = torch.randint(0, 5, (8,))
    fisher = diagonal_fisher(net, [(x, y)], kind="empirical")
    assert not net.fc.weight.requires_grad
    assert fisher["fc.weight"].abs().max() > 0


def test_bad_arguments():
    net = make_net()
    x = torch.randn(4, 1, 7, 7)
    with pytest.raises(ValueError, match=r"kind='true'; choose one of \('sampled', 'empirical'\)"):
        diagonal_fisher(net, [(x, None)], kind="true")
    with pytest.raises(ValueError, match="likelihood='poisson'"):
        diagonal_fisher(net, [(x, None)], likelihood="poisson")
    with pytest.raises(ValueError, match="held no examples"):
        diagonal_fisher(net, [])
    with pytest.raises(ValueError, match="kind='empirical' needs targets"):
        diagonal_fisher(net, [(x, None)], kind="empirical")
    with pytest.raises(ValueError, match="variance must be > 0"):
        GaussianLikelihood(variance=0.0)


def test_non_finite_model_is_reported_with_the_parameter():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"Fisher of '(weight|bias)' became NaN/Inf at batch 0"):
        diagonal_fisher(model, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))],
                        kind="empirical")


def test_training_fisher_with_batch_size_one_is_the_empirical_fisher():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(15, 6), torch.randint(0, 3, (15,))
    cheap = TrainingFisher(model)
    for xb, yb in iterate_batches(x, y, 1):  # no optimizer step: weights stay fixed
        model.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        cheap.update(xb.shape[0])
    estimate = cheap.estimate(num_examples=15)
    exact = diagonal_fisher(model, [(x, y)], kind="empirical")
    for name in exact:
        torch.testing.assert_close(estimate[name], exact[name], rtol=1e-5, atol=1e-8)


def test_training_fisher_rescales_to_the_dataset_size():
    """Two epochs over 15 examples estimate the same Σ over 15 examples as one epoch; and with
    batches of B the estimate is N·mean(B·ḡ²)."""
    torch.manual_seed(9)
    model = nn.Linear(4, 3)
    x, y = torch.randn(15, 4), torch.randint(0, 3, (15,))
    one, two, batched = TrainingFisher(model), TrainingFisher(model), TrainingFisher(model)
    grads = []
    for xb, yb in iterate_batches(x, y, 5):
        model.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        grads.append(model.weight.grad.clone())
        for acc, repeats in ((one, 1), (two, 2)):
            for _ in range(repeats):
                acc.update(1)
        batched.update(5)
    torch.testing.assert_close(one.estimate(15)["weight"], two.estimate(15)["weight"])
    expected = 15 * sum(25 * g**2 for g in grads) / 15
    torch.testing.assert_close(batched.estimate(15)["weight"], expected)
    with pytest.raises(ValueError, match="never called"):
        TrainingFisher(model).estimate(10)
