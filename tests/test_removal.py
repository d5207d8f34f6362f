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
from helpers import (
    H0,
    NO_SCREEN,
    LinearGrid,
    linear_problem,
    new_strategy,
    retrained,
    train,
    train_sampled,
)

from fl_ugm import FedUGM, RemovalError
from fl_ugm.ledger import Ledger, LedgerError, LedgerMismatchError
from fl_ugm.protocol import PRIOR_KEY, REMOVAL_KEY
from fl_ugm.removal import remove_from_ledger

pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_removal_through_the_strategy_is_exact_on_the_linear_oracle(mode, tmp_path):
    """Train one round, then remove p1 from a NEW strategy on the same ledger (a removal run
    after a server restart; online mode finds p1's node by the binding the ledger keeps)."""
    hessians, xty, theta0 = linear_problem(seed=5)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=1)

    strategy = new_strategy(tmp_path)
    arrays, report = strategy.remove(grid, "p1", method="eq13", mode=mode, repair_rounds=0)
    expected = retrained(hessians, xty, theta0, keep=[0, 2])
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], expected, rtol=0, atol=1e-10)
    assert report["mode"] == mode and report["removal_round"] == 2
    sent_types = [kind for kind, _ in grid.sent[1:]]
    if mode == "online":  # one removal request, to the node p1 is bound to
        assert sent_types == [MessageType.TRAIN]
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
    newest = Ledger(tmp_path).global_state(1)[1]["w"]
    strategy.remove(grid, "p0", method="eq13", mode="online", repair_rounds=0)
    (request,) = captured
    config = request.content.config_records["config"]
    assert config[REMOVAL_KEY] is True and config[PRIOR_KEY] == H0
    sent_global = request.content.array_records["arrays"].to_torch_state_dict()["w"]
    torch.testing.assert_close(sent_global, newest)
    assert Ledger(tmp_path).rounds() == [2]  # the globals trained with p0 are gone


def test_repair_rounds_exclude_the_removed_client_and_report_metrics(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=7)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    strategy = new_strategy(tmp_path)
    evaluated = []

    def evaluate(server_round, arrays):
        evaluated.append(server_round)
        return MetricRecord({"w0": float(arrays.to_torch_state_dict()["w"][0])})

    arrays, report = strategy.remove(grid, "p1", method="eq13", mode="offline", repair_rounds=2,
                                     evaluate_fn=evaluate)
    # two repair rounds sent only to p0's and p2's nodes (the ledger knows p1's node: no
    # query first)
    assert [kind for kind, _ in grid.sent[-3:]] == [MessageType.TRAIN] * 3
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
        strategy.remove(LinearGrid(hessians, xty, failing={2}), "p1", method="eq13", mode="online")
    with pytest.raises(RemovalError, match=r"removing client 'p1' failed: .*Nothing was"):
        strategy.remove(LinearGrid(hessians, xty, nan_nodes={2}), "p1", method="eq13",
                        mode="online")
    with pytest.raises(RemovalError, match="no connected node identifies as client 'p9'"):
        strategy.remove(LinearGrid(hessians, xty), "p9", method="eq13", mode="online")
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

    state, report = remove_from_ledger(ledger, "p1", method="eq13")
    eq13_only, _ = remove_from_ledger(ledger, "p1", method="eq13", revert_uninformed=False)
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
        strategy.remove(grid, "p1", mode="offline", repair_rounds=0)
    monkeypatch.undo()
    assert (tmp_path / "index.json").read_text() == index
    assert Ledger(tmp_path).client_ids() == ["p0", "p1", "p2"]
    assert strategy.roster.excluded == set() and Ledger(tmp_path).removed_clients() == {}

    arrays, _ = new_strategy(tmp_path).remove(grid, "p1", mode="offline", repair_rounds=0)
    ledger = Ledger(tmp_path)
    assert ledger.removed_clients() == {"p1": 3} and ledger.client_ids() == ["p0", "p2"]
    with pytest.raises(RemovalError, match=r"client 'p1' was already removed from this run "
                       r"\(by the global of round 3\); nothing to do"):
        new_strategy(tmp_path).remove(grid, "p1", mode="offline", repair_rounds=0)
    assert torch.equal(Ledger(tmp_path).global_state()[1]["w"], arrays.to_torch_state_dict()["w"])


