"""The replay's corrections (``fl_ugm.replay``): remaining clients retrain chosen rounds from
the replayed start, within a budget of client trainings, through ``FedUGM.remove``.

The oracle (DESIGN §1): linear-regression clients that solve their proximal problem exactly
(tests/helpers.py ``LinearGrid``). Their exact updates make a corrected round what
retraining merges, so corrections reach retraining exactly at any budget with the
derivation's re-centring (κ = 1), and with the net-tuned re-centring once every round that
drifted is corrected."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from flwr.common import MessageType
from helpers import H0, NO_SCREEN, LinearGrid, linear_problem, train_sampled

from fl_ugm import FedUGM, RemovalError
from fl_ugm.ledger import Ledger
from fl_ugm.merge import ugm_merge
from fl_ugm.removal import remove_from_ledger
from fl_ugm.replay import CORRECTION_POLICIES, SecantResponse, correction_rounds

pytestmark = pytest.mark.usefixtures("server_identity")

CLIENTS, ROUNDS, REMOVED = 6, 6, 2
SIZES = [5, 9, 14, 20, 27, 35]


def strategy(ledger_dir, **options) -> FedUGM:
    return FedUGM(client_memory=False, server_momentum=0.0, prior_precision=H0,
                  fraction_train=0.5, min_train_nodes=2, min_available_nodes=CLIENTS,
                  fisher_clip=None, ledger=ledger_dir, **NO_SCREEN, **options)


@pytest.fixture
def trained(tmp_path):
    """A 6-client, 6-round run with half the clients sampled per round and a coordinate only
    p2 informs; (ledger dir, grid, the same protocol without p2 from the start, the rounds
    after p2's first one and their remaining participants)."""
    hessians, xty, theta0 = linear_problem(seed=21, clients=CLIENTS, silent={REMOVED: 0})
    grid = LinearGrid(hessians, xty, sizes=SIZES)
    _, participation = train_sampled(strategy(tmp_path), grid, theta0, ROUNDS, seed=4,
                                     removed=REMOVED)
    theta = theta0
    for sampled in participation:
        kept = [t for t in sampled if t != REMOVED]
        deltas = [{"w": (H0 * theta + xty[t]) / (H0 + hessians[t]) - theta} for t in kept]
        alphas = [SIZES[t] / sum(SIZES[u] for u in kept) for t in kept]
        theta = ugm_merge({"w": theta}, deltas, [{"w": hessians[t]} for t in kept],
                          alphas=alphas, prior_precision=H0)["w"]
    first = next(r for r, s in enumerate(participation, 1) if REMOVED in s)
    costs = {r: len([t for t in s if t != REMOVED])
             for r, s in enumerate(participation, 1) if r > first}
    return tmp_path, grid, theta, costs


@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("policy", CORRECTION_POLICIES)
@pytest.mark.parametrize("budget", [1, 2, 5, 100])
def test_corrections_keep_the_derivations_replay_exact_at_any_budget(trained, policy, budget,
                                                                     calibrate):
    """Exact estimates leave the secant calibration zero residuals: nothing to add."""
    ledger_dir, grid, retrained, costs = trained
    sent_before = len(grid.sent)
    arrays, report = strategy(ledger_dir).remove(
        grid, f"p{REMOVED}", mode="online", correction_budget=budget,
        correction_policy=policy, calibrate=calibrate, recentring=1.0, shared_rank=0)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], retrained, rtol=0,
                               atol=1e-8)
    done = report["corrections"]
    # with exact estimates the corrected replay drifts as the uncorrected one that the
    # largest-drift policy ranks the rounds by
    assert done["rounds"] == correction_rounds(policy, budget, costs, report["start_drift"])
    assert done["client_trainings"] == sum(costs[r] for r in done["rounds"]) <= budget
    assert done["unanswered"] == [] and report["mode"] == "online"
    assert done["calibrate"] is calibrate
    # one TRAIN message per remaining participant of each corrected round, nothing else
    trainings = [len(nodes) for kind, nodes in grid.sent[sent_before:]
                 if kind == MessageType.TRAIN]
    assert len(trainings) == len(done["rounds"])
    assert sum(trainings) == done["client_trainings"]
    assert set(report["estimated_rounds"]).isdisjoint(done["rounds"])
    assert set(report["estimated_rounds"]) | set(done["rounds"]) >= set(costs)


def test_correcting_every_drifted_round_makes_the_tuned_replay_exact(trained):
    """The default re-centring (κ = 1e-3, the shared-rank heuristic) is inexact on the oracle;
    with every drifted round corrected the replay is retraining."""
    ledger_dir, grid, retrained, costs = trained
    plain, _ = remove_from_ledger(Ledger(ledger_dir), f"p{REMOVED}")
    assert (plain["w"] - retrained).abs().max() > 1e-4
    arrays, report = strategy(ledger_dir).remove(
        grid, f"p{REMOVED}", mode="online", correction_budget=sum(costs.values()))
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], retrained, rtol=0,
                               atol=1e-8)
    assert report["estimated_rounds"] == []
    # the rewritten history holds the exact replies: replaying it changes nothing more
    ledger = Ledger(ledger_dir)
    assert all(f"p{REMOVED}" not in [p.client_id for p in ledger.history_round(r).participants]
               for r in ledger.history())


