"""The merge rules behind one interface (fl_ugm.merge_rules): each rule's merge against its
formula written out independently, and the per-client shares summing to the merge."""

from __future__ import annotations

import pytest
import torch
from test_merge import make_clients

from fl_ugm.merge_rules import MERGE_RULES, client_alphas, merge_round, merge_rule


def formula(rule: str, base, deltas, fishers, alphas, h0):
    """θ⁺ per rule, in float64, straight from docs/design.md §1."""
    out = {}
    for key in base:
        if rule == "task-arithmetic":
            step = sum(a * d[key] for a, d in zip(alphas, deltas))
        else:
            prior = h0 if rule == "ugm" else 0.0
            den = prior + sum(a * f[key] for a, f in zip(alphas, fishers))
            step = sum(a * (prior + f[key]) * d[key]
                       for a, d, f in zip(alphas, deltas, fishers)) / den
        out[key] = base[key] + step
    return out


@pytest.mark.parametrize("name", sorted(MERGE_RULES))
def test_each_rule_merges_by_its_formula_and_its_shares_sum_to_the_merge(name):
    base, deltas, fishers = make_clients(3, dtype=torch.float64)
    alphas = [0.2, 0.5, 0.3]
    rule = merge_rule(name)
    result = rule.merge(base, deltas, fishers, alphas=alphas, prior_precision=0.7,
                        with_shares=True)
    expected = formula(name, base, deltas, fishers, alphas, 0.7)
    for key in base:
        torch.testing.assert_close(result.params[key], expected[key], rtol=1e-9, atol=1e-11)
        total = sum(share[key] for share in result.shares)
        torch.testing.assert_close(total, result.params[key] - base[key], rtol=1e-9, atol=1e-11)
        # a client's share is its own term, not an even split
        assert not torch.allclose(result.shares[0][key], result.shares[1][key])
    assert rule.merge(base, deltas, fishers, alphas=alphas, prior_precision=0.7).shares is None
    assert rule.uses_fisher == (name != "task-arithmetic")


def test_merge_round_averages_float_buffers_and_keeps_the_rest():
    base, deltas, fishers = make_clients(2)
    state = {**base, "running": torch.zeros(4), "steps": torch.tensor(9)}
    full = [{**d, "running": torch.full((4,), float(i + 1))} for i, d in enumerate(deltas)]
    new, shares = merge_round(merge_rule("ugm"), state, full, fishers, [30, 10],
                              alphas=[0.75, 0.25], prior_precision=1.0)
    assert list(new) == list(state) and shares is None
    torch.testing.assert_close(new["running"], torch.full((4,), 0.75 * 1 + 0.25 * 2))
    assert int(new["steps"]) == 9


def test_client_alphas_and_unknown_names():
    assert client_alphas([10, 30], "num-examples", 2.0) == [0.5, 1.5]
    assert client_alphas([10, 30], "uniform") == [0.5, 0.5]
    assert client_alphas([10, 30], "ones", 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="alpha mode 'mean'"):
        client_alphas([1], "mean")
    with pytest.raises(ValueError, match=r"merge rule 'sum'; choose one of \('ugm'"):
        merge_rule("sum")