def test_an_online_reply_must_come_from_the_client_asked(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=14)
    grid = LinearGrid(hessians, xty)
    strategy = new_strategy(tmp_path)
    train(strategy, grid, theta0, rounds=1)
    strategy.roster.node_of["p1"] = 3  # stale routing: node 3 serves p2
    index = (tmp_path / "index.json").read_text()
    with pytest.raises(RemovalError, match="node 3 answered the removal request of client 'p1' "
                       "as client 'p2'; nothing was changed"):
        strategy.remove(grid, "p1", method="eq13", mode="online")
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


@pytest.mark.parametrize("dual_step", [0.0, 1.0])
def test_replay_removal_equals_retraining_through_the_same_protocol(tmp_path, dual_step):
    """6 clients, 6 rounds, half of them sampled per round, non-uniform n, a per-tensor prior
    (δ + a server Fisher; the clients solve under the same H0) and a coordinate only p2
    informs. Replaying the stored history without p2 equals running the same protocol
    (the same participation, p2 left out) from the start, to 1e-8, through the ledger
    alone and through FedUGM.remove; also when the clients keep dual variables (their
    corrected Δ' is what the ledger records)."""

    from fl_ugm.merge import ugm_merge, ugm_shares

    clients, rounds, removed = 6, 6, 2
    hessians, xty, theta0 = linear_problem(seed=21, clients=clients, silent={removed: 0})
    sizes = [5, 9, 14, 20, 27, 35]
    server_fisher = {"w": 0.2 + torch.rand(5, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64)}
    h0 = H0 + server_fisher["w"]
    grid = LinearGrid(hessians, xty, sizes=sizes, prior=h0)

    def strategy():
        return FedUGM(client_memory=False, server_momentum=0.0, prior_precision=H0,
                      server_fisher=server_fisher, fraction_train=0.5,
                      min_train_nodes=2, min_available_nodes=clients, fisher_clip=None,
                      ledger=tmp_path, client_dual_step=dual_step, **NO_SCREEN)

    trained, participation = train_sampled(strategy(), grid, theta0, rounds, seed=4,
                                           removed=removed)
    assert bool(grid.duals) == bool(dual_step)
    assert len(participation) == rounds and all(len(s) == 3 for s in participation)

    theta = theta0  # the same protocol without p2: same rounds, same participants but p2
    applied = {t: torch.zeros(5, dtype=torch.float64) for t in range(clients)}
    for sampled in participation:
        kept = [t for t in sampled if t != removed]
        if not kept:
            continue
        deltas = [{"w": (h0 * theta + xty[t]) / (h0 + hessians[t]) - theta} for t in kept]
        alphas = [sizes[t] / sum(sizes[u] for u in kept) for t in kept]
        fishers = [{"w": hessians[t]} for t in kept]
        for t, share in zip(kept, ugm_shares({"w": theta}, deltas, fishers, alphas=alphas,
                                             prior_precision={"w": h0})):
            applied[t] += share["w"]
        theta = ugm_merge({"w": theta}, deltas, fishers, alphas=alphas,
                          prior_precision={"w": h0})["w"]
    assert float(theta[0]) == float(theta0[0]) != float(trained[0])  # only p2 moved w[0]
    assert (theta - trained).abs().max() > 1e-2  # p2's influence was real

    # κ = 1 without the shared-rank correction: the derivation's re-centring, exact for
    # clients that solve their problem; the defaults (tuned on nets) are not exact here
    default, _ = remove_from_ledger(Ledger(tmp_path), f"p{removed}")
    assert (default["w"] - theta).abs().max() > 1e-4
    state, report = remove_from_ledger(Ledger(tmp_path), f"p{removed}", recentring=1.0,
                                       shared_rank=0)
    torch.testing.assert_close(state["w"], theta, rtol=0, atol=1e-8)
    assert report["method"] == "replay" and report["approximate"] is False
    assert (report["replayed_from_round"], report["replayed_to_round"]) == (1, rounds)

    arrays, report = strategy().remove(grid, f"p{removed}", recentring=1.0, shared_rank=0,
                                       repair_rounds=0)  # and through the strategy
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], theta, rtol=0, atol=1e-8)
    ledger = Ledger(tmp_path)
    assert ledger.removed_clients() == {f"p{removed}": rounds + 1}
    for t in (0, 1, 3):  # the records follow the rewrite: what the protocol without p2 added
        torch.testing.assert_close(ledger.client(f"p{t}").applied["w"], applied[t], rtol=0,
                                   atol=1e-8)
    # the stored history is now the training without p2: replaying it changes nothing
    for round_ in ledger.history():
        ids = [p.client_id for p in ledger.history_round(round_).participants]
        assert f"p{removed}" not in ids
    state, _ = remove_from_ledger(ledger, "p0", recentring=1.0, shared_rank=0)
    theta = theta0  # removing p0 as well equals the protocol without both
    for sampled in participation:
        kept = [t for t in sampled if t not in (removed, 0)]
        if not kept:
            continue
        deltas = [{"w": (h0 * theta + xty[t]) / (h0 + hessians[t]) - theta} for t in kept]
        alphas = [sizes[t] / sum(sizes[u] for u in kept) for t in kept]
        theta = ugm_merge({"w": theta}, deltas, [{"w": hessians[t]} for t in kept],
                          alphas=alphas, prior_precision={"w": h0})["w"]
    torch.testing.assert_close(state["w"], theta, rtol=0, atol=1e-8)


