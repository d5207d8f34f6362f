"""FedUGM's client memory (``client_memory=True``, ``fl_ugm.client_memory``): every client's
latest reply, re-centred to the current global, enters each round's merge."""

from __future__ import annotations

import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LinearGrid, linear_problem

from fl_ugm import FedUGM
from fl_ugm.engine import ClientMemory, Contribution
from fl_ugm.merge import recentred_delta
from fl_ugm.strategy import REMEMBERED_METRIC

pytestmark = pytest.mark.usefixtures("server_identity")


def _round(strategy, grid, server_round, theta):
    messages = list(strategy.configure_train(server_round, ArrayRecord({"w": theta}),
                                             ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return [m.metadata.dst_node_id - 1 for m in messages], arrays, metrics


def test_with_memory_partial_participation_merges_as_if_every_client_seen_took_part():
    """On the linear oracle each round's global is exactly argmin Σ_j α_j ℓ_j(θ) +
    ½δ‖θ − θ_{r−1}‖² over every client seen so far (α_j = n_j / Σ n over them), although
    only 2 of 5 clients reply each round and the others' replies are rounds old."""
    hessians, xty, theta0 = linear_problem(seed=43, clients=5)
    sizes, delta = [7, 12, 20, 31, 44], 0.6
    grid = LinearGrid(hessians, xty, sizes=sizes)
    strategy = FedUGM(prior_precision=delta, client_memory=True, fraction_train=0.4,
                      min_train_nodes=2, min_available_nodes=5, fisher_clip=None,
                      update_screen=None)
    random.seed(3)
    theta, seen, remembered = theta0, set(), []
    for server_round in range(1, 7):
        sampled, arrays, metrics = _round(strategy, grid, server_round, theta)
        remembered.append(len(seen - set(sampled)))
        seen |= set(sampled)
        total = sum(sizes[j] for j in seen)
        expected = (delta * theta + sum(sizes[j] / total * xty[j] for j in seen)) / (
            delta + sum(sizes[j] / total * hessians[j] for j in seen))
        theta = arrays.to_torch_state_dict()["w"]
        torch.testing.assert_close(theta, expected, rtol=0, atol=1e-10)
        assert metrics[REMEMBERED_METRIC] == remembered[-1]
    assert seen == set(range(5)) and max(remembered) == 3  # stale replies were merged
    assert sorted(strategy.state.memory.replies) == [f"p{j}" for j in range(5)]
    assert len(strategy.state.memory.starts) <= 5  # only the globals a remembered reply needs


def test_recentring_is_the_fine_tune_from_the_new_global_on_a_quadratic():
    """Δ̃ = Δ + F (s − θ) / (P + F) equals the exact fine-tune of ½(w − w*)ᵀF(w − w*) under
    the prior P from θ; with F = 0 (an entry no Fisher informs) Δ̃ = Δ, and entries without a
    Fisher (buffers) are kept as they are."""
    gen = torch.Generator().manual_seed(5)
    fisher, optimum, start, current = (torch.rand(6, generator=gen, dtype=torch.float64)
                                       for _ in range(4))
    fisher[0] = 0.0
    prior = torch.full((6,), 0.3, dtype=torch.float64)

    def fine_tune(origin):
        return (prior * origin + fisher * optimum) / (prior + fisher) - origin

    buffer = torch.tensor([2.0], dtype=torch.float64)
    out = recentred_delta({"w": fine_tune(start), "running": buffer}, {"w": fisher},
                          {"w": start - current}, {"w": prior})
    torch.testing.assert_close(out["w"], fine_tune(current), rtol=0, atol=1e-14)
    assert out["w"][0] == fine_tune(start)[0] and out["running"] is buffer


def test_memory_with_the_task_arithmetic_merge_is_mifa():
    """F ≡ 0: every remembered Δ_j enters as it was sent, weighted n_j / Σ n over all
    clients seen (MIFA's average of the latest updates)."""
    hessians, xty, theta0 = linear_problem(seed=44, clients=4)
    sizes = [5, 10, 15, 30]
    grid = LinearGrid(hessians, xty, sizes=sizes)
    strategy = FedUGM(merge="task-arithmetic", client_memory=True, fraction_train=0.5,
                      min_train_nodes=2, min_available_nodes=4, fisher_clip=None,
                      update_screen=None)
    random.seed(1)
    theta, latest = theta0, {}
    for server_round in range(1, 7):
        sampled, arrays, _ = _round(strategy, grid, server_round, theta)
        for j in sampled:
            latest[j] = grid.trained[j + 1] - theta
        total = sum(sizes[j] for j in latest)
        expected = theta + sum(sizes[j] / total * d for j, d in latest.items())
        theta = arrays.to_torch_state_dict()["w"]
        torch.testing.assert_close(theta, expected, rtol=0, atol=1e-12)
    assert len(latest) == 4


def test_a_dropped_reply_is_not_remembered_and_bad_combinations_are_refused():
    hessians, xty, theta0 = linear_problem(seed=45, clients=3)
    grid = LinearGrid(hessians, xty)
    strategy = FedUGM(prior_precision=1.0, client_memory=True, min_train_nodes=2,
                      min_available_nodes=3, fisher_clip=None, update_screen=None)
    _, arrays, _ = _round(strategy, grid, 1, theta0)
    kept = strategy.state.memory.replies["p0"]
    grid.nan_nodes = {1}  # client p0 now sends a NaN Δ: dropped, its round-1 reply stays
    _, arrays, metrics = _round(strategy, grid, 2, arrays.to_torch_state_dict()["w"])
    assert strategy.state.memory.replies["p0"] is kept and metrics[REMEMBERED_METRIC] == 1
    assert torch.isfinite(arrays.to_torch_state_dict()["w"]).all()
    with pytest.raises(ValueError, match="client_memory cannot be combined"):
        FedUGM(client_memory=True, carried_precision=0.5)


def test_the_memory_keeps_only_the_start_globals_it_needs_and_is_never_modified():
    def reply(client, n):
        return Contribution(client, n, {"w": torch.ones(2)}, {"w": torch.ones(2)})

    one, two = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    empty = ClientMemory()
    first = empty.remember(1, one, [reply("a", 3)])
    memory = first.remember(2, two, [reply("a", 4)])
    assert list(memory.starts) == [2] and memory.replies["a"][1].num_examples == 4
    assert list(first.starts) == [1] and not empty.replies  # the older memories stay
    memory = memory.remember(3, one, [reply("b", 1)])
    ((round_, item),) = memory.recentred(two, 1.0, ["a"])
    assert (round_, item.client_id) == (2, "a")
    torch.testing.assert_close(item.delta["w"], torch.ones(2))  # started where θ is
    assert list(memory.without(["a"]).replies) == ["b"]
    with pytest.raises(ValueError, match="needs a client id"):
        memory.remember(4, one, [reply(None, 1)])


def test_replay_removal_replays_the_memory_and_the_strategy_keeps_the_replayed_memory(
        tmp_path):
    """The memory with a ledger, server momentum (η 0.8, β 0.5) and a per-tensor prior (δ +
    a server Fisher), 6 clients, half sampled per round. The run is the protocol "each
    round, argmin over every client seen so far, then the momentum step"; replaying the
    history without p2 (κ = 1, no shared-rank correction: the derivation's re-centring)
    equals that protocol without p2 to 1e-8, through the ledger and through FedUGM.remove,
    whose repair round then merges the rebuilt memory. A resumed run rebuilds the memory
    from the history; eq13 removal and a truncated history are refused."""
    from helpers import H0, train_sampled

    from fl_ugm.ledger import Ledger, LedgerError
    from fl_ugm.removal import remove_from_ledger

    clients, rounds, removed, lr, beta = 6, 6, 2, 0.8, 0.5
    hessians, xty, theta0 = linear_problem(seed=46, clients=clients, silent={removed: 0})
    sizes = [5, 9, 14, 20, 27, 35]
    server_fisher = {"w": 0.2 + torch.rand(5, generator=torch.Generator().manual_seed(6),
                                           dtype=torch.float64)}
    h0 = H0 + server_fisher["w"]
    grid = LinearGrid(hessians, xty, sizes=sizes, prior=h0)

    def strategy():
        return FedUGM(prior_precision=H0, server_fisher=server_fisher, client_memory=True,
                      fraction_train=0.5, min_train_nodes=2, min_available_nodes=clients,
                      fisher_clip=None, update_screen=None, ledger=tmp_path, server_lr=lr,
                      server_momentum=beta)

    def protocol(participation, left_out):
        theta, momentum, seen = theta0, None, set()
        for sampled in participation:
            kept = {t for t in sampled if t not in left_out}
            if not kept:
                continue
            seen |= kept
            total = sum(sizes[j] for j in seen)
            merged = (h0 * theta + sum(sizes[j] / total * xty[j] for j in seen)) / (
                h0 + sum(sizes[j] / total * hessians[j] for j in seen))
            momentum = merged - theta + (0 if momentum is None else beta * momentum)
            theta = theta + lr * momentum
        return theta

    trainer = strategy()
    trained, sampled = train_sampled(trainer, grid, theta0, rounds, seed=7, removed=removed)
    torch.testing.assert_close(trained, protocol(sampled, ()), rtol=0, atol=1e-10)
    ledger = Ledger(tmp_path)
    assert any(ledger.history_round(r).remembered for r in ledger.history())

    resumed = strategy()
    resumed.resume_from_ledger()  # the memory as the history leaves it, and the momentum
    torch.testing.assert_close(resumed.state.optimizer[0]["w"],
                               trainer.state.optimizer[0]["w"], rtol=0, atol=1e-10)
    assert {c: r for c, (r, _) in resumed.state.memory.replies.items()} == {
        c: r for c, (r, _) in trainer.state.memory.replies.items()}
    for client, (_, reply) in trainer.state.memory.replies.items():
        torch.testing.assert_close(resumed.state.memory.replies[client][1].delta["w"],
                                   reply.delta["w"], rtol=0, atol=0)

    without = protocol(sampled, {removed})
    assert (without - trained).abs().max() > 1e-2  # p2's influence was real
    state, _ = remove_from_ledger(ledger, f"p{removed}", recentring=1.0, shared_rank=0)
    torch.testing.assert_close(state["w"], without, rtol=0, atol=1e-8)
    with pytest.raises(LedgerError, match=r"client memory.*Use method='replay'"):
        remove_from_ledger(ledger, f"p{removed}", method="eq13")

    remover = strategy()
    arrays, report = remover.remove(grid, f"p{removed}", recentring=1.0, shared_rank=0,
                                    repair_rounds=1)
    assert report["method"] == "replay" and report["repair_rounds"] == 1
    assert f"p{removed}" not in remover.state.memory.replies
    assert f"p{removed}" not in grid.sent[-1][1]
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"],
                               protocol(grid.participation(), {removed}), rtol=0, atol=1e-8)
    ledger = Ledger(tmp_path)
    assert all(m.client_id != f"p{removed}" for r in ledger.history()
               for m in ledger.history_round(r).remembered)

    with pytest.raises(ValueError, match="client_memory needs a ledger that keeps every "
                       "round's history"):
        FedUGM(client_memory=True, ledger=Ledger(tmp_path / "short", history_rounds=3))
