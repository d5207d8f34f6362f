"""End-to-end unlearning evaluation on a tiny Ray run (digits, 3 clients, 2 rounds)."""

from __future__ import annotations

import json
import math


def test_unlearn_runs_every_method_and_writes_results(tmp_path):
    from simulations.flower_app import history_path
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
    # every removal moved the model
    for name in set(METHODS) - {"none", "retrain"}:
        assert results[name]["dist_to_retrain"][0] != results["none"]["dist_to_retrain"][0]
    # the removal runs went through FedUGM.remove in Flower: the online one asked client 1
    online = json.loads((out / "seed0" / "online" / "removal-1.json").read_text())
    assert online["mode"] == "online" and online["client"] == "1"
    assert online["remaining_clients"] == ["0", "2"] and online["repair_rounds"] == 1
    history = json.loads(history_path(out / "seed0" / "online", "fedugm", 0).read_text())
    (repair,) = history["replies"]  # the repair round: every node but the removed client's
    assert len(repair["nodes"]) == 2 and repair["errors"] == 0
    trainings = {name: results[name]["client_trainings"][0] for name in METHODS}
    assert trainings["retrain"] == 2 * 2  # 2 rounds x the 2 remaining clients
    assert (trainings["ugm-offline"], trainings["ugm-online"]) == (0, 1)
    assert (trainings["ugm-repair"], trainings["ugm-online-repair"]) == (2, 3)
    assert (out / "unlearn.png").stat().st_size > 0
