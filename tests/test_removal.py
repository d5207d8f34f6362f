"""Client removal through the strategy (FedUGM.remove): online and offline, repair rounds,
failures that change nothing, and the revert of coordinates no remaining client informs.

The clients are linear-regression problems solved exactly (DESIGN §1's oracle), answering
the strategy's real messages: TRAIN (fine-tune from the sent global under the prior δ) and
QUERY (their stable client id, ``fl_ugm.client.handle_query``).
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import MetricRecord
from flwr.common import MessageType
from helpers import H0, LinearGrid, linear_problem, new_strategy, retrained, train

from fl_ugm import FedUGM, RemovalError
from fl_ugm.ledger import Ledger
from fl_ugm.protocol import PRIOR_KEY, REMOVAL_KEY
from fl_ugm.removal import remove_from_ledger

pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_removal_through_the_strategy_is_exact_on_the_linear_oracle(mode, tmp_path):
    """Train one round, then remove p1 from a NEW strategy on the same ledger (a removal run
    after a server restart; online mode finds p1's node with a QUERY)."""
    hessians, xty, theta0 = linear_problem(seed=5)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=1)

    strategy = new_strategy(tmp_path)
    arrays, report = strategy.remove(grid, "p1", mode=mode)
    expected = retrained(hessians, xty, theta0, keep=[0, 2])
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], expected, rtol=0, atol=1e-10)
    assert report["mode"] == mode and report["removal_round"] == 2
    sent_types = [kind for kind, _ in grid.sent[1:]]
    if mode == "online":  # QUERY to all three nodes, then one removal request to p1's node
        assert sent_types == [MessageType.QUERY, MessageType.TRAIN]
        assert grid.sent[-1][1] == [2]
    else:
        assert sent_types == []
    ledger = Ledger(tmp_path)
    assert ledger.client_ids() == ["p0", "p2"]
    round_, state = ledger.global_state()
    assert round_ == 2 and torch.equal(state["w"], arrays.to_torch_state_dict()["w"])


def test_the_online_request_is_a_train_message_marked_as_removal(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=6)
    grid = LinearGrid(hessians, xty)
    strategy = new_strategy(tmp_path)
    train(strategy, grid, theta0, rounds=1)
    captured = []
    original = grid._answer
    grid._answer = lambda msg: captured.append(msg) or original(msg)
    strategy.remove(grid, "p0", mode="online")
    (request,) = captured
    config = request.content.config_records["config"]
    assert config[REMOVAL_KEY] is True and config[PRIOR_KEY] == H0
    sent_global = request.content.array_records["arrays"].to_torch_state_dict()["w"]
    torch.testing.assert_close(sent_global, Ledger(tmp_path).global_state(1)[1]["w"])


def test_repair_rounds_exclude_the_removed_client_and_report_metrics(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=7)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    strategy = new_strategy(tmp_path)
    evaluated = []

    def evaluate(server_round, arrays):
        evaluated.append(server_round)
        return MetricRecord({"w0": float(arrays.to_torch_state_dict()["w"][0])})

    arrays, report = strategy.remove(grid, "p1", mode="offline", repair_rounds=2,
                                     evaluate_fn=evaluate)
    # discovery, then two repair rounds sent only to p0's and p2's nodes
    assert grid.sent[-3][0] == MessageType.QUERY
    assert [sorted(nodes) for _, nodes in grid.sent[-2:]] == [[1, 3], [1, 3]]
    assert evaluated == [2, 5] and report["final_round"] == 5
    final = arrays.to_torch_state_dict()["w"]
    assert report["metrics_after"]["w0"] == pytest.approx(float(final[0]))
    # the repair rounds merge only the remaining clients: their fixed point is theirs alone
    removed = Ledger(tmp_path).global_state(3)[1]["w"]
    keep = [0, 2]
    one_round = (H0 * removed + sum(xty[t] / 2 for t in keep)) / (
        H0 + sum(hessians[t] / 2 for t in keep))
    again = (H0 * one_round + sum(xty[t] / 2 for t in keep)) / (
        H0 + sum(hessians[t] / 2 for t in keep))
    torch.testing.assert_close(final, again, rtol=0, atol=1e-10)
    assert Ledger(tmp_path).rounds()[-1] == 5


def test_a_failed_online_removal_changes_nothing(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=8)
    train(new_strategy(tmp_path), LinearGrid(hessians, xty), theta0, rounds=1)
    before = Ledger(tmp_path)
    index = (tmp_path / "index.json").read_text()
    strategy = new_strategy(tmp_path)
    with pytest.raises(RemovalError, match=r"client crashed.*Nothing was changed"):
        strategy.remove(LinearGrid(hessians, xty, failing={2}), "p1", mode="online")
    with pytest.raises(RemovalError, match=r"removing client 'p1' failed: .*Nothing was"):
        strategy.remove(LinearGrid(hessians, xty, nan_nodes={2}), "p1", mode="online")
    with pytest.raises(RemovalError, match="no connected node identifies as client 'p9'"):
        strategy.remove(LinearGrid(hessians, xty), "p9", mode="online")
    with pytest.raises(RemovalError, match="mode 'later'"):
        strategy.remove(LinearGrid(hessians, xty), "p1", mode="later")
    assert (tmp_path / "index.json").read_text() == index
    assert Ledger(tmp_path).client_ids() == before.client_ids() == ["p0", "p1", "p2"]
    assert strategy.roster.excluded == set()
    with pytest.raises(RemovalError, match="needs the strategy's ledger"):
        FedUGM().remove(LinearGrid(hessians, xty), "p1")


