"""ugm_merge, remove_client and the baselines: special cases, dtypes, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fl_ugm.merge import (
    InvalidClientInput,
    fisher_averaging,
    remove_client,
    task_arithmetic,
    ugm_merge,
    weighted_average,
)

BACKENDS = ["numba", "torch"]


def make_clients(num_clients=3, seed=0, dtype=torch.float32, sizes=None):
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or {"w": (6, 5), "b": (5,), "big": (70_001,)}

    def rand(scale=1.0, positive=False):
        out = {}
        for key, shape in sizes.items():
            t = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
            out[key] = (scale * t).to(dtype)
        return out

    base = rand()
    deltas = [rand(0.1) for _ in range(num_clients)]
    fishers = [rand(5.0, positive=True) for _ in range(num_clients)]
    return base, deltas, fishers


def reference_merge(base, deltas, fishers, alphas, h0):
    """DESIGN §1 written out directly, in float64."""
    out = {}
    for key in base:
        h = h0[key].double() if isinstance(h0, dict) else h0
        den = h + sum(a * f[key].double() for a, f in zip(alphas, fishers))
        num = sum(a * (h + f[key].double()) * d[key].double()
                  for a, d, f in zip(alphas, deltas, fishers))
        out[key] = base[key].double() + num / den
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_clients", [1, 4])
def test_matches_formula_across_block_boundaries(backend, num_clients):
    # "big" spans two kernel blocks (65536 elements) plus a ragged tail
    base, deltas, fishers = make_clients(num_clients, seed=num_clients)
    alphas = [0.1 + 0.3 * i for i in range(num_clients)]
    merged = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=0.7, backend=backend)
    expected = reference_merge(base, deltas, fishers, alphas, 0.7)
    for key in base:
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_fisher_is_task_arithmetic(backend):
    base, deltas, fishers = make_clients(3)
    zeros = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    alphas = [0.5, 1.0, 2.0]
    merged = ugm_merge(base, deltas, zeros, alphas=alphas, prior_precision=3.0, backend=backend)
    plain = task_arithmetic(base, deltas, alphas=alphas)
    for key in base:
        torch.testing.assert_close(merged[key], plain[key], rtol=1e-6, atol=1e-6)
        expected = base[key] + sum(a * d[key] for a, d in zip(alphas, deltas))
        torch.testing.assert_close(plain[key], expected, rtol=1e-6, atol=1e-6)


def test_tiny_prior_is_fisher_averaging():
    base, deltas, fishers = make_clients(3, dtype=torch.float64)
    alphas = [0.2, 0.3, 0.5]
    merged = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=1e-12)
    for key in base:
        num = sum(a * f[key] * d[key] for a, d, f in zip(alphas, deltas, fishers))
        den = sum(a * f[key] for a, f in zip(alphas, fishers))
        torch.testing.assert_close(merged[key], base[key] + num / den, rtol=1e-8, atol=1e-10)


def test_fisher_averaging_against_its_formula():
    """θ + Σ α_t F_t Δ_t / Σ α_s F_s written out independently; where every client's Fisher
    is zero (no 0/0), Σ α_t Δ_t; where one client alone has Fisher, its delta."""
    base, deltas, fishers = make_clients(3, dtype=torch.float64)
    alphas = [0.2, 0.3, 0.5]
    for fisher in fishers:
        fisher["w"][0, 0] = 0.0  # nobody informs w[0, 0]
    fishers[0]["b"][1] = fishers[2]["b"][1] = 0.0  # only client 1 informs b[1]
    averaged = fisher_averaging(base, deltas, fishers, alphas=alphas)
    for key in base:
        num = sum(a * f[key] * d[key] for a, d, f in zip(alphas, deltas, fishers))
        den = sum(a * f[key] for a, f in zip(alphas, fishers))
        expected = base[key] + torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
        informed = den > 0
        torch.testing.assert_close(averaged[key][informed], expected[informed], rtol=1e-8,
                                   atol=1e-10)
    plain_sum = base["w"][0, 0] + sum(a * d["w"][0, 0] for a, d in zip(alphas, deltas))
    torch.testing.assert_close(averaged["w"][0, 0], plain_sum, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(averaged["b"][1], base["b"][1] + deltas[1]["b"][1], rtol=1e-8,
                               atol=1e-10)


def test_huge_prior_is_task_arithmetic_and_prior_changes_result():
    base, deltas, fishers = make_clients(3, dtype=torch.float64)
    alphas = [0.2, 0.3, 0.5]
    strong = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=1e9)
    weak = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=1e-3)
    plain = task_arithmetic(base, deltas, alphas=alphas)
    for key in base:
        torch.testing.assert_close(strong[key], plain[key], rtol=1e-7, atol=1e-8)
        assert (weak[key] - plain[key]).abs().max() > 1e-3


def test_weighted_average_normalises_weights():
    base, deltas, _ = make_clients(2)
    merged = weighted_average(base, deltas, alphas=[30, 10])
    for key in base:
        torch.testing.assert_close(merged[key], base[key] + 0.75 * deltas[0][key]
                                   + 0.25 * deltas[1][key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_float64_in_float64_out_and_half_is_computed_in_float32(backend):
    base, deltas, fishers = make_clients(2, dtype=torch.float64)
    merged = ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=0.5, backend=backend)
    assert all(v.dtype == torch.float64 for v in merged.values())
    expected = reference_merge(base, deltas, fishers, [1, 1], 0.5)
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-12, atol=1e-12)
    # float16: δ = 1e-12 underflows to 0 in fp16, and Fisher sums overflow it; the merge must
    # upcast, so zero-Fisher coordinates still get the plain sum instead of 0/0 = NaN
    half_base, half_deltas, half_fishers = make_clients(2, dtype=torch.float16)
    half_fishers[0]["w"].zero_()
    half_fishers[1]["w"].zero_()
    out = ugm_merge(half_base, half_deltas, half_fishers, alphas=[0.5, 0.5],
                    prior_precision=1e-12, backend="auto")
    assert out["w"].dtype == torch.float16
    assert torch.isfinite(out["w"]).all()
    expected_w = half_base["w"].float() + 0.5 * (half_deltas[0]["w"].float()
                                                 + half_deltas[1]["w"].float())
    torch.testing.assert_close(out["w"].float(), expected_w, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_prior_and_scalar_tensor_prior(backend):
    base, deltas, fishers = make_clients(3)
    alphas = [1.0, 0.5, 0.25]
    gen = torch.Generator().manual_seed(5)
    prior = {k: 0.1 + torch.rand(v.shape, generator=gen) for k, v in base.items()}
    prior["b"] = torch.tensor(0.3)  # a 0-d tensor is a scalar prior for that key
    merged = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=prior,
                       backend=backend)
    prior_full = dict(prior, b=torch.full((5,), 0.3))
    expected = reference_merge(base, deltas, fishers, alphas, prior_full)
    for key in base:
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-5, atol=1e-6)


def test_inputs_are_not_modified():
    base, deltas, fishers = make_clients(2)
    copies = [{k: v.clone() for k, v in m.items()} for m in (base, *deltas, *fishers)]
    ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=1.0)
    remove_client(base, deltas[0], fishers[0], fishers[1], alpha=1.0, prior_precision=1.0)
    for original, copy in zip((base, *deltas, *fishers), copies):
        for key in original:
            assert torch.equal(original[key], copy[key])


def test_remove_client_formula():
    base, deltas, fishers = make_clients(2, dtype=torch.float64)
    removed = remove_client(base, deltas[0], fishers[0], fishers[1], alpha=0.7,
                            prior_precision=0.2)
    for key in base:
        expected = base[key] - 0.7 * (0.2 + fishers[0][key]) / (0.2 + fishers[1][key]) * (
            deltas[0][key])
        torch.testing.assert_close(removed[key], expected)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("fishers", math.nan, r"fishers\[1\]\['big'\] contains NaN or Inf"),
        ("fishers", math.inf, r"fishers\[1\]\['big'\] contains NaN or Inf"),
        ("fishers", -1e-3, r"fishers\[1\]\['big'\] has negative entries"),
        ("deltas", math.nan, r"deltas\[1\]\['big'\] contains NaN or Inf"),
        ("deltas", -math.inf, r"deltas\[1\]\['big'\] contains NaN or Inf"),
    ],
)
def test_bad_values_name_client_and_key(backend, where, value, message):
    base, deltas, fishers = make_clients(3)
    # index 70_000 lies in the last, ragged kernel block
    {"fishers": fishers, "deltas": deltas}[where][1]["big"][70_000] = value
    with pytest.raises(InvalidClientInput, match=message) as info:
        ugm_merge(base, deltas, fishers, alphas=[1, 1, 1], prior_precision=1.0, backend=backend)
    assert (info.value.client_index, info.value.key) == (1, "big")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_value_with_zero_alpha_is_still_rejected(backend):
    base, deltas, fishers = make_clients(2)
    fishers[1]["w"][0, 0] = math.inf
    with pytest.raises(InvalidClientInput, match=r"fishers\[1\]\['w'\]"):
        ugm_merge(base, deltas, fishers, alphas=[1, 0], prior_precision=1.0, backend=backend)


def test_structural_errors():
    base, deltas, fishers = make_clients(2)
    kwargs = {"alphas": [1, 1], "prior_precision": 1.0}
    with pytest.raises(ValueError, match="no clients"):
        ugm_merge(base, [], [], alphas=[], prior_precision=1.0)
    with pytest.raises(ValueError, match="2 deltas but 1 fishers"):
        ugm_merge(base, deltas, fishers[:1], **kwargs)
    with pytest.raises(ValueError, match="got 3 alphas for 2 clients"):
        ugm_merge(base, deltas, fishers, alphas=[1, 1, 1], prior_precision=1.0)

    missing = dict(deltas[1])
    del missing["b"]
    with pytest.raises(InvalidClientInput, match=r"deltas\[1\] has different keys.*'b'") as info:
        ugm_merge(base, [deltas[0], missing], fishers, **kwargs)
    assert info.value.client_index == 1

    extra = dict(fishers[0], surprise=torch.zeros(1))
    with pytest.raises(InvalidClientInput, match=r"fishers\[0\].*unexpected: \['surprise'\]"):
        ugm_merge(base, deltas, [extra, fishers[1]], **kwargs)

    wrong_shape = dict(fishers[1], w=torch.zeros(5, 6))
    with pytest.raises(InvalidClientInput, match=r"fishers\[1\]\['w'\] has shape \(5, 6\), "
                       r"expected \(6, 5\)"):
        ugm_merge(base, deltas, [fishers[0], wrong_shape], **kwargs)

    wrong_dtype = dict(deltas[0], b=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(InvalidClientInput, match=r"deltas\[0\]\['b'\] has dtype torch.int64"):
        ugm_merge(base, [wrong_dtype, deltas[1]], fishers, **kwargs)

    not_tensor = dict(deltas[0], b=[0.0] * 5)
    with pytest.raises(InvalidClientInput, match=r"deltas\[0\]\['b'\] is a list"):
        ugm_merge(base, [not_tensor, deltas[1]], fishers, **kwargs)

    int_base = dict(base, steps=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"base\['steps'\] is torch.int64"):
        ugm_merge(int_base, deltas, fishers, **kwargs)

    nan_base = dict(base, b=torch.full((5,), math.nan))
    with pytest.raises(ValueError, match=r"base\['b'\] contains NaN"):
        ugm_merge(nan_base, deltas, fishers, **kwargs)


@pytest.mark.parametrize(
    ("alphas", "message"),
    [([1, -0.5], r"alphas\[1\] = -0.5 is negative"), ([math.nan, 1], r"alphas\[0\] = nan")],
)
def test_bad_alphas(alphas, message):
    base, deltas, fishers = make_clients(2)
    with pytest.raises(InvalidClientInput, match=message):
        ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=1.0)


def test_task_arithmetic_allows_negative_alpha_but_not_nan_delta():
    base, deltas, _ = make_clients(2)
    negated = task_arithmetic(base, deltas[:1], alphas=[-1.0])
    torch.testing.assert_close(negated["w"], base["w"] - deltas[0]["w"])
    deltas[1]["b"][2] = math.nan
    with pytest.raises(InvalidClientInput, match=r"deltas\[1\]\['b'\] contains NaN"):
        task_arithmetic(base, deltas, alphas=[1, 1])
    with pytest.raises(ValueError, match="alphas sum to 0"):
        weighted_average(base, deltas[:1], alphas=[0])


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        (0.0, r"prior_precision = 0.0 for 'w'; it must be finite and > 0"),
        (-1.0, "must be finite and > 0"),
        (math.inf, "must be finite and > 0"),
        ("abc", "must be a float or a mapping"),
        ({"w": 1.0}, r"prior_precision has different keys.*missing: \['b', 'big'\]"),
    ],
)
def test_bad_prior(prior, message):
    base, deltas, fishers = make_clients(2)
    with pytest.raises(ValueError, match=message):
        ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=prior)


def test_bad_per_tensor_prior_values_and_shapes():
    base, deltas, fishers = make_clients(2)
    prior = {k: torch.ones_like(v) for k, v in base.items()}
    prior["w"] = prior["w"].clone()
    prior["w"][0, 0] = 0.0
    with pytest.raises(ValueError, match=r"prior_precision\['w'\] must be finite and > 0"):
        ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=prior)
    prior["w"] = torch.ones(30)
    with pytest.raises(ValueError, match=r"prior_precision\['w'\] has shape \(30,\)"):
        ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=prior)


def test_remove_client_bad_input():
    base, deltas, fishers = make_clients(2)
    rest = {k: v.clone() for k, v in fishers[1].items()}
    rest["b"][0] = -2.0
    with pytest.raises(InvalidClientInput, match=r"fisher_rest\['b'\] has negative or NaN"):
        remove_client(base, deltas[0], fishers[0], rest, alpha=1.0, prior_precision=1.0)
    with pytest.raises(InvalidClientInput, match=r"delta has different keys"):
        remove_client(base, {"w": deltas[0]["w"]}, fishers[0], fishers[1], alpha=1.0,
                      prior_precision=1.0)
    bad_delta = dict(deltas[0], w=deltas[0]["w"].clone())
    bad_delta["w"][1, 1] = math.inf
    with pytest.raises(InvalidClientInput, match=r"update of 'w' is not finite"):
        remove_client(base, bad_delta, fishers[0], fishers[1], alpha=1.0, prior_precision=1.0)
    with pytest.raises(InvalidClientInput, match=r"alphas\[0\] = -1.0 is negative"):
        remove_client(base, deltas[0], fishers[0], fishers[1], alpha=-1.0, prior_precision=1.0)


def test_overflow_of_finite_inputs_names_the_largest_client():
    base, deltas, fishers = make_clients(3)
    for d, value in zip(deltas, (1e38, 3e38, 2e38)):
        d["w"].fill_(value)
    for f in fishers:
        f["w"].zero_()
    with pytest.raises(InvalidClientInput, match=r"'w' overflowed torch.float32; deltas\[1\] "
                       r"\(with its Fisher\) is too large") as raised:
        ugm_merge(base, deltas, fishers, alphas=[1, 1, 1], prior_precision=1.0)
    assert raised.value.client_index == 1 and raised.value.key == "w"
    with pytest.raises(InvalidClientInput, match=r"deltas\[1\]") as raised:
        task_arithmetic(base, deltas, alphas=[1, 1, 1])
    assert raised.value.client_index == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_fisher_is_accepted(backend):
    """-0.0 has the sign bit set (the kernel flags it) but is a valid zero Fisher."""
    base, deltas, fishers = make_clients(2)
    fishers[0]["big"][5] = -0.0
    merged = ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=1.0, backend=backend)
    fishers[0]["big"][5] = 0.0
    expected = ugm_merge(base, deltas, fishers, alphas=[1, 1], prior_precision=1.0,
                         backend=backend)
    assert torch.equal(merged["big"], expected["big"])


def test_mixed_precision_keys_are_merged_in_the_widest_dtype():
    """One key arrives in float64 from every client: it is computed in float64 (a second
    kernel call) while the others stay float32; results keep base's dtypes."""
    base, deltas, fishers = make_clients(2)
    for client in (*deltas, *fishers):
        client["b"] = client["b"].double()
    merged = ugm_merge(base, deltas, fishers, alphas=[0.3, 0.7], prior_precision=0.5)
    expected = reference_merge(base, deltas, fishers, [0.3, 0.7], 0.5)
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in base.items()}
    for key in base:
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_merge_leaves_torchs_thread_count_as_it_was(threads):
    """numba's OpenMP layer shares torch's runtime: without care, the first merge switched a
    process limited to 1 torch thread to numba's count (2 here), so clients or a second
    process sharing the cores trained oversubscribed (3× slower in the FMNIST probe)."""
    saved = torch.get_num_threads()
    base, deltas, fishers = make_clients(num_clients=3, seed=4)
    alphas = [0.2, 0.3, 0.5]
    try:
        torch.set_num_threads(threads)
        merged = ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=0.7,
                           backend="numba")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    reference = reference_merge(base, deltas, fishers, alphas, 0.7)
    for key in base:
        torch.testing.assert_close(merged[key].double(), reference[key], rtol=1e-5, atol=1e-5)