def test_history_retention_dtype_and_the_approximate_replay(tmp_path, caplog):
    """A ledger that keeps the last 3 rounds in bfloat16: a client that joined earlier cannot
    be fully replayed (a clear error, or an approximate replay that says so); one that
    joined within the window can; the sizes are logged and reported."""
    hessians, xty, theta0 = linear_problem(seed=22, clients=3)
    grid = LinearGrid(hessians, xty)
    ledger = Ledger(tmp_path, history_rounds=3, history_dtype="bfloat16")
    strategy = FedUGM(server_momentum=0.0, prior_precision=H0, min_train_nodes=3,
                      min_available_nodes=3,
                      ledger=ledger, **NO_SCREEN)
    with caplog.at_level("INFO", logger="flwr"):
        train(strategy, grid, theta0, rounds=5)
    assert "ledger: round 5 recorded; history" in caplog.text
    reopened = Ledger(tmp_path)
    assert reopened.history() == [3, 4, 5] and reopened.history_dtype == "bfloat16"
    assert len(list((tmp_path / "history").iterdir())) == 3  # older rounds deleted
    stored = reopened.history_round(5)
    assert stored.participants[0].delta["w"].dtype == torch.bfloat16
    assert stored.start.global_state["w"].dtype == torch.float64  # the start globals stay exact
    assert reopened.history_bytes() == sum(
        p.stat().st_size for p in (tmp_path / "history").iterdir())
    with pytest.raises(LedgerMismatchError, match="history_rounds: stored 3, asked 0"):
        Ledger(tmp_path, history_rounds=0)

    with pytest.raises(LedgerError, match=r"client 'p1' first contributed in round 1, but the "
                       r"history starts at round 3 \(history_rounds=3\).*approximate=True"):
        remove_from_ledger(reopened, "p1")
    state, report = remove_from_ledger(reopened, "p1", approximate=True)
    assert report["approximate"] is True
    assert (report["replayed_from_round"], report["replayed_to_round"]) == (3, 5)
    assert torch.isfinite(state["w"]).all()
    assert report["history_dtype"] == "bfloat16"


def test_a_replay_needs_a_history(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=23)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    new_strategy(tmp_path).remove(grid, "p0", method="eq13", repair_rounds=0)  # history cleared
    ledger = Ledger(tmp_path)
    assert ledger.history() == [] and ledger.removed_clients() == {"p0": 3}
    with pytest.raises(LedgerError, match=r"holds no per-round history .* use method='eq13'"):
        remove_from_ledger(ledger, "p1")
    continued = new_strategy(tmp_path)
    continued.resume_from_ledger()  # this run's round 1 is the ledger's round 4
    train(continued, grid, ledger.global_state()[1]["w"], rounds=1)
    with pytest.raises(LedgerError, match="first contributed in round 1, but the history "
                       "starts at round 4"):
        remove_from_ledger(Ledger(tmp_path), "p1")
    with pytest.raises(RemovalError, match="give correction_budget > 0"):
        new_strategy(tmp_path).remove(grid, "p1", method="replay", mode="online")


