"""End-to-end unlearning evaluation on a tiny Ray run (digits, 3 clients, 2 rounds)."""

from __future__ import annotations

import json
import math


def test_unlearn_runs_every_method_and_writes_results(tmp_path):
    from simulations.unlearn import METHODS, METRICS, main

    out = tmp_path / "unlearn"
    assert main(["seeds=[0]", "task=digits", "num-clients=3", "num-server-rounds=2",
                 "test-examples=400", "dirichlet-alpha=1.0", "backdoor-client=1",
                 "lr=0.1", "prior-delta=1.0", f"out={out}"]) == 0
    results = json.loads((out / "unlearn.json").read_text())["methods"]
    assert set(results) == set(METHODS)
    for name in METHODS:
        assert set(results[name]) == set(METRICS)
        assert all(math.isfinite(v) for values in results[name].values() for v in values)
    assert results["retrain"]["dist_to_retrain"] == [0.0]
    # every removal moved the model, and the offline ones cost far less than retraining
    for name in ("ta-negation", "ugm-offline", "ugm-online", "ugm-repair", "subtract-applied",
                 "applied-repair"):
        assert results[name]["dist_to_retrain"][0] != results["none"]["dist_to_retrain"][0]
    assert results["ugm-offline"]["seconds"][0] < 0.1 * results["retrain"]["seconds"][0]
    assert (out / "unlearn.png").stat().st_size > 0
