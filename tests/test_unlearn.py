"""End-to-end unlearning evaluation on a tiny Ray run (digits, 3 clients, 2 rounds)."""

from __future__ import annotations

import json
import math

import pytest


def test_unlearn_runs_every_method_and_writes_results(tmp_path):
    from simulations.flower_app import history_path
    from simulations.unlearn import METHODS, METRICS, main

    out = tmp_path / "unlearn"
    assert main(["seeds=[0]", "task=digits", "num-clients=3", "num-server-rounds=2",
                 "test-examples=400", "dirichlet-alpha=1.0", "forget-client=1",
                 "lr=0.1", "prior-delta=1.0", f"out={out}"]) == 0
    summary = json.loads((out / "unlearn.json").read_text())
    assert summary["default"] == "replay" and summary["scenario"] == "corner"
    assert summary["forget_clients"] == [1]
    results = summary["methods"]
    assert set(results) == set(METHODS)
    for name in METHODS:
        assert set(results[name]) == set(METRICS)
        assert all(math.isfinite(v) for values in results[name].values() for v in values)
    assert results["retrain"]["dist_to_retrain"] == [0.0]
    # every removal moved the model; those without repair rounds moved it toward the
    # retrained one (distance and agreement), the default replay most of the way
    none = {metric: results["none"][metric][0] for metric in ("dist_to_retrain", "agreement")}
    for name in set(METHODS) - {"none", "retrain"}:
        assert results[name]["dist_to_retrain"][0] != none["dist_to_retrain"]
    for name in ("replay", "eq13-offline", "ugm-offline", "ugm-online", "ta-negation"):
        assert results[name]["dist_to_retrain"][0] < none["dist_to_retrain"], name
        assert results[name]["agreement"][0] > none["agreement"], name
    assert results["replay"]["dist_to_retrain"][0] < 0.5 * none["dist_to_retrain"]
    assert results["replay"]["agreement"][0] > 0.85 > none["agreement"]
    # the removal runs went through FedUGM.remove in Flower: the online one asked client 1
    online = json.loads((out / "seed0" / "eq13-online" / "removal-1.json").read_text())
    assert online["mode"] == "online" and online["client"] == "1"
    assert online["remaining_clients"] == ["0", "2"] and online["repair_rounds"] == 1
    replay = json.loads((out / "seed0" / "replay-offline" / "removal-1.json").read_text())
    assert replay["method"] == "replay"
    assert (replay["replayed_from_round"], replay["replayed_to_round"]) == (1, 2)
    history = json.loads(history_path(out / "seed0" / "eq13-online", "fedugm", 0).read_text())
    (repair,) = history["replies"]  # the repair round: every node but the removed client's
    assert len(repair["nodes"]) == 2 and repair["errors"] == 0
    trainings = {name: results[name]["client_trainings"][0] for name in METHODS}
    assert trainings["retrain"] == 2 * 2  # 2 rounds x the 2 remaining clients
    assert (trainings["ugm-offline"], trainings["ugm-online"]) == (0, 1)
    assert (trainings["ugm-repair"], trainings["ugm-online-repair"]) == (2, 3)
    assert (trainings["replay"], trainings["replay-repair"]) == (0, 2)
    assert trainings["federaser"] == 2  # 1 of the 2 stored rounds (interval 2) x 2 clients
    assert results["federaser"]["client_epochs"] == [1.0]  # of half an epoch each
    assert results["retrain"]["agreement"] == [1.0] and results["retrain"]["kl_to_retrain"] \
        == [0.0]
    assert (out / "unlearn.png").stat().st_size > 0


def test_federaser_calibration_keeps_the_stored_norm_and_the_fresh_direction():
    import torch

    from simulations.federaser import calibrated

    stored = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
    fresh = {"w": torch.tensor([0.0, -0.5]), "b": torch.tensor([0.0])}
    out = calibrated(stored, fresh)
    torch.testing.assert_close(out["w"], torch.tensor([0.0, -5.0]))  # |stored| 5, fresh's sign
    assert torch.equal(out["b"], fresh["b"])  # a zero update stays zero


def test_the_membership_advantage_and_its_held_out_set():
    import torch

    from simulations.unlearn import held_out_like, loss_threshold_advantage

    members, held = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.9, 1.0])
    assert loss_threshold_advantage(members, held) == pytest.approx(2 / 3)  # at threshold 0.2
    assert loss_threshold_advantage(held, members) == 0.0  # members no likelier: no advantage
    y_test = torch.tensor([0, 0, 1, 1, 1, 2])
    x, y = held_out_like(torch.arange(6.0)[:, None], y_test, torch.tensor([1, 1, 1, 0]), seed=0)
    assert sorted(y.tolist()) == [0, 1, 1, 1] and torch.equal(y_test[x[:, 0].long()], y)


def test_scenarios_give_the_forget_client_its_part():
    import torch

    from simulations.adversaries import add_trigger, poisoned
    from simulations.runner import app_run_config
    from simulations.unlearn import scenario_config

    cfg = {**app_run_config(), "forget-client": -1, "backdoor-target": 0, "flip-source": -1,
           "flip-target": -1}
    checker = scenario_config(cfg, "checker", seed=1)
    assert checker["forget-client"] == 7 and checker["backdoor-client"] == 7  # the largest
    assert checker["backdoor-trigger"] == "checker" and checker["flip-client"] == -1
    assert scenario_config(cfg, "honest", seed=1)["backdoor-client"] == -1
    flip = scenario_config(cfg, "label-flip", seed=1)
    labels = torch.tensor([3, 3, 3, 5])
    _, flipped = poisoned(flip, 7, torch.zeros(4, 784), labels)
    assert flipped.tolist() == [4, 4, 4, 5]  # its most common class, to the next one
    images = add_trigger(torch.zeros(2, 784), "checker").reshape(2, 28, 28)
    assert images[:, 11:17, 11:17].sum() == 2 * 18 and images.sum() == 2 * 18
    with pytest.raises(ValueError, match="unknown trigger"):
        add_trigger(torch.zeros(1, 784), "moon")