def test_the_removed_clients_own_directions_are_outside_the_others_updates(tmp_path):
    """The replay's ``shared_rank`` correction: per row, the removed client's accumulated
    update minus its projection on the top principal directions of the other clients'
    per-round updates — a unit vector orthogonal to them, zero when nothing is left."""
    from fl_ugm.replay import _own_directions

    hessians, xty, theta0 = linear_problem(seed=24, dim=30, clients=3)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    ledger = Ledger(tmp_path)
    others = [p.delta["w"] for r in ledger.history() for p in ledger.history_round(r).participants
              if p.client_id != "p1"]
    record = ledger.client("p1")
    direction = _own_directions(ledger, record, ledger.history(), rank=10)["w"]
    assert float(direction.norm()) == pytest.approx(1.0)
    for update in others:  # 4 updates, all inside the rank-10 subspace that was removed
        assert abs(float(direction @ update)) < 1e-9 * float(update.norm())
    # the part of p1's update that the others' updates do not span
    residual = record.applied["w"] - torch.linalg.lstsq(
        torch.stack(others, 1), record.applied["w"]).solution @ torch.stack(others, 1).T
    torch.testing.assert_close(direction, residual / residual.norm(), rtol=0, atol=1e-9)
    # with a rank that spans p1's update too, nothing is left
    assert float(_own_directions(ledger, record, ledger.history(), rank=10)["w"].norm()) > 0
    few = linear_problem(seed=25, dim=3, clients=3)
    train(new_strategy(tmp_path / "small"), LinearGrid(*few[:2]), few[2], rounds=2)
    small = Ledger(tmp_path / "small")
    assert float(_own_directions(small, small.client("p1"), small.history(), 10)["w"].norm()) == 0


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_replay_removal_replays_the_server_optimizer(tmp_path, optimizer):
    """FedUGM with server momentum (η 0.8, β 0.7) or Adam (η 0.05, β₁ 0.7; Flower's FedAdam
    update, fl_ugm.server_optimizer), 6 clients, half sampled per round, 6 rounds. With
    momentum round 1 is still the exact UGM round (m_0 = 0). Replaying the history without
    p2 equals running the same protocol, the optimizer included, without p2, to 1e-8; the
    strategy keeps the replayed state, a resumed run recovers the state from the ledger,
    and eq13 removal refuses such a run."""

    from fl_ugm.merge import ugm_merge
    from fl_ugm.server_removal import RemovalError

    clients, rounds, removed, beta = 6, 6, 2, 0.7
    lr = 0.8 if optimizer == "momentum" else 0.05
    hessians, xty, theta0 = linear_problem(seed=31, clients=clients, silent={removed: 0})
    sizes = [5, 9, 14, 20, 27, 35]
    grid = LinearGrid(hessians, xty, sizes=sizes)

    def strategy():
        return FedUGM(client_memory=False, prior_precision=H0, fraction_train=0.5,
                      min_train_nodes=2,
                      min_available_nodes=clients, fisher_clip=None, ledger=tmp_path,
                      server_lr=lr, server_momentum=beta, server_optimizer=optimizer,
                      **NO_SCREEN)

    def protocol(participation, left_out):
        """θ and the optimizer state after the rounds, each merging its sampled clients but
        ``left_out``."""
        theta, momentum, second = theta0, None, 0.0
        for server_round, sampled in enumerate(participation, 1):
            kept = [t for t in sampled if t not in left_out]
            if not kept:
                continue
            merged = ugm_merge(
                {"w": theta}, [{"w": (H0 * theta + xty[t]) / (H0 + hessians[t]) - theta}
                               for t in kept],
                [{"w": hessians[t]} for t in kept],
                alphas=[sizes[t] / sum(sizes[u] for u in kept) for t in kept],
                prior_precision=H0)["w"]
            step = merged - theta
            if optimizer == "momentum":
                momentum = step + (0 if momentum is None else beta * momentum)
                theta = theta + lr * momentum
                continue
            momentum = (1 - beta) * step + (0 if momentum is None else beta * momentum)
            second = 0.99 * second + 0.01 * step**2  # FedAdam: β₂ 0.99, τ 1e-3
            rate = lr * (1 - 0.99 ** (server_round + 1)) ** 0.5 / (1 - beta ** (server_round + 1))
            theta = theta + rate * momentum / (second**0.5 + 1e-3)
        return theta, momentum

    trainer = strategy()
    trained, participation = train_sampled(trainer, grid, theta0, rounds, seed=5,
                                           removed=removed)
    theta, momentum = protocol(participation, ())
    torch.testing.assert_close(trained, theta, rtol=0, atol=1e-10)  # the strategy's rounds
    torch.testing.assert_close(trainer.state.optimizer[0]["w"], momentum, rtol=0, atol=1e-10)
    if optimizer == "momentum":
        first = protocol(participation[:1], ())[0]  # round 1: η · (the UGM merge − θ0)
        exact = (H0 * theta0 + sum(sizes[t] * xty[t] for t in participation[0])
                 / sum(sizes[t] for t in participation[0])) / (
            H0 + sum(sizes[t] * hessians[t] for t in participation[0])
            / sum(sizes[t] for t in participation[0]))
        torch.testing.assert_close(first, theta0 + lr * (exact - theta0), rtol=0, atol=1e-12)

    resumed = strategy()
    resumed.resume_from_ledger()
    assert len(resumed.state.optimizer) == len(trainer.state.optimizer) == (
        1 if optimizer == "momentum" else 2)
    for part, expected in zip(resumed.state.optimizer, trainer.state.optimizer, strict=True):
        torch.testing.assert_close(part["w"], expected["w"], rtol=0, atol=1e-10)
    with pytest.raises(LedgerError, match=rf"used server {optimizer} .* Use method='replay'"):
        remove_from_ledger(Ledger(tmp_path), f"p{removed}", method="eq13")
    with pytest.raises(RemovalError, match="Use method='replay'"):
        strategy().remove(grid, f"p{removed}", method="eq13", repair_rounds=0)

    without, momentum_without = protocol(participation, (removed,))
    assert (without - trained).abs().max() > 1e-2  # p2's influence was real
    state, report = remove_from_ledger(Ledger(tmp_path), f"p{removed}", recentring=1.0,
                                       shared_rank=0)
    torch.testing.assert_close(state["w"], without, rtol=0, atol=1e-8)
    assert (report["server_lr"], report["server_momentum"]) == (lr, beta)
    remover = strategy()
    arrays, _ = remover.remove(grid, f"p{removed}", recentring=1.0, shared_rank=0,
                               repair_rounds=0)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], without, rtol=0, atol=1e-8)
    torch.testing.assert_close(remover.state.optimizer[0]["w"], momentum_without, rtol=0, atol=1e-8)
    # a server restarted on the ledger right after the removal (the offline-removal flow)
    # continues from the replayed optimizer state, not from zero
    restarted = strategy()
    assert restarted.resume_from_ledger()[0] == rounds + 1  # the removal's round
    for part, expected in zip(restarted.state.optimizer, remover.state.optimizer, strict=True):
        torch.testing.assert_close(part["w"], expected["w"], rtol=0, atol=1e-8)
    # the rewritten history carries the replayed momentum: removing p0 too equals the
    # protocol without both
    state, _ = remove_from_ledger(Ledger(tmp_path), "p0", recentring=1.0, shared_rank=0)
    torch.testing.assert_close(state["w"], protocol(participation, (removed, 0))[0], rtol=0,
                               atol=1e-8)


