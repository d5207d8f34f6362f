"""FedUGM's client memory (``client_memory=True``, ``fl_ugm.memory``): every client's
latest reply, re-centred to the current global, enters each round's merge."""

from __future__ import annotations

import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LinearGrid, linear_problem

from fl_ugm import FedUGM
from fl_ugm.engine import Contribution
from fl_ugm.memory import ClientMemory, TermsInMemory, TermsOnDisk
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
    strategy = FedUGM(server_momentum=0.0, prior_precision=delta, client_memory=True,
                      fraction_train=0.4,
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
    assert sorted(strategy.state.memory.index) == [f"p{j}" for j in range(5)]


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
    strategy = FedUGM(server_momentum=0.0, merge="task-arithmetic", client_memory=True,
                      fraction_train=0.5,
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
    strategy = FedUGM(server_momentum=0.0, prior_precision=1.0, client_memory=True,
                      min_train_nodes=2,
                      min_available_nodes=3, fisher_clip=None, update_screen=None)
    _, arrays, _ = _round(strategy, grid, 1, theta0)
    kept = strategy.state.memory.term("p0")
    grid.nan_nodes = {1}  # client p0 now sends a NaN Δ: dropped, its round-1 reply stays
    _, arrays, metrics = _round(strategy, grid, 2, arrays.to_torch_state_dict()["w"])
    assert strategy.state.memory.term("p0") is kept and metrics[REMEMBERED_METRIC] == 1
    assert torch.isfinite(arrays.to_torch_state_dict()["w"]).all()
    with pytest.raises(ValueError, match="client_memory cannot be combined"):
        FedUGM(server_momentum=0.0, client_memory=True, carried_precision=0.5)


def test_the_memory_merges_as_the_replies_one_by_one_in_ram_or_on_disk(tmp_path):
    """The running sums give the remembered clients' Σ α Δ̃, Σ α F Δ̃ and Σ α F at any θ as
    the replies re-centred one by one do (float64, to round-off); a memory is never
    modified (a new one shares the store until keep_only_current); a reply without an id is
    merged but not remembered; the store on disk holds one file per remembered client."""
    gen = torch.Generator().manual_seed(9)

    def reply(client, n, seed):
        g = torch.Generator().manual_seed(seed)
        return Contribution(client, n, {"w": torch.randn(3, generator=g, dtype=torch.float64),
                                        "bn": torch.randn(2, generator=g, dtype=torch.float64)},
                            {"w": n * torch.rand(3, generator=g, dtype=torch.float64)})

    prior, factor = 0.7, 0.05
    starts = [{"w": torch.randn(3, generator=gen, dtype=torch.float64)} for _ in range(3)]
    theta = {"w": torch.randn(3, generator=gen, dtype=torch.float64),
             "bn": torch.zeros(2, dtype=torch.float64)}
    (tmp_path / "model.safetensors").write_bytes(b"a user's file")  # never touched
    for store in (TermsInMemory(), TermsOnDisk(tmp_path)):
        empty = ClientMemory(store)
        first = empty.remember(1, starts[0], [reply("a", 3, 0), reply("b", 5, 1)],
                               prior=prior, weighted=True)
        memory = first.remember(2, starts[1], [reply("a", 4, 2), reply(None, 9, 3)],
                                prior=prior, weighted=True)
        assert memory.rounds == {"a": 2, "b": 1} and first.rounds == {"a": 1, "b": 1}
        assert not empty.index  # the older memories stay as they were
        latest = {"a": (reply("a", 4, 2), starts[1]), "b": (reply("b", 5, 1), starts[0])}
        one = memory.recalled(theta, ["a", "b"], prior=prior, weighted=True, factor=factor,
                              fisher_weighted=True)
        alphas = {c: factor * item.num_examples for c, (item, _) in latest.items()}
        moved = {c: recentred_delta(item.delta, item.fisher,
                                    {"w": start["w"] - theta["w"]}, prior)["w"]
                 for c, (item, start) in latest.items()}
        fishers = {c: item.fisher["w"] for c, (item, _) in latest.items()}
        torch.testing.assert_close(one.fisher["w"], sum(alphas[c] * fishers[c] for c in alphas))
        torch.testing.assert_close((prior + one.fisher["w"]) * one.delta["w"], sum(
            alphas[c] * (prior + fishers[c]) * moved[c] for c in alphas))
        torch.testing.assert_close(one.delta["bn"], (4 * latest["a"][0].delta["bn"] + 5 *
                                                     latest["b"][0].delta["bn"]) / 9)
        assert one.num_examples == 9
        only_b = memory.recalled(theta, ["b"], prior=prior, weighted=True, factor=factor,
                                 fisher_weighted=True)
        torch.testing.assert_close(only_b.fisher["w"], alphas["b"] * fishers["b"])
        assert memory.without(["a"], prior=prior, weighted=True).rounds == {"b": 1}
        with pytest.raises(KeyError):
            memory.recalled(theta, ["zz"], prior=prior, weighted=True, factor=factor,
                            fisher_weighted=True)
        memory.keep_only_current()
        if isinstance(store, TermsOnDisk):
            assert sorted(p.name for p in tmp_path.iterdir()) == [
                "a.r000002.safetensors", "b.r000001.safetensors", "model.safetensors"]


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
    assert resumed.state.memory.rounds == trainer.state.memory.rounds
    for client in trainer.state.memory.index:
        torch.testing.assert_close(resumed.state.memory.term(client).delta["w"],
                                   trainer.state.memory.term(client).delta["w"], rtol=0, atol=0)

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
    assert f"p{removed}" not in remover.state.memory.index
    assert f"p{removed}" not in grid.sent[-1][1]
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"],
                               protocol(grid.participation(), {removed}), rtol=0, atol=1e-8)
    ledger = Ledger(tmp_path)
    assert all(m.client_id != f"p{removed}" for r in ledger.history()
               for m in ledger.history_round(r).remembered)

    with pytest.raises(ValueError, match="client_memory needs a ledger that keeps every "
                       "round's history"):
        FedUGM(server_momentum=0.0, client_memory=True, ledger=Ledger(tmp_path / "short",
               history_rounds=3))


def test_a_memory_on_disk_trains_exactly_as_one_in_ram(tmp_path):
    """FedUGM(memory_dir=...) keeps one file per remembered client and gives the same
    globals, to the bit, as the memory in RAM."""
    hessians, xty, theta0 = linear_problem(seed=47, clients=6)
    thetas = {}
    for where in (None, tmp_path / "memory"):
        grid = LinearGrid(hessians, xty, sizes=[5, 8, 13, 21, 34, 55])
        strategy = FedUGM(prior_precision=2.0, fraction_train=0.34, min_train_nodes=2,
                          min_available_nodes=6, update_screen=None, memory_dir=where)
        assert strategy.settings.client_memory and strategy.settings.server_momentum == 0.5
        random.seed(11)
        theta, trace = theta0, []
        for server_round in range(1, 6):
            _, arrays, _ = _round(strategy, grid, server_round, theta)
            theta = arrays.to_torch_state_dict()["w"]
            trace.append(theta)
        thetas[where] = torch.stack(trace)
    assert torch.equal(thetas[None], thetas[tmp_path / "memory"])
    files = sorted(p.name.split(".")[0] for p in (tmp_path / "memory").iterdir())
    assert files == sorted(strategy.state.memory.index) and len(files) >= 4
