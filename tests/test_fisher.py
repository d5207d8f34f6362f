"""diagonal_fisher and TrainingFisher against plain per-example loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_ugm.fisher import (
    CategoricalLikelihood,
    GaussianLikelihood,
    TokenCategoricalLikelihood,
    TrainingFisher,
    diagonal_fisher,
    iterate_batches,
)


class MixedNet(nn.Module):
    """Closed-form layers (Conv2d, BatchNorm2d with running stats, Linear with and without
    bias, a 3-D Linear input) and fallback ones (LayerNorm, a shared Linear)."""

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


def test_exact_fisher_is_the_expectation_over_classes_for_every_layer_kind():
    """kind="exact" = Σ_i Σ_c p_ic (∇ℓ(x_i, c))², by the per-example loop over every class,
    through the closed forms and the vmap fallback (LayerNorm, the shared Linear) alike;
    the sampled Fisher is its one-draw estimate (their mean over draws converges to it)."""
    net = make_net(3)
    x = torch.randn(23, 1, 7, 7)
    with torch.no_grad():
        probs = torch.softmax(net.eval()(x), dim=-1)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for c in range(5):
        per_class = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
        for i in range(23):  # each example's squared gradient weighted by p_ic
            net.zero_grad()
            (probs[i, c].sqrt() * CategoricalLikelihood().nll(
                net(x[i:i + 1]), torch.tensor([c]))).sum().backward()
            for n, p in net.named_parameters():
                per_class[n] += p.grad**2
        for n in expected:
            expected[n] += per_class[n]
    exact = diagonal_fisher(net, iterate_batches(x, torch.zeros(23), 10), kind="exact",
                            chunk_size=4)
    for name, values in exact.items():
        assert values.abs().max() > 0, name
        torch.testing.assert_close(values, expected[name], rtol=1e-4, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    draws = [diagonal_fisher(net, [(x, None)], generator=gen)["fc.weight"] for _ in range(200)]
    mean = torch.stack(draws).mean(0)
    error = (mean - exact["fc.weight"]).norm() / exact["fc.weight"].norm()
    single = (draws[0] - exact["fc.weight"]).norm() / exact["fc.weight"].norm()
    assert error < 0.1 < single  # one draw is far off; 200 average out


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


def test_frozen_parameters_get_no_fisher_unless_all_are_asked_for():
    net = make_net(7)
    for p in [*net.conv1.parameters(), *net.bn.parameters(), net.fc.weight]:
        p.requires_grad_(False)  # a frozen backbone, and a frozen weight next to a trained bias
    x = torch.randn(8, 1, 7, 7)
    y = torch.randint(0, 5, (8,))
    trainable = diagonal_fisher(net, [(x, y)], kind="empirical")
    assert set(trainable) == {n for n, p in net.named_parameters() if p.requires_grad}
    assert "fc.bias" in trainable and "fc.weight" not in trainable
    every = diagonal_fisher(net, [(x, y)], kind="empirical", parameters="all")
    assert not net.fc.weight.requires_grad and not net.conv1.weight.requires_grad
    assert every["fc.weight"].abs().max() > 0
    for name, values in trainable.items():  # the same numbers either way
        torch.testing.assert_close(values, every[name], rtol=1e-5, atol=1e-8)
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        diagonal_fisher(net, [(x, y)], kind="empirical")


class SlowLinear(nn.Linear):
    """A Linear the closed forms do not recognise (type check): it takes the vmap path."""


class SlowBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm the closed forms do not recognise (type check): it takes the vmap path."""


class Regressor(nn.Module):
    def __init__(self, linear=nn.Linear, norm=nn.BatchNorm1d) -> None:
        super().__init__()
        self.hidden = linear(6, 8)
        self.norm = norm(8)
        self.out = linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.hidden(x))))


@pytest.mark.parametrize("likelihood", [GaussianLikelihood(0.7), CategoricalLikelihood()])
def test_closed_forms_and_the_vmap_fallback_agree_with_the_loop(likelihood):
    torch.manual_seed(3)
    fast, slow = Regressor(), Regressor(SlowLinear, SlowBatchNorm1d)
    fast.norm.running_mean.uniform_(-0.5, 0.5)
    fast.norm.running_var.uniform_(0.5, 2.0)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(19, 6)
    y = torch.randn(19, 2) if isinstance(likelihood, GaussianLikelihood) else \
        torch.randint(0, 2, (19,))
    expected = loop_fisher(fast, x, y, likelihood.nll)
    for model in (fast, slow):
        fisher = diagonal_fisher(model, iterate_batches(x, y, 7), kind="empirical",
                                 likelihood=likelihood, chunk_size=3)
        for name, values in fisher.items():
            torch.testing.assert_close(values, expected[name], rtol=1e-4, atol=1e-7)