def test_a_resume_after_removing_the_last_rounds_only_client_keeps_the_momentum(tmp_path):
    """One client per round with server momentum: removing the client the last round merged
    alone leaves that round empty in the rewritten history, where the replay kept m (no
    step); a server restarted on the ledger continues from that m, not from
    (θ_R − θ_{R−1}) / η = 0."""
    import random

    hessians, xty, theta0 = linear_problem(seed=32, clients=4)
    grid = LinearGrid(hessians, xty, sizes=[5, 9, 14, 20])

    def strategy():
        return FedUGM(client_memory=False, prior_precision=H0, fraction_train=0.25,
                      min_train_nodes=1,
                      min_available_nodes=4, fisher_clip=None, ledger=tmp_path,
                      server_lr=0.8, server_momentum=0.7, **NO_SCREEN)

    random.seed(3)
    train(strategy(), grid, theta0, rounds=5)
    participation = grid.participation()
    last = participation[-1][0]
    assert all(len(sampled) == 1 for sampled in participation)
    assert any(sampled != [last] for sampled in participation[:-1])  # someone else is left
    remover = strategy()
    remover.remove(grid, f"p{last}", recentring=1.0, shared_rank=0, repair_rounds=0)
    assert not Ledger(tmp_path).history_round(5).participants
    assert float(remover.state.optimizer[0]["w"].abs().max()) > 0
    restarted = strategy()
    restarted.resume_from_ledger()
    torch.testing.assert_close(restarted.state.optimizer[0]["w"],
                               remover.state.optimizer[0]["w"], rtol=0, atol=1e-10)


