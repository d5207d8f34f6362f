"""A run killed after round R and restarted on the same ledger continues from round R + 1
with nothing lost (in-process; the real SIGKILL test is in test_deployment.py)."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord
from test_removal import LinearGrid, linear_problem, new_strategy, train
from test_strategy import server_identity  # noqa: F401  (autouse fixture)

from fl_ugm.ledger import Ledger


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
