"""The update screen (``fl_ugm.robust.UpdateScreen``, FedUGM's ``update_screen``): the norm
bound and the cosine screen, alone and through the strategy, the ledger and removal."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import H0, LinearGrid, linear_problem, train

from fl_ugm import FedUGM
from fl_ugm.ledger import Ledger
from fl_ugm.removal import remove_from_ledger
from fl_ugm.robust import UpdateScreen
from fl_ugm.strategy import NORM_BOUNDED_METRIC, SCREENED_OUT_METRIC

pytestmark = pytest.mark.usefixtures("server_identity")

COSINE_SCREEN = UpdateScreen(norm_bound=3.0, min_cosine=0.0)
THETA_STAR = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0], dtype=torch.float64)


def agreeing_deltas(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Deltas that share a direction (cosines with their median well above 0)."""
    gen = torch.Generator().manual_seed(seed)
    common = {"a": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    return [{k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in common.items()}
            for _ in range(count)]


def test_without_the_cosine_screen_no_cosine_is_computed():
    deltas = agreeing_deltas(5)
    deltas[2] = {k: 10 * v for k, v in deltas[2].items()}
    _, verdicts = UpdateScreen(norm_bound=3.0)(deltas)
    assert all(math.isnan(v.cosine) for v in verdicts)
    assert verdicts[2].scale < 1 and all(v.scale == 1 for i, v in enumerate(verdicts) if i != 2)


def test_an_agreeing_round_is_left_exactly_as_it_came():
    deltas = agreeing_deltas(7)
    out, verdicts = UpdateScreen(min_cosine=0.0)(deltas)
    assert all(not v.dropped and v.scale == 1 and v.cosine > 0.5 for v in verdicts)
    assert all(o[k] is d[k] for o, d in zip(out, deltas, strict=True) for k in d)


def test_a_long_delta_is_scaled_to_exactly_the_bound_and_a_flipped_one_dropped():
    deltas = agreeing_deltas(7)
    deltas[2] = {k: 10 * v for k, v in deltas[2].items()}
    deltas[5] = {k: -v for k, v in deltas[5].items()}
    out, verdicts = COSINE_SCREEN(deltas)
    norms = [math.sqrt(sum(float(v.square().sum()) for v in d.values())) for d in deltas]
    median = sorted(norms)[3]
    bounded = math.sqrt(sum(float(v.square().sum()) for v in out[2].values()))
    assert verdicts[2].scale < 1 and bounded == pytest.approx(3.0 * median, rel=1e-6)
    assert verdicts[2].norm_ratio == pytest.approx(norms[2] / median, rel=1e-6)
    assert not verdicts[2].dropped  # long, but pointing the right way
    assert verdicts[5].dropped and verdicts[5].cosine < 0
    assert [v.dropped for v in verdicts].count(True) == 1
    assert torch.equal(deltas[2]["a"], 10 * agreeing_deltas(7)[2]["a"])  # inputs untouched


def test_the_screen_never_drops_a_majority():
    deltas = agreeing_deltas(5)
    for t in (0, 1, 2):  # three of five flipped: the median is theirs now
        deltas[t] = {k: -v for k, v in deltas[t].items()}
    _, verdicts = UpdateScreen(min_cosine=0.0)(deltas)
    assert sum(v.dropped for v in verdicts) <= 2
    _, verdicts = UpdateScreen(min_cosine=0.99)(agreeing_deltas(7))
    assert sum(v.dropped for v in verdicts) == 3  # ⌊(7 − 1)/2⌋, the lowest cosines
    kept = [v.cosine for v in verdicts if not v.dropped]
    assert min(kept) >= max(v.cosine for v in verdicts if v.dropped)


def test_non_finite_deltas_and_small_rounds_are_left_to_the_merge():
    deltas = agreeing_deltas(4)
    deltas[1] = {k: v.clone() for k, v in deltas[1].items()}
    deltas[1]["a"][0, 0] = float("nan")
    out, verdicts = UpdateScreen(min_cosine=0.0)(deltas)
    assert math.isnan(verdicts[1].cosine) and not verdicts[1].dropped
    assert out[1]["a"] is deltas[1]["a"]
    assert all(v.cosine > 0.5 for i, v in enumerate(verdicts) if i != 1)  # NaN not in the centre
    two = agreeing_deltas(2)
    two[1] = {k: -100 * v for k, v in two[1].items()}
    _, verdicts = UpdateScreen(min_cosine=0.0)(two)
    assert not any(v.dropped or v.scale < 1 for v in verdicts)  # no median of two
    zero = [{k: torch.zeros_like(v) for k, v in agreeing_deltas(1)[0].items()},
            *agreeing_deltas(3)]
    assert not COSINE_SCREEN(zero)[1][0].dropped  # a client that did not move is not hostile


def test_bad_settings_are_refused():
    for kwargs in ({"norm_bound": 0.5}, {"norm_bound": math.inf}, {"min_cosine": 1.0},
                   {"min_cosine": -1.0}, {"min_clients": 2}):
        with pytest.raises(ValueError, match="UpdateScreen"):
            UpdateScreen(**kwargs)


class HostileLinearGrid(LinearGrid):
    """The linear oracle's clients; node ``hostile`` flips its Δ (or multiplies it by
    ``factor``)."""

    def __init__(self, *args, hostile: int, factor: float = -1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.hostile, self.factor = hostile, factor

    def _answer(self, msg):
        reply = super()._answer(msg)
        if msg.metadata.dst_node_id == self.hostile and "delta" in reply.content:
            delta = reply.content.array_records["delta"].to_torch_state_dict()
            reply.content["delta"] = ArrayRecord({"w": self.factor * delta["w"]})
        return reply


def one_round(strategy: FedUGM, grid, theta: torch.Tensor, server_round: int):
    """(arrays, train metrics) of one round of ``strategy`` on ``grid`` from θ."""
    messages = strategy.configure_train(server_round, ArrayRecord({"w": theta}), ConfigRecord(),
                                        grid)
    return strategy.aggregate_train(server_round, grid.send_and_receive(messages))


def joint_map(hessians, xty, theta, keep):
    """The kept clients' exact joint MAP under the prior ½‖w − θ‖²_{H0}, α = n/Σn."""
    alpha = 1.0 / len(keep)  # every client reports n = 10
    return (H0 * theta + sum(alpha * xty[t] for t in keep)) / (
        H0 + sum(alpha * hessians[t] for t in keep))


def test_the_screened_strategy_is_the_exact_oracle_on_an_honest_round():
    """Clients that observe one model (their deltas agree): neither the norm bound nor the
    cosine screen fires, and each round is exactly the joint MAP under the round's prior
    (design §1's oracle)."""
    hessians, xty, theta0 = linear_problem(seed=3, clients=6, shared=THETA_STAR)
    strategy = FedUGM(server_momentum=0.0, prior_precision=H0, min_train_nodes=6,
                      min_available_nodes=6,
                      update_screen=COSINE_SCREEN)  # the default's norm bound, + the screen
    grid = LinearGrid(hessians, xty)
    theta = theta0
    for server_round in (1, 2, 3):
        arrays, metrics = one_round(strategy, grid, theta, server_round)
        expected = joint_map(hessians, xty, theta, range(6))
        theta = arrays.to_torch_state_dict()["w"]
        torch.testing.assert_close(theta, expected, rtol=0, atol=1e-10)
        assert metrics[SCREENED_OUT_METRIC] == 0 and metrics[NORM_BOUNDED_METRIC] == 0


def test_a_flipped_client_is_dropped_logged_and_never_enters_the_ledger(tmp_path, caplog):
    """One of six sends −Δ: it is dropped every round with its node and client id logged,
    the round is the exact joint MAP of the other five, the ledger's history holds the five,
    and a replay removal from that ledger still equals retraining without the removed
    client (through the same protocol, the flipper screened out again)."""
    hessians, xty, theta0 = linear_problem(seed=3, clients=6, shared=THETA_STAR)
    grid = HostileLinearGrid(hessians, xty, hostile=4)  # client p3
    strategy = FedUGM(server_momentum=0.0, prior_precision=H0, min_train_nodes=6,
                      min_available_nodes=6,
                      update_screen=COSINE_SCREEN, ledger=tmp_path / "run")
    theta = theta0
    with caplog.at_level(logging.INFO, logger="flwr"):
        for server_round in (1, 2, 3):
            arrays, metrics = one_round(strategy, grid, theta, server_round)
            expected = joint_map(hessians, xty, theta, [0, 1, 2, 4, 5])
            theta = arrays.to_torch_state_dict()["w"]
            torch.testing.assert_close(theta, expected, rtol=0, atol=1e-10)
            assert metrics[SCREENED_OUT_METRIC] == 1
    screened = [r for r in caplog.records if "update screen" in r.getMessage()]
    assert len(screened) == 3
    assert all("node 4" in r.getMessage() and "'p3'" in r.getMessage() for r in screened)
    # strongly opposed (cosine −0.96 in round 1) is a warning, mildly (−0.47 in round 3) INFO
    assert [r.levelno for r in screened] == [logging.WARNING, logging.WARNING, logging.INFO]
    ledger = Ledger(tmp_path / "run")
    assert all("p3" not in [c.client_id for c in ledger.history_round(r).participants]
               for r in ledger.history())
    assert "p3" not in ledger.client_ids()

    removed, _ = remove_from_ledger(ledger, "p0", recentring=1.0, shared_rank=0)  # exact
    retrain = FedUGM(server_momentum=0.0, prior_precision=H0, min_train_nodes=6,
                     min_available_nodes=6,
                     update_screen=COSINE_SCREEN, excluded_clients=["p0"])
    torch.testing.assert_close(removed["w"], train(retrain, grid, theta0, rounds=3),
                               rtol=0, atol=1e-8)


def test_a_scaled_update_is_merged_and_recorded_at_the_bound(tmp_path, caplog):
    """FedUGM's default screen is the norm bound alone (the cosine screen is opt-in)."""
    assert FedUGM().settings.update_screen == UpdateScreen(norm_bound=3.0, min_cosine=None)
    hessians, xty, theta0 = linear_problem(seed=5, clients=5, shared=THETA_STAR)
    grid = HostileLinearGrid(hessians, xty, hostile=2, factor=10.0)  # client p1
    strategy = FedUGM(prior_precision=H0, min_train_nodes=5, min_available_nodes=5,
                      ledger=tmp_path)
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, metrics = one_round(strategy, grid, theta0, 1)
    assert metrics[NORM_BOUNDED_METRIC] == 1 and metrics[SCREENED_OUT_METRIC] == 0
    assert any("node 2" in r.getMessage() and "scaled down to 3×" in r.getMessage()
               for r in caplog.records)
    stored = {c.client_id: c.delta["w"] for c in Ledger(tmp_path).history_round(1).participants}
    sent = 10.0 * ((H0 * theta0 + xty[1]) / (H0 + hessians[1]) - theta0)
    norms = sorted([float(sent.norm()), *(float(d.norm()) for k, d in stored.items()
                                          if k != "p1")])
    assert float(stored["p1"].norm()) == pytest.approx(3.0 * norms[2], rel=1e-9)
    torch.testing.assert_close(stored["p1"] / stored["p1"].norm(), sent / sent.norm())