def test_replay_removal_replays_the_carried_precision(tmp_path):
    """FedUGM with a carried precision (γ 0.5: round r's clients train under, and its merge
    uses, δ + C_{r−1}; C_r = γ (C_{r−1} + Σ α F)), 6 clients, half sampled per round, 6
    rounds. Replaying the history without p2 replays C too (each remaining client re-centred
    from the recorded prior to the replayed one) and equals running the same protocol
    without p2, to 1e-8; the strategy keeps the replayed C, a resumed run recovers C from
    the ledger, and eq13 removal refuses such a run."""

    clients, rounds, removed, gamma = 6, 6, 2, 0.5
    hessians, xty, theta0 = linear_problem(seed=32, clients=clients, silent={removed: 0})
    sizes = [5, 9, 14, 20, 27, 35]
    grid = LinearGrid(hessians, xty, sizes=sizes)

    def strategy():
        return FedUGM(client_memory=False, server_momentum=0.0, prior_precision=H0,
                      fraction_train=0.5, min_train_nodes=2,
                      min_available_nodes=clients, fisher_clip=None, ledger=tmp_path,
                      carried_precision=gamma, **NO_SCREEN)

    def protocol(participation, left_out):
        """θ and C after the rounds, each merging its sampled clients but ``left_out``."""
        theta, carried = theta0, torch.zeros_like(theta0)
        for sampled in participation:
            kept = [t for t in sampled if t not in left_out]
            if not kept:
                continue
            alphas = [sizes[t] / sum(sizes[u] for u in kept) for t in kept]
            prior = H0 + carried
            theta = (prior * theta + sum(a * xty[t] for a, t in zip(alphas, kept))) / (
                prior + sum(a * hessians[t] for a, t in zip(alphas, kept)))
            carried = gamma * (carried + sum(a * hessians[t] for a, t in zip(alphas, kept)))
        return theta, carried

    trainer = strategy()
    trained, participation = train_sampled(trainer, grid, theta0, rounds, seed=6,
                                           removed=removed)
    theta, carried = protocol(participation, ())
    torch.testing.assert_close(trained, theta, rtol=0, atol=1e-10)
    torch.testing.assert_close(trainer.state.carried["w"], carried, rtol=0, atol=1e-10)
    resumed = strategy()
    resumed.resume_from_ledger()
    torch.testing.assert_close(resumed.state.carried["w"], carried, rtol=0, atol=1e-10)
    with pytest.raises(LedgerError, match=r"carried a precision .* Use method='replay'"):
        remove_from_ledger(Ledger(tmp_path), f"p{removed}", method="eq13")

    without, carried_without = protocol(participation, (removed,))
    assert (without - trained).abs().max() > 1e-2  # p2's influence was real
    state, _ = remove_from_ledger(Ledger(tmp_path), f"p{removed}", recentring=1.0,
                                  shared_rank=0)
    torch.testing.assert_close(state["w"], without, rtol=0, atol=1e-8)
    remover = strategy()
    arrays, _ = remover.remove(grid, f"p{removed}", recentring=1.0, shared_rank=0,
                               repair_rounds=0)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], without, rtol=0, atol=1e-8)
    torch.testing.assert_close(remover.state.carried["w"], carried_without, rtol=0, atol=1e-8)
    resumed = strategy()  # after the removal, C comes from the rewritten history
    resumed.resume_from_ledger()
    torch.testing.assert_close(resumed.state.carried["w"], carried_without, rtol=0, atol=1e-8)
    state, _ = remove_from_ledger(Ledger(tmp_path), "p0", recentring=1.0, shared_rank=0)
    torch.testing.assert_close(state["w"], protocol(participation, (removed, 0))[0], rtol=0,
                               atol=1e-8)
