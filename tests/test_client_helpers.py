"""The ClientApp helpers: ``client_id`` (with its simulation fallback) and ``ProximalTerm``
(the prior the server asked for, as a loss term, in the units of ``train_classifier``)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from helpers import message
from torch import nn

from fl_ugm.client import ProximalTerm, client_id, load_global, train_classifier
from fl_ugm.protocol import FEDPROX_MU_KEY, PRIOR_KEY, PRIOR_RECORD, UGM_KEY


def context(**node_config) -> Context:
    return Context(run_id=1, node_id=9, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_client_id_prefers_the_configured_id_and_falls_back_to_the_partition():
    assert client_id(context(**{"client-id": "hospital-3", "partition-id": 1})) == "hospital-3"
    assert client_id(context(**{"partition-id": 4, "num-partitions": 10})) == "4"
    with pytest.raises(ValueError, match="--node-config 'client-id="):
        client_id(context())
    with pytest.raises(ValueError, match="1-128 letters"):
        client_id(context(**{"client-id": "client 1"}))


def net() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # a frozen layer: no prior on it
    return model


def request(model: nn.Module, config: dict, prior: dict | None = None):
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord(config)})
    if prior is not None:
        content[PRIOR_RECORD] = ArrayRecord(prior)
    return message(content)


def moved(model: nn.Module) -> dict[str, torch.Tensor]:
    """Move every trainable weight; return the global it started from."""
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape))
    return start


@pytest.mark.parametrize(("config", "precision"), [
    ({UGM_KEY: True, PRIOR_KEY: 3.0}, 3.0),     # FedUGM's δ, sum units
    ({FEDPROX_MU_KEY: 0.1}, 0.1 * 20),          # FedProx's μ on the mean loss: μ·n
    ({}, 0.0),                                  # FedAvg asks for none
])
def test_the_term_is_the_asked_precision_over_2n_times_the_squared_distance(config, precision):
    model, n = net(), 20
    msg = request(model, config)
    load_global(msg, model)
    prox = ProximalTerm(msg, model, n)
    start = moved(model)
    expected = float(sum(((p - start[k]) ** 2).sum() for k, p in model.named_parameters()
                         if p.requires_grad).detach()) * precision / (2 * n)
    assert prox.precision == precision
    torch.testing.assert_close(prox(model).detach(), torch.as_tensor(expected))
    if precision:
        assert float(prox(model).detach()) > 0
    with torch.no_grad():
        model[0].weight.add_(5.0)  # the frozen layer is outside the term
    torch.testing.assert_close(prox(model).detach(), torch.as_tensor(expected))


def test_a_per_coordinate_prior_weights_each_coordinate():
    """FedUGM with a carried precision sends δ + C per coordinate; a parameter the record does
    not name gets δ."""
    model, n = net(), 8
    carried = {"2.weight": torch.arange(6.0).reshape(2, 3) + 1.0}
    msg = request(model, {UGM_KEY: True, PRIOR_KEY: 0.5}, prior=carried)
    load_global(msg, model)
    prox = ProximalTerm(msg, model, n)
    start = moved(model)
    expected = ((carried["2.weight"] * (model[2].weight - start["2.weight"]) ** 2).sum()
                + 0.5 * ((model[2].bias - start["2.bias"]) ** 2).sum()) / (2 * n)
    torch.testing.assert_close(prox(model), expected)


def test_sgd_on_loss_plus_the_term_is_the_ready_made_loops_proximal_training():
    """The helper's gradient is the one train_classifier applies for the same prior: SGD with
    either lands on the same weights."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    msg = request(net(), {UGM_KEY: True, PRIOR_KEY: 40.0})

    reference = net()
    load_global(msg, reference)
    with torch.no_grad():  # start away from the anchor, so the prior pulls
        for p in reference.parameters():
            p.add_(0.3)
    own = net()
    own.load_state_dict(reference.state_dict())
    train_classifier(reference, x, y, epochs=1, batch_size=16, lr=0.1, seed=0,
                     prox_precision=40.0, anchor=msg.content["arrays"].to_torch_state_dict())

    anchor_model = net()
    load_global(msg, anchor_model)
    prox = ProximalTerm(msg, anchor_model, 16)
    optimizer = torch.optim.SGD([p for p in own.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(own(x), y) + prox(own)
    loss.backward()
    optimizer.step()
    for (key, a), b in zip(own.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
