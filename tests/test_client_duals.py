"""Client dual variables (fl_ugm.client_duals, FedUGM(client_dual_step=ρ)): exact on the
linear oracle for any λ, FedDyn's λ update, the linear term in training, and the node state
that carries λ between rounds."""

from __future__ import annotations

import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from helpers import (
    PARAM_KEYS,
    LinearGrid,
    Net,
    global_state,
    linear_problem,
    message,
    proximal_joint_map,
)
from torch import nn

from fl_ugm import FedUGM
from fl_ugm.client import handle_train, train_classifier, ugm_reply
from fl_ugm.client_duals import DUAL_STATE_RECORD, reported_delta
from fl_ugm.engine import RunSettings
from fl_ugm.fisher import diagonal_fisher, iterate_batches
from fl_ugm.protocol import DUAL_STEP_KEY, ugm_train_config

pytestmark = pytest.mark.usefixtures("server_identity")


def test_duals_keep_every_round_the_exact_map_and_track_the_client_gradients():
    """On the linear oracle a client with dual λ trains to argmin ℓ_t − ⟨λ, θ⟩ + prior and
    sends Δ − λ/(δ + F): every round's global is still exactly the proximal joint MAP of the
    sampled clients (the closed form, round by round), while the duals are not zero; with
    ρ = 1 each client's new λ is the gradient of its loss where it trained (FedDyn)."""
    hessians, xty, theta0 = linear_problem(seed=43, clients=5)
    sizes, delta = [7, 12, 20, 31, 44], 0.6
    grid = LinearGrid(hessians, xty, sizes=sizes)
    strategy = FedUGM(client_memory=False, server_momentum=0.0, prior_precision=delta,
                      client_dual_step=1.0, fraction_train=0.6,
                      min_train_nodes=2, min_available_nodes=5, fisher_clip=None,
                      update_screen=None)
    random.seed(3)
    arrays, theta = ArrayRecord({"w": theta0}), theta0
    for server_round in range(1, 6):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        assert messages[0].content.config_records["config"][DUAL_STEP_KEY] == 1.0
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        kept, _, theta = proximal_joint_map(messages, theta, delta, sizes, hessians, xty)
        torch.testing.assert_close(arrays.to_torch_state_dict()["w"], theta, rtol=0,
                                   atol=1e-10)
        for t in kept:  # ∇ℓ_t(θ_t) = XᵀXθ_t − Xᵀy
            torch.testing.assert_close(grid.duals[t + 1],
                                       hessians[t] * grid.trained[t + 1] - xty[t],
                                       rtol=0, atol=1e-10)
    assert len(grid.duals) >= 3 and all(d.abs().max() > 1e-2 for d in grid.duals.values())
    with pytest.raises(ValueError, match=r"client_dual_step=-1\.0; ρ must be"):
        FedUGM(server_momentum=0.0, client_dual_step=-1.0)


def test_the_dual_adds_its_linear_term_to_the_training_gradient():
    """One SGD step with dual λ = the plain step + lr·λ/n (the gradient of −⟨λ, w⟩/n)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    start = nn.Linear(4, 3)
    dual = {k: torch.randn_like(p) for k, p in start.named_parameters()}
    steps = []
    for linear in (None, dual):
        model = nn.Linear(4, 3)
        model.load_state_dict(start.state_dict())
        train_classifier(model, x, y, epochs=1, batch_size=8, lr=0.5, seed=0,
                         prox_precision=2.0, dual=linear)
        steps.append(dict(model.named_parameters()))
    for key, value in dual.items():
        torch.testing.assert_close(steps[1][key] - steps[0][key], 0.5 * value / 8)


def _train_message(dual_step: float, seed: int = 0):
    config = ugm_train_config(ConfigRecord({"server-round": 1}), RunSettings(
        fisher="empirical", prior_precision=3.0, client_dual_step=dual_step,
        wire_dtype="float32"))
    return message(RecordDict({"arrays": ArrayRecord(global_state(seed)), "config": config}))


def test_handle_train_keeps_the_dual_in_the_node_state_and_sends_the_corrected_delta():
    """Round 1 starts from λ = 0 (the plain Δ) and leaves λ = −ρδΔ in the state; round 2
    trains with that λ and sends Δ − λ/(δ + F), F the reply's own Fisher."""
    torch.manual_seed(1)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    state = RecordDict()
    first = handle_train(_train_message(0.5), Net(), x, y, epochs=1, batch_size=8, lr=0.1,
                         seed=5, state=state)
    sent = first.content.array_records["delta"].to_torch_state_dict()
    dual = state.array_records[DUAL_STATE_RECORD].to_torch_state_dict()
    assert sorted(dual) == sorted(PARAM_KEYS)
    for key in PARAM_KEYS:
        torch.testing.assert_close(dual[key], -0.5 * 3.0 * sent[key])

    msg = _train_message(0.5, seed=1)
    reply = handle_train(msg, Net(), x, y, epochs=1, batch_size=8, lr=0.1, seed=6,
                         state=state)
    model = Net()
    model.load_state_dict(global_state(1))
    train_classifier(model, x, y, epochs=1, batch_size=8, lr=0.1, seed=6,
                     prox_precision=3.0, dual=dual)
    fisher = diagonal_fisher(model, iterate_batches(x, y, 256), kind="empirical",
                             generator=torch.Generator().manual_seed(6))
    step = {k: v - global_state(1)[k] for k, v in model.state_dict().items()
            if v.is_floating_point()}
    expected = reported_delta(step, fisher, 3.0, dual)
    got = reply.content.array_records["delta"].to_torch_state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got["fc.weight"], step["fc.weight"])  # the correction acts
    new = state.array_records[DUAL_STATE_RECORD].to_torch_state_dict()
    torch.testing.assert_close(new["fc.weight"], dual["fc.weight"] - 1.5 * step["fc.weight"])


def test_duals_without_node_state_or_with_a_stale_one_fail_clearly():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"state=context\.state"):
        handle_train(_train_message(1.0), Net(), x, y, epochs=1, batch_size=8, lr=0.1, seed=0)
    stale = RecordDict({DUAL_STATE_RECORD: ArrayRecord({"fc.weight": torch.zeros(2, 2)})})
    with pytest.raises(ValueError, match="does not match the model's trainable parameters"):
        handle_train(_train_message(1.0), Net(), x, y, epochs=1, batch_size=8, lr=0.1, seed=0,
                     state=stale)
    model = Net()
    model.load_state_dict(global_state(0))
    fisher = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"dual\['fc.weight'\] has shape \(3,\)"):
        ugm_reply(_train_message(1.0), model, fisher=fisher, num_examples=8,
                  dual={"fc.weight": torch.zeros(3)})
    plain = RecordDict()  # no duals asked: the state is left alone
    handle_train(_train_message(0.0), Net(), x, y, epochs=1, batch_size=8, lr=0.1, seed=0,
                 state=plain)
    assert DUAL_STATE_RECORD not in plain.array_records