def test_a_convolution_with_one_output_position_matches_the_loop():
    """Kernel = image size (e.g. a 1x1 conv on 1x1 features): the Linear shortcut."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 5, kernel_size=4), nn.Flatten(), nn.Linear(5, 3))
    x, y = torch.randn(13, 3, 4, 4), torch.randint(0, 3, (13,))
    fisher = diagonal_fisher(net, iterate_batches(x, y, 6), kind="empirical", chunk_size=4)
    expected = loop_fisher(net, x, y, CategoricalLikelihood().nll)
    for name, values in fisher.items():
        torch.testing.assert_close(values, expected[name], rtol=1e-4, atol=1e-7)


class TinyTagger(nn.Module):
    """A sequence model: embedding and LayerNorm (vmap path), a 3-D Linear (closed form);
    called with keyword inputs like a Hugging Face model."""

    def __init__(self, linear=nn.Linear) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.mix = linear(6, 6)
        self.head = linear(6, 11)

    def forward(self, input_ids, attention_mask):
        keep = attention_mask.unsqueeze(-1)
        h = torch.tanh(self.mix(self.norm(self.embed(input_ids)))) * keep
        context = h.sum(1, keepdim=True) / attention_mask.sum(1, keepdim=True).unsqueeze(-1)
        return self.head(h + context)  # (batch, positions, vocabulary)


def token_batches(seed=0, batches=3, size=5, length=7):
    """A DataLoader-like list of dicts: ids, mask (right padding), labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, 11, (size, length), generator=g)
        lengths = torch.randint(2, length + 1, (size,), generator=g)
        mask = (torch.arange(length) < lengths[:, None]).long()
        labels = torch.where(mask.bool(), torch.randint(0, 11, (size, length), generator=g),
                             -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def unpack_tokens(batch):
    return ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            batch["labels"])


@pytest.mark.parametrize("linear", [nn.Linear, SlowLinear])
def test_token_level_fisher_over_a_dataloader_of_dicts_matches_the_loop(linear):
    torch.manual_seed(5)
    model = TinyTagger(linear)
    batches = token_batches()
    likelihood = TokenCategoricalLikelihood()
    fisher = diagonal_fisher(model, batches, kind="empirical", likelihood="token-categorical",
                             unpack=unpack_tokens, chunk_size=2)
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        for i in range(len(batch["labels"])):
            model.zero_grad()
            logits = model(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1])
            likelihood.nll(logits, batch["labels"][i : i + 1]).sum().backward()
            for n, p in model.named_parameters():
                expected[n] += p.grad**2
    for name, values in fisher.items():
        assert values.abs().max() > 0, name
        torch.testing.assert_close(values, expected[name], rtol=1e-4, atol=1e-7)
    # padding does not count: the same examples unpadded, one at a time, give the same sum
    unpadded = []
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"],
                                     batch["labels"]):
            keep = int(mask.sum())
            unpadded.append({"input_ids": ids[None, :keep], "attention_mask": mask[None, :keep],
                             "labels": labels[None, :keep]})
    again = diagonal_fisher(model, unpadded, kind="empirical", likelihood="token-categorical",
                            unpack=unpack_tokens)
    for name, values in again.items():
        torch.testing.assert_close(values, fisher[name], rtol=1e-4, atol=1e-7)


def test_token_sampling_keeps_the_padding_mask_and_is_seeded():
    likelihood = TokenCategoricalLikelihood()
    logits = torch.randn(4, 6, 9)
    observed = torch.full((4, 6), 3)
    observed[:, 4:] = -100
    drawn = likelihood.sample(logits, torch.Generator().manual_seed(0), observed)
    assert drawn.shape == (4, 6) and bool((drawn[:, 4:] == -100).all())
    assert bool(((drawn[:, :4] >= 0) & (drawn[:, :4] < 9)).all())
    again = likelihood.sample(logits, torch.Generator().manual_seed(0), observed)
    assert torch.equal(drawn, again)
    model = TinyTagger()
    batches = token_batches(1)
    sampled = diagonal_fisher(model, batches, likelihood="token-categorical",
                              unpack=unpack_tokens, generator=torch.Generator().manual_seed(1))
    assert all(bool(torch.isfinite(v).all()) and v.abs().max() > 0 for v in sampled.values())


def test_a_batch_of_dicts_without_unpack_says_what_to_pass():
    model = TinyTagger()
    with pytest.raises(TypeError, match=r"keys \['attention_mask', 'input_ids', 'labels'\]; "
                                        "pass unpack="):
        diagonal_fisher(model, token_batches(), likelihood="token-categorical")


def test_bad_arguments():
    net = make_net()
    x = torch.randn(4, 1, 7, 7)
    with pytest.raises(ValueError, match=r"kind='true'; choose one of \('sampled', 'empirical', "
                       r"'exact'\)"):
        diagonal_fisher(net, [(x, None)], kind="true")
    with pytest.raises(ValueError, match="kind='exact' sums over the classes"):
        diagonal_fisher(net, [(x, None)], kind="exact", likelihood="gaussian")
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