def test_an_unreachable_client_keeps_its_estimate_and_is_reported(trained):
    ledger_dir, _, retrained, costs = trained
    hessians, xty, _ = linear_problem(seed=21, clients=CLIENTS, silent={REMOVED: 0})
    grid = LinearGrid(hessians, xty, sizes=SIZES, failing={1})  # client p0 crashes
    random.seed(0)
    arrays, report = strategy(ledger_dir).remove(
        grid, f"p{REMOVED}", mode="online", correction_budget=sum(costs.values()),
        recentring=1.0, shared_rank=0)
    unanswered = report["corrections"]["unanswered"]
    assert unanswered and all(client == "p0" for _, client in unanswered)
    # κ = 1 estimates are exact here, so the result is still retraining
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], retrained, rtol=0,
                               atol=1e-8)


def test_corrections_are_refused_where_they_do_not_apply(trained):
    ledger_dir, grid, _, _ = trained
    index = (ledger_dir / "index.json").read_text()
    with pytest.raises(RemovalError, match="needs method='replay', mode='online'"):
        strategy(ledger_dir).remove(grid, f"p{REMOVED}", correction_budget=3)
    with pytest.raises(RemovalError, match="correction policy 'soon'; choose one of"):
        strategy(ledger_dir).remove(grid, f"p{REMOVED}", mode="online", correction_budget=3,
                                    correction_policy="soon")
    assert (ledger_dir / "index.json").read_text() == index  # nothing changed


def test_correction_rounds_follow_each_policy_within_the_budget():
    costs = {2: 3, 3: 2, 4: 3, 5: 1, 6: 2, 7: 3}
    drift = {2: 0.1, 3: 5.0, 4: 2.0, 5: 0.3, 6: 4.0, 7: 1.0}
    assert correction_rounds("early", 6, costs) == [2, 3, 5]  # 4 no longer fits, 5 does
    assert correction_rounds("final", 6, costs) == [5, 6, 7]
    assert correction_rounds("final", 5, costs) == [6, 7]
    assert correction_rounds("largest-drift", 6, costs, drift) == [3, 5, 6]
    assert correction_rounds("periodic", 6, costs) == [2, 5]  # every third of 6 rounds
    assert correction_rounds("early", 0, costs) == []
    assert correction_rounds("early", 100, costs) == sorted(costs)


def test_the_secant_model_recovers_a_linear_residual_on_the_pairs_span():
    """Residuals r = M d measured at two offsets: the prediction at an offset in their span
    is M d exactly while it interpolates (coefficients with ‖c‖₁ ≤ 1), and is scaled down
    to ‖c‖₁ = 1 beyond; outside the span it predicts nothing."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    secant = SecantResponse(pairs=2)
    offsets = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3)]
    for d in offsets:  # three pairs, only the last two are kept
        secant.add("c", {"w": d.reshape(2, 3)}, {"w": (M @ d).reshape(2, 3)})

    def predict(d):
        return secant.predict("c", {"w": d.reshape(2, 3)}, {"w": torch.zeros(2, 3)})

    inside = 0.3 * offsets[1] - 0.5 * offsets[2]
    torch.testing.assert_close(predict(inside)["w"].reshape(-1), M @ inside)
    far = 3.0 * offsets[1] - 5.0 * offsets[2]  # ‖c‖₁ = 8: no extrapolation
    torch.testing.assert_close(predict(far)["w"].reshape(-1), M @ far / 8)
    basis = torch.linalg.qr(torch.stack(offsets[1:], 1)).Q
    outside = offsets[0] - basis @ (basis.T @ offsets[0])
    assert float(predict(outside)["w"].abs().max()) < 1e-10
    assert secant.predict("other", {"w": inside.reshape(2, 3)}, {"w": torch.zeros(2, 3)}) \
        is None


def test_the_calibration_moves_the_estimates_after_a_correction(trained):
    """With the tuned (inexact) re-centring, one early corrected round gives each corrected
    client a nonzero residual, which the calibration adds to its later estimates: the
    replayed trajectory moves after the corrected round and not before it."""
    ledger_dir, grid, _, costs = trained
    first = min(costs)
    drift = {}
    for calibrate in (False, True):
        copy = ledger_dir.parent / f"{ledger_dir.name}-{calibrate}"
        shutil.copytree(ledger_dir, copy)
        _, report = strategy(copy).remove(grid, f"p{REMOVED}", mode="online",
                                          correction_budget=costs[first],
                                          correction_policy="early", calibrate=calibrate)
        assert report["corrections"]["rounds"] == [first]
        drift[calibrate] = report["start_drift"]
    moved = {r: abs(drift[True][r] - drift[False][r]) for r in drift[True]}
    assert all(moved[r] == 0 for r in moved if r <= first + 1)  # starts of rounds ≤ first+1
    assert max(moved.values()) > 1e-3
