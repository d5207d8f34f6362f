"""The round engine (``fl_ugm.engine``): the run's settings, validated once and stored in a
ledger's meta in one place, and ``step``, a pure function of (settings, state, replies)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fl_ugm import FedUGM
from fl_ugm.engine import (
    REFUSED_COMBINATIONS,
    ClientMemory,
    Contribution,
    RunSettings,
    ServerState,
    step,
)
from fl_ugm.robust import UpdateScreen


def test_the_settings_the_ledger_stores_read_back_as_they_were():
    settings = RunSettings(prior_precision=10.0, alpha="uniform", scale=0.5,
                           merge="fisher-averaging", server_lr=3.0, server_momentum=0.5,
                           server_optimizer="adam", client_memory=True, fisher="exact",
                           wire_dtype="float32")
    meta = settings.to_meta()
    assert set(meta) == {"prior_precision", "alpha", "scale", "merge", "server_lr",
                         "server_momentum", "server_optimizer", "carried_precision",
                         "client_memory"}
    assert RunSettings.from_meta(meta) == dataclasses.replace(
        settings, fisher="sampled", wire_dtype="float16")  # the clients' side is not stored
    # an old ledger: the defaults it was written under (δ 1 and no server momentum before
    # issue 31), not today's
    assert RunSettings.from_meta({}) == RunSettings(prior_precision=1.0, server_momentum=0.0)
    prior = {"w": torch.tensor([1.5, 2.0], dtype=torch.float64)}
    read = RunSettings.from_meta({"prior_precision": 1.0}, prior)  # H0 = δ + server Fisher
    torch.testing.assert_close(read.base_prior(["w"])["w"], prior["w"], rtol=0, atol=0)


def test_every_refused_combination_names_both_options_and_what_to_do():
    on = {"client_memory": True, "carried_precision": 0.5}
    for (one, other), why in REFUSED_COMBINATIONS.items():
        with pytest.raises(ValueError, match=rf"{one} cannot be combined with {other} yet "
                           rf"\({why}\); turn one of them off"):
            RunSettings(**{one: on[one], other: on[other]})


def test_options_are_validated_once_and_a_typo_is_named():
    with pytest.raises(ValueError, match=r"server_lr=0\.0; η must be finite and > 0"):
        RunSettings(server_lr=0)
    with pytest.raises(ValueError, match=r"client_memory='yes'; give True or False"):
        RunSettings(client_memory="yes")
    with pytest.raises(ValueError, match=r"update_screen=3; give an fl_ugm\.robust"):
        RunSettings(update_screen=3)
    assert RunSettings(prior_precision=2).prior_precision == 2.0  # an int is a δ too
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['priorprecision'\]; FedUGM "
                       r"takes \['prior_precision'"):
        FedUGM(priorprecision=1.0)
    with pytest.raises(TypeError, match="by name or as settings=, not both"):
        FedUGM(settings=RunSettings(), prior_precision=2.0)
    assert FedUGM(settings=RunSettings(prior_precision=2.0)).settings.prior_precision == 2.0


def contribution(client: str, seed: int, n: float = 10.0) -> Contribution:
    gen = torch.Generator().manual_seed(seed)
    return Contribution(client, n, {"w": torch.randn(4, generator=gen)},
                        {"w": torch.rand(4, generator=gen) * n})


def test_step_is_pure_and_an_empty_round_keeps_the_state():
    settings = RunSettings(client_memory=True, server_lr=0.8, server_momentum=0.5,
                           update_screen=UpdateScreen())
    state = ServerState({"w": torch.zeros(4)})
    first, result = step(settings, state, [contribution("a", 0), contribution("b", 1)], 1)
    assert result.remembered == [] and len(result.alphas) == 2
    assert torch.equal(state.global_state["w"], torch.zeros(4)) and not state.memory.index
    snapshot = {k: v.clone() for k, v in first.global_state.items()}
    second, result = step(settings, first, [contribution("a", 2)], 2)
    assert [(m.client_id, m.reply_round) for m in result.remembered] == [("b", 1)]
    assert torch.equal(first.global_state["w"], snapshot["w"])  # the input state is kept
    assert first.memory.rounds == {"a": 1, "b": 1} and second.memory.rounds["a"] == 2
    same, result = step(settings, second, [], 3)
    assert same is second and result.alphas == [] and result.remembered == []
    with pytest.raises(KeyError):
        step(settings, second, [contribution("a", 3)], 3, remembered=["zz"])


def test_the_memory_merges_only_the_clients_asked_for():
    settings = RunSettings(client_memory=True)
    memory = ClientMemory().remember(1, {"w": torch.zeros(4)},
                                     [contribution("a", 0), contribution("b", 1)],
                                     **settings.memory_options(["w"]))
    state = ServerState({"w": torch.zeros(4)}, memory=memory)
    _, every = step(settings, state, [contribution("c", 2)], 2)
    _, listed = step(settings, state, [contribution("c", 2)], 2, remembered=["b"])
    assert [m.client_id for m in every.remembered] == ["a", "b"]
    assert [m.client_id for m in listed.remembered] == ["b"]
    assert listed.alphas[0] > every.alphas[0]  # α over the clients merged


def test_server_momentum_moves_the_parameters_and_leaves_float_buffers_at_the_merge():
    """A momentum step on a BatchNorm running variance could make it negative: buffers take
    the merged value (the num-examples average of their deltas); m holds the parameters."""
    settings = RunSettings(server_momentum=0.5, server_lr=1.0, update_screen=None)

    def reply(client, seed):
        gen = torch.Generator().manual_seed(seed)
        return Contribution(client, 10.0, {"w": torch.randn(3, generator=gen),
                                           "var": -0.4 * torch.rand(2, generator=gen)},
                            {"w": torch.rand(3, generator=gen)})

    state = ServerState({"w": torch.zeros(3), "var": torch.ones(2)})
    for server_round in (1, 2, 3):
        start = state.global_state
        replies = [reply("a", server_round), reply("b", 10 + server_round)]
        state, _ = step(settings, state, replies, server_round)
        merged = start["var"] + sum(r.delta["var"] for r in replies) / 2
        torch.testing.assert_close(state.global_state["var"], merged)
    assert set(state.optimizer[0]) == {"w"}  # η = 1: the parameters moved by m
    torch.testing.assert_close(state.global_state["w"] - start["w"], state.optimizer[0]["w"])
