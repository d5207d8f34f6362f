"""A run killed after round R and restarted on the same ledger continues from round R + 1
with nothing lost (in-process; the real SIGKILL test is in test_deployment.py)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from helpers import LinearGrid, linear_problem, new_strategy, train

from fl_ugm import FedUGM
from fl_ugm.ledger import Ledger, LedgerError

pytestmark = pytest.mark.usefixtures("server_identity")


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=12)
    grid = LinearGrid(hessians, xty)
    straight = train(new_strategy(tmp_path / "straight"), grid, theta0, rounds=4)

    train(new_strategy(tmp_path / "crashed"), grid, theta0, rounds=2)  # ... then killed
    strategy = new_strategy(tmp_path / "crashed")
    completed, arrays = strategy.resume_from_ledger()
    assert completed == 2 and strategy.round_offset == 2
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    assert {int(m.content["config"]["server-round"]) for m in messages} == {3}
    resumed = train(strategy, grid, arrays.to_torch_state_dict()["w"], rounds=2)

    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-12)
    a, b = Ledger(tmp_path / "crashed"), Ledger(tmp_path / "straight")
    assert a.rounds() == b.rounds() == [2, 3, 4]
    for client in b.client_ids():  # every contribution, summed over all four rounds
        assert a.client(client).round == 4
        torch.testing.assert_close(a.client(client).applied["w"], b.client(client).applied["w"],
                                   rtol=0, atol=1e-12)


def test_nothing_to_resume_on_an_empty_ledger(tmp_path):
    strategy = new_strategy(tmp_path)
    assert strategy.resume_from_ledger() is None and strategy.round_offset == 0


def test_a_removed_client_is_never_sampled_or_recorded_after_a_resume(tmp_path):
    """Train, remove p1 (committed to the ledger), restart: the new strategy reads the
    removed client from the ledger, finds its node with a QUERY, never asks it to train,
    drops any reply it still sends, and never records it again."""
    from fl_ugm.ledger import Ledger

    hessians, xty, theta0 = linear_problem(seed=16)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    new_strategy(tmp_path).remove(grid, "p1", mode="offline", repair_rounds=0)

    strategy = new_strategy(tmp_path)  # a server restart on the same ledger
    assert strategy.roster.excluded == {"p1"}
    completed, arrays = strategy.resume_from_ledger()
    sent_before = len(grid.sent)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert [kind for kind, _ in grid.sent[sent_before:]] == ["query"]  # p1's node located
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]  # p1 is node 2
    everyone = grid.send_and_receive([*messages, *strategy._construct_messages(
        messages[0].content, [2], "train")])  # p1 answers anyway
    strategy.aggregate_train(1, everyone)
    resumed = train(strategy, grid, strategy.current_arrays["w"], rounds=1, first_round=2)
    ledger = Ledger(tmp_path)
    assert ledger.client_ids() == ["p0", "p2"] and ledger.removed_clients() == {"p1": 3}
    assert ledger.rounds()[-1] == completed + 2
    assert all(2 not in nodes for kind, nodes in grid.sent[sent_before + 2:])
    torch.testing.assert_close(ledger.global_state()[1]["w"], resumed, rtol=0, atol=0)


def test_a_resume_after_a_round_that_merged_nothing_keeps_the_server_state(tmp_path):
    """Server momentum; round 3 gets no valid reply (the global and the momentum stay) and
    the server dies after round 4's start recorded that global as round 3's: the restarted
    server continues from the momentum of round 2, as the live one would have."""
    hessians, xty, theta0 = linear_problem(seed=17)

    def strategy():
        return FedUGM(prior_precision=0.6, min_train_nodes=3, min_available_nodes=3,
                      ledger=tmp_path, server_lr=0.8, server_momentum=0.5,
                      update_screen=None)

    live = strategy()
    theta = train(live, LinearGrid(hessians, xty), theta0, rounds=2)
    broken = LinearGrid(hessians, xty, failing={1, 2, 3})
    messages = live.configure_train(3, ArrayRecord({"w": theta}), ConfigRecord(), broken)
    assert live.aggregate_train(3, broken.send_and_receive(messages)) == (None, None)
    live.configure_train(4, ArrayRecord({"w": theta}), ConfigRecord(), broken)  # then killed
    assert Ledger(tmp_path).rounds()[-1] == 3 and Ledger(tmp_path).history() == [1, 2]
    restarted = strategy()
    assert restarted.resume_from_ledger()[0] == 3
    torch.testing.assert_close(restarted.state.optimizer[0]["w"], live.state.optimizer[0]["w"],
                               rtol=0, atol=0)


def test_a_ledger_that_holds_a_run_is_refused_unless_resumed(tmp_path):
    """A new run on a ledger that holds one is refused before it writes anything (Flower's
    start and a hand-written loop alike); with resume=True it continues it instead."""
    hessians, xty, theta0 = linear_problem(seed=21)
    grid = LinearGrid(hessians, xty)
    new_strategy(tmp_path).start(grid=grid, initial_arrays=ArrayRecord({"w": theta0}),
                                 num_rounds=2, evaluate_fn=None)
    index = (tmp_path / "index.json").read_text()
    for run in (lambda s: s.start(grid=grid, initial_arrays=ArrayRecord({"w": theta0}),
                                  num_rounds=2),
                lambda s: train(s, grid, theta0, rounds=1)):
        with pytest.raises(LedgerError, match=r"resume=True"):
            run(new_strategy(tmp_path))
        assert (tmp_path / "index.json").read_text() == index  # nothing written

    straight = train(new_strategy(tmp_path / "straight"), grid, theta0, rounds=4)
    result = new_strategy(tmp_path, resume=True).start(
        grid=grid, initial_arrays=ArrayRecord({"w": theta0}), num_rounds=4)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], straight,
                               rtol=0, atol=1e-12)
    assert Ledger(tmp_path).rounds()[-1] == 4


def test_a_removal_does_not_count_as_a_training_round_and_is_not_evaluated(tmp_path):
    """Train 2 rounds, remove p1 (its global takes ledger round 3), resume to 3 rounds in
    all: exactly one more round is trained (ledger round 4), and neither its training nor its
    evaluation is sent to p1's node."""
    hessians, xty, theta0 = linear_problem(seed=22)
    grid = LinearGrid(hessians, xty)
    new_strategy(tmp_path).start(grid=grid, initial_arrays=ArrayRecord({"w": theta0}),
                                 num_rounds=2)
    new_strategy(tmp_path, resume=True).remove(grid, "p1")
    assert Ledger(tmp_path).rounds()[-1] == 3

    before = len(grid.sent)
    result = new_strategy(tmp_path, resume=True).start(
        grid=grid, initial_arrays=ArrayRecord({"w": theta0}), num_rounds=3)
    sent = grid.sent[before:]
    assert [kind for kind, _ in sent if kind != MessageType.QUERY] == [
        MessageType.TRAIN, MessageType.EVALUATE]
    assert all(2 not in nodes for kind, nodes in sent if kind != MessageType.QUERY)
    assert Ledger(tmp_path).rounds()[-1] == 4
    assert len(result.arrays)
    # nothing left to train: the newest global comes back, and nothing is sent
    before = len(grid.sent)
    done = new_strategy(tmp_path, resume=True).start(
        grid=grid, initial_arrays=ArrayRecord({"w": theta0}), num_rounds=3)
    assert [kind for kind, _ in grid.sent[before:]] == []
    torch.testing.assert_close(done.arrays.to_torch_state_dict()["w"],
                               result.arrays.to_torch_state_dict()["w"], rtol=0, atol=0)