def test_uninformed_coordinates_revert_to_before_the_client_over_many_rounds(tmp_path):
    """Coordinate 0 is informed by p1's data only. After several rounds Eq. 13 alone leaves
    most of p1's effect there (its last Δ is ≈ 0 once the global fits it); the revert takes
    the coordinate back to θ0, which is where retraining without p1 leaves it."""
    hessians, xty, theta0 = linear_problem(seed=9, silent={1: 0})
    grid = LinearGrid(hessians, xty)
    trained = train(new_strategy(tmp_path), grid, theta0, rounds=6)
    ledger = Ledger(tmp_path, keep_globals=3)
    without_p1 = train(new_strategy(tmp_path / "retrain", nodes=2), LinearGrid(
        [hessians[0], hessians[2]], [xty[0], xty[2]]), theta0, rounds=6)
    assert float(without_p1[0]) == float(theta0[0])  # nobody else moves it

    state, report = remove_from_ledger(ledger, "p1")
    eq13_only, _ = remove_from_ledger(ledger, "p1", revert_uninformed=False)
    assert float(state["w"][0]) == pytest.approx(float(theta0[0]), abs=1e-12)
    assert report["reverted_fraction"] == pytest.approx(1 / 5)
    stuck = abs(float(eq13_only["w"][0] - theta0[0]))
    assert stuck > 0.5 * abs(float(trained[0] - theta0[0])) > 0
    torch.testing.assert_close(state["w"][1:], eq13_only["w"][1:])  # informed: Eq. 13 only


def test_a_removal_interrupted_between_its_steps_changes_nothing(tmp_path, monkeypatch):
    """A failure after the new global is written but before the client's record is deleted
    (injected) leaves the ledger and the strategy as they were; retrying then removes it
    exactly once."""
    hessians, xty, theta0 = linear_problem(seed=13)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    index = (tmp_path / "index.json").read_text()
    strategy = new_strategy(tmp_path)

    def crash(self, client_id):
        raise OSError("killed between the steps")

    monkeypatch.setattr(Ledger, "forget_client", crash)
    with pytest.raises(OSError, match="killed between the steps"):
        strategy.remove(grid, "p1", mode="offline")
    monkeypatch.undo()
    assert (tmp_path / "index.json").read_text() == index
    assert Ledger(tmp_path).client_ids() == ["p0", "p1", "p2"]
    assert strategy.roster.excluded == set() and Ledger(tmp_path).removed_clients() == {}

    arrays, _ = new_strategy(tmp_path).remove(grid, "p1", mode="offline")
    ledger = Ledger(tmp_path)
    assert ledger.removed_clients() == {"p1": 3} and ledger.client_ids() == ["p0", "p2"]
    with pytest.raises(RemovalError, match=r"client 'p1' was already removed from this run "
                       r"\(by the global of round 3\); nothing to do"):
        new_strategy(tmp_path).remove(grid, "p1", mode="offline")
    assert torch.equal(Ledger(tmp_path).global_state()[1]["w"], arrays.to_torch_state_dict()["w"])


def test_an_online_reply_must_come_from_the_client_asked(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=14)
    grid = LinearGrid(hessians, xty)
    strategy = new_strategy(tmp_path)
    train(strategy, grid, theta0, rounds=1)
    strategy.roster.learn("p1", 3)  # stale routing: node 3 serves p2
    index = (tmp_path / "index.json").read_text()
    with pytest.raises(RemovalError, match="node 3 answered the removal request of client 'p1' "
                       "as client 'p2'; nothing was changed"):
        strategy.remove(grid, "p1", mode="online")
    assert (tmp_path / "index.json").read_text() == index


def test_repair_rounds_log_the_nodes_they_sample(tmp_path, caplog):
    """The sampling log counts the eligible nodes only: no "Sampled 3 (out of 3)" followed by
    two replies after a removal."""
    hessians, xty, theta0 = linear_problem(seed=15)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=1)
    with caplog.at_level("INFO", logger="flwr"):
        new_strategy(tmp_path).remove(grid, "p0", mode="offline", repair_rounds=1)
    assert ("configure_train: Sampled 2 nodes (out of 2; 1 excluded clients left out)"
            in caplog.text)
    assert "Received 2 results and 0 failures" in caplog.text
