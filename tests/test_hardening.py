"""What one client can send must not stop the server nor buy the merge: each defect the
review reproduced, as a test (the fuzz over mutated replies is tests/test_fuzz.py)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from helpers import (
    H0,
    NO_SCREEN,
    PARAM_KEYS,
    LinearGrid,
    global_state,
    linear_problem,
    message,
    new_strategy,
    train,
    ugm_reply,
    wire_tensors,
)

from fl_ugm import FedUGM
from fl_ugm.admission import FISHER_CLIPPED_METRIC, NUM_EXAMPLES_CLIPPED_METRIC
from fl_ugm.ledger import Ledger
from fl_ugm.protocol import build_ugm_reply
from fl_ugm.robust import clip_num_examples

pytestmark = pytest.mark.usefixtures("server_identity")


def honest(node: int, state, n: float = 40.0):
    return ugm_reply(node, n, state, seed=node,
                     client=ConfigRecord({"client-id": f"p{node}"}))


def wire(message_, record: str) -> dict:
    return wire_tensors(message_, record)


def with_array(reply, record: str, key: str, array: Array):
    reply.content.array_records[record][key] = array
    return reply


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def merged_by(strategy: FedUGM, state, replies, caplog) -> tuple[dict, str]:
    strategy.current_arrays = state
    with caplog.at_level(logging.INFO, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and all(bool(torch.isfinite(v.float()).all())
                                      for v in arrays.to_torch_state_dict().values())
    return metrics, caplog.text


def test_undecodable_arrays_are_dropped_with_the_reason(caplog):
    state = global_state()
    good = honest(1, state).content["delta"]["fc.weight"]
    values = np.load(io.BytesIO(good.data))
    bad = {
        "truncated": Array(dtype="float32", shape=(3, 4), stype=good.stype,
                           data=good.data[:-7]),
        "garbage": Array(dtype="float32", shape=(3, 4), stype=good.stype, data=b"\x93NUMPY!"),
        "big-endian": Array(dtype="float32", shape=(3, 4), stype=good.stype,
                            data=npy(values.astype(">f4"))),
        "lying metadata": Array(dtype="float32", shape=(3, 4), stype=good.stype,
                                data=npy(values.reshape(4, 3))),
    }
    replies = [honest(1, state), honest(2, state)]
    replies += [with_array(honest(node, state), "delta", "fc.weight", array)
                for node, array in enumerate(bad.values(), 3)]
    _, log = merged_by(FedUGM(min_train_nodes=2, update_screen=None), state, replies, caplog)
    for node in (3, 4, 5):
        assert f"dropping node {node} in round 1 (client 'p{node}'): delta['fc.weight'] cannot " \
               "be decoded" in log
    assert "delta['fc.weight'] declares float32 (3, 4) but its bytes hold float32 (4, 3)" in log


def test_a_client_id_the_ledger_cannot_store_is_dropped_when_parsed(tmp_path, caplog):
    state = global_state()
    replies = [honest(1, state), honest(2, state)]
    for node, client in ((3, "client 1"), (4, "Zürich"), (5, "..")):
        replies.append(ugm_reply(node, 40, state, seed=node,
                                 client=ConfigRecord({"client-id": client})))
    strategy = FedUGM(min_train_nodes=2, update_screen=None, ledger=tmp_path)
    _, log = merged_by(strategy, state, replies, caplog)
    for client in ("client 1", "Zürich", ".."):
        assert f"client id {client!r} must be 1-128 letters" in log
    assert strategy.ledger.client_ids() == ["p1", "p2"]


def test_sizes_too_large_to_sum_are_merged_not_raised(caplog):
    state = global_state()
    replies = [honest(1, state), honest(2, state), honest(3, state)]
    for claim in replies[:2]:  # 40 examples' Fisher, claiming 1.7e308 examples
        claim.content["metrics"] = MetricRecord({"num-examples": 1.7e308})
    metrics, _ = merged_by(FedUGM(min_train_nodes=3, update_screen=None, fisher_clip=None),
                           state, replies, caplog)
    assert NUM_EXAMPLES_CLIPPED_METRIC not in metrics  # the clip is off: only the sum is fixed


def test_a_delta_too_large_for_float32_drops_its_client(caplog):
    state = global_state()
    huge = honest(3, state)
    huge.content["delta"] = ArrayRecord({k: torch.full_like(v, 3e38) for k, v in
                                         huge.content["delta"].to_torch_state_dict().items()})
    replies = [honest(1, state), honest(2, state), huge]
    strategy = FedUGM(min_train_nodes=2, update_screen=None)
    _, log = merged_by(strategy, state, replies, caplog)
    assert "dropping node 3 in round 1 (client 'p3'): ugm_merge:" in log
    assert "overflowed torch.float32; deltas[2] (with its Fisher) is too large" in log


def reply(node: int, client: str, delta: dict, fisher: dict, n: float):
    return message(build_ugm_reply(delta, fisher, MetricRecord({"num-examples": n}), client),
                   src=node)


def shift(state, replies: list, extra: list, fisher_clip: float | None = 3.0) -> float:
    """How far ``extra`` moves the global from the merge of ``replies`` alone."""
    def merge(batch):
        strategy = FedUGM(min_train_nodes=len(batch), update_screen=None,
                          fisher_clip=fisher_clip)
        strategy.current_arrays = state
        return strategy.aggregate_train(1, batch)[0].to_torch_state_dict()

    base, moved = merge(replies), merge(replies + extra)
    return float(torch.sqrt(sum(((moved[k] - base[k]) ** 2).sum() for k in PARAM_KEYS)))


@pytest.mark.parametrize(("attack", "bound"), [
    ("n", [(40, 1)] * 3),       # three median clients sending the flipped Δ
    ("fisher", [(40, 3)]),      # a median-size client with 3× the median Fisher per example
    ("both", [(120, 9)]),       # 3× the median's data, 3× its Fisher per example
])
def test_an_inflated_claim_buys_no_more_than_its_bound(attack, bound):
    """Three honest clients of 40 examples with the same Fisher F; a fourth sends their
    opposite (×10) claiming n = 1e9 (with the Fisher of its 40 examples), a Fisher inflated
    10⁶×, or both. With the clip (its default, 3) it moves the merge no more than: three
    median clients sending the same Δ (n), a median client with 3× the median Fisher (the
    Fisher clip's bound), one with 3× the median's size and 3× its Fisher (both); without
    it, many times more."""
    state = global_state()
    fisher = {k: v for k, v in wire(honest(0, state), "fisher").items()}
    honest_replies = [reply(node, f"p{node}", wire(honest(node, state), "delta"), fisher, 40)
                      for node in (1, 2, 3)]
    flipped = {k: -10 * v for k, v in wire(honest(9, state), "delta").items()}
    n = 1e9 if attack in ("n", "both") else 40
    inflation = (1e6 if attack != "n" else 1) * (n / 40 if attack == "both" else 1)
    attacker = reply(4, "p4", flipped, {k: v * inflation for k, v in fisher.items()}, n)
    strategy = FedUGM(min_train_nodes=3, update_screen=None)
    strategy.current_arrays = state
    merged = strategy.aggregate_train(1, honest_replies)[0].to_torch_state_dict()
    base_step = {k: merged[k] - state[k] for k in PARAM_KEYS}
    reference = [reply(5 + i, f"m{i}", flipped, {k: v * scale for k, v in fisher.items()},
                       size) for i, (size, scale) in enumerate(bound)]
    allowed = shift(state, honest_replies, reference)
    bounded = shift(state, honest_replies, [attacker])
    assert 0 < bounded <= allowed * (1 + 1e-5)
    taken_over = shift(state, honest_replies, [attacker], fisher_clip=None)
    takeover = float(torch.sqrt(sum(((flipped[k] - base_step[k]) ** 2).sum()
                                    for k in PARAM_KEYS)))  # the global at θ + its Δ
    assert taken_over == pytest.approx(takeover, rel=1e-3) and taken_over > 1.1 * bounded


def test_the_size_clip_is_logged_counted_and_scales_the_fisher_with_the_size(caplog):
    state = global_state()
    big = honest(4, state, n=1e9)
    replies = [honest(1, state), honest(2, state), honest(3, state), big]
    metrics, log = merged_by(FedUGM(min_train_nodes=4, update_screen=None), state, replies,
                             caplog)
    assert metrics[NUM_EXAMPLES_CLIPPED_METRIC] == 1 and metrics[FISHER_CLIPPED_METRIC] == 0
    assert "node 4 (client 'p4') in round 1 claims 2.5e+07× the median client's number of " \
           "examples; weighted as 120 examples." in log
    sizes, bounded = clip_num_examples([40, 50, 1000], 3.0, [None, 45, None])
    assert sizes == [40, 45, 150.0] and bounded == [(1, 1.0), (2, 20.0)]  # median 50


def test_a_size_the_server_knows_bounds_the_claim(caplog):
    state = global_state()
    replies = [honest(1, state, n=400), honest(2, state), honest(3, state)]
    strategy = FedUGM(min_train_nodes=3, update_screen=None, fisher_clip=None,
                      client_sizes={"p1": 40})
    metrics, log = merged_by(strategy, state, replies, caplog)
    assert metrics[NUM_EXAMPLES_CLIPPED_METRIC] == 1
    assert "weighted as 40 examples" in log
    unchanged = honest(1, state).content["metrics"]
    assert unchanged == MetricRecord({"num-examples": 40, "train-loss": 2.0})


class ImpostorGrid(LinearGrid):
    """The linear oracle's nodes 1..3 (clients p0..p2) and node ``impostor`` (a lower id),
    which answers train requests and queries as client p1 (with p0's data)."""

    def __init__(self, *args, impostor: int = 0, connected_p1: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.impostor, self.connected_p1 = impostor, connected_p1

    def get_node_ids(self):
        nodes = [self.impostor, *super().get_node_ids()]
        return [n for n in nodes if self.connected_p1 or n != 2]

    def _answer(self, msg):
        node = msg.metadata.dst_node_id
        if node != self.impostor:
            return super()._answer(msg)
        incoming = message(msg.content, src=0, dst=1, kind=msg.metadata.message_type)
        reply = super()._answer(incoming)  # p0's answer, re-labelled as p1 from this node
        reply.content["client"] = ConfigRecord({"client-id": "p1"})
        return message(reply.content, src=self.impostor, kind=msg.metadata.message_type)


def test_a_bound_client_id_cannot_be_taken_by_another_node_across_restarts(tmp_path, caplog):
    """p1 is bound to node 2 in the ledger. After a server restart, node 0 (a lower id)
    also answers as p1: while node 2 is connected its claims are dropped, its record is not
    touched, and an online removal of p1 goes to node 2; once node 2 is gone, the next
    claimant takes the id over (a SuperNode that restarted under a new id)."""
    hessians, xty, theta0 = linear_problem(seed=51)
    train(new_strategy(tmp_path), LinearGrid(hessians, xty), theta0, rounds=1)
    assert Ledger(tmp_path).nodes() == {"p0": 1, "p1": 2, "p2": 3}
    record = Ledger(tmp_path).client("p1")
    grid = ImpostorGrid(hessians, xty)

    def strategy_on(directory, nodes):  # every connected node asked, three replies needed
        return FedUGM(prior_precision=H0, server_momentum=0.0, min_train_nodes=3,
                      min_available_nodes=nodes,
                      ledger=directory, **NO_SCREEN)

    strategy = strategy_on(tmp_path, 4)
    _, arrays = strategy.resume_from_ledger()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train(strategy, grid, arrays.to_torch_state_dict()["w"], rounds=1)
    assert "dropping node 0 in round 2 (client 'p1'): client id 'p1' is bound to node 2, " \
           "which replied too." in caplog.text
    torch.testing.assert_close(Ledger(tmp_path).client("p1").delta["w"],
                               Ledger(tmp_path).history_round(2).participants[1].delta["w"])
    assert Ledger(tmp_path).nodes()["p1"] == 2 and record.round == 1
    strategy_on(tmp_path, 4).remove(grid, "p1", method="eq13", mode="online")
    assert grid.sent[-1] == ("train", [2])  # to p1's own node, not to the impostor
    other = tmp_path / "other"
    train(new_strategy(other), LinearGrid(hessians, xty), theta0, rounds=1)
    gone = ImpostorGrid(hessians, xty, connected_p1=False)
    strategy = strategy_on(other, 3)
    _, arrays = strategy.resume_from_ledger()
    with caplog.at_level(logging.INFO, logger="flwr"):
        train(strategy, gone, arrays.to_torch_state_dict()["w"], rounds=1)
    assert "client 'p1': its node 2 is gone; node 0 takes the id over." in caplog.text
    assert Ledger(other).nodes()["p1"] == 0
