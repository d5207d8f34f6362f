"""The message contract (fl_ugm.protocol): the reply builder and parser agree (float32 and the
scaled float16 wire), replies may cover a subset of the global, and one round's replies are
filtered by the majority key sets with a documented tie rule."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from helpers import PARAM_KEYS, global_state, message, ugm_reply

from fl_ugm.protocol import (
    CLIENT_ID_KEY,
    CLIENT_RECORD,
    SCALES_RECORD,
    InvalidReply,
    build_ugm_reply,
    parse_ugm_replies,
    parse_ugm_reply,
)

pytestmark = pytest.mark.usefixtures("server_identity")


def test_a_built_reply_parses_back_to_the_same_update():
    state = global_state()
    gen = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()
             if v.is_floating_point()}
    fisher = {k: torch.rand(state[k].shape, generator=gen).double() for k in PARAM_KEYS}
    content = build_ugm_reply(delta, fisher, MetricRecord({"num-examples": 12, "loss": 0.5}),
                              client_id="c-7")
    assert content.config_records[CLIENT_RECORD][CLIENT_ID_KEY] == "c-7"
    reply = parse_ugm_reply(content, state, node_id=3)
    update = reply.contribution
    assert (reply.node_id, update.client_id, update.num_examples) == (3, "c-7", 12.0)
    for key in delta:
        assert torch.equal(update.delta[key], delta[key])
    for key in fisher:  # the Fisher travels as float32
        assert update.fisher[key].dtype == torch.float32
        torch.testing.assert_close(update.fisher[key], fisher[key].float(), rtol=0, atol=0)
    # the parser honours the strategy's weighting key
    with pytest.raises(InvalidReply, match="'weight' is None, not a number"):
        parse_ugm_reply(content, state, node_id=3, weighted_by_key="weight")


def reply_covering(keys: list[str], node: int, n: float, state):
    """A valid reply from ``node`` with ``n`` examples whose Fisher covers ``keys``."""
    reply = ugm_reply(node, n, state, seed=node)
    fisher = reply.content.array_records["fisher"].to_torch_state_dict()
    return ugm_reply(node, n, state, seed=node,
                     fisher=ArrayRecord({k: fisher[k] for k in keys}),
                     client=ConfigRecord({CLIENT_ID_KEY: f"c{node}"}))


def test_the_majority_key_set_wins_and_ties_are_broken_by_examples_then_size():
    state = global_state()
    full, part = PARAM_KEYS, PARAM_KEYS[:2]

    def kept(replies):
        updates, dropped = parse_ugm_replies(replies, state)
        assert all("Fisher tensors (other keys)" in d.reason for d in dropped)
        forward = sorted(u.node_id for u in updates)
        backward, _ = parse_ugm_replies(list(reversed(replies)), state)
        assert sorted(u.node_id for u in backward) == forward  # arrival order never matters
        return forward

    # a majority: two full key sets against one partial (with more examples)
    assert kept([reply_covering(full, 1, 10, state), reply_covering(full, 2, 10, state),
                 reply_covering(part, 3, 500, state)]) == [1, 2]
    # a tie in count: the key set with more examples behind it wins
    assert kept([reply_covering(full, 1, 10, state), reply_covering(part, 2, 40, state),
                 reply_covering(full, 3, 10, state), reply_covering(part, 4, 40, state)]) == [2, 4]
    # a tie in count and examples: the larger key set wins
    assert kept([reply_covering(part, 1, 20, state), reply_covering(full, 2, 20, state)]) == [2]


def test_invalid_replies_are_reported_with_their_client_and_reason():
    state = global_state()
    good = reply_covering(PARAM_KEYS, 1, 10, state)
    bad = message(RecordDict({"arrays": ArrayRecord(state),
                              "metrics": MetricRecord({"num-examples": 3}),
                              CLIENT_RECORD: ConfigRecord({CLIENT_ID_KEY: "fedavg-client"})}),
                  src=9)
    updates, dropped = parse_ugm_replies([good, bad], state)
    assert [u.node_id for u in updates] == [1]
    (reply,) = dropped
    assert (reply.node_id, reply.client_id) == (9, "fedavg-client")
    assert "has no 'delta' ArrayRecord" in reply.reason


def test_float16_wire_halves_the_bytes_and_keeps_each_tensors_relative_precision():
    gen = torch.Generator().manual_seed(1)
    state = {"fc.weight": torch.randn(64, 48, generator=gen), "fc.bias": torch.zeros(64)}
    delta = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in state.items()}
    # a Fisher spanning 18 orders of magnitude in one tensor, with exact zeros
    fisher = {k: torch.exp(torch.empty(v.shape).uniform_(-28, 14, generator=gen))
              for k, v in state.items()}
    fisher["fc.weight"].view(-1)[:3] = 0.0
    metrics = MetricRecord({"num-examples": 12})
    wide = build_ugm_reply(delta, fisher, metrics, "c", wire_dtype="float32")
    narrow = build_ugm_reply(delta, fisher, metrics, "c", wire_dtype="float16")
    payload = {name: sum(len(a.data) for a in content.array_records[r].values())
               for name, content in (("wide", wide), ("narrow", narrow))
               for r in ("delta", "fisher")}
    assert payload["narrow"] < 0.6 * payload["wide"]
    update = parse_ugm_reply(narrow, state, node_id=1).contribution
    for values, sent in ((update.delta, delta), (update.fisher, fisher)):
        for key, x in sent.items():
            assert values[key].dtype == torch.float32
            top = float(x.abs().max())
            error = (values[key] - x).abs()
            # 11 significant bits down to 2^-29 of the tensor's max, then float16 subnormals
            assert bool((error <= x.abs() * 2.0**-11 + top * 2.0**-40).all()), key
    assert bool((update.fisher["fc.weight"].view(-1)[:3] == 0).all())


def test_a_float16_reply_needs_a_valid_scale_per_tensor():
    state = global_state()
    reply = reply_covering(PARAM_KEYS, 1, 10, state)
    delta = reply.content.array_records["delta"].to_torch_state_dict()
    fisher = reply.content.array_records["fisher"].to_torch_state_dict()
    content = build_ugm_reply(delta, fisher, MetricRecord({"num-examples": 10}), "c",
                              wire_dtype="float16")
    scales = content.config_records[SCALES_RECORD]
    del scales["fisher/fc.bias"]
    with pytest.raises(InvalidReply, match=r"fisher\['fc.bias'\] has no valid scale"):
        parse_ugm_reply(content, state, node_id=1)
    scales["fisher/fc.bias"] = -1.0
    with pytest.raises(InvalidReply, match="has no valid scale"):
        parse_ugm_reply(content, state, node_id=1)
    content = build_ugm_reply(delta, fisher, MetricRecord({"num-examples": 10}), "c",
                              wire_dtype="float16")
    content.array_records["delta"]["fc.bias"] = ArrayRecord(
        {"x": delta["fc.bias"].double()})["x"]
    with pytest.raises(InvalidReply, match="has dtype float64 in a float16 reply"):
        parse_ugm_reply(content, state, node_id=1)
    with pytest.raises(ValueError, match="wire dtype 'int8'"):
        build_ugm_reply(delta, fisher, MetricRecord({"num-examples": 10}), "c", "int8")


def test_a_reply_may_cover_a_subset_of_the_global_but_nothing_else():
    state = global_state()
    head = ["fc.weight", "fc.bias"]
    delta = {k: torch.ones_like(state[k]) for k in head}
    fisher = {k: torch.ones_like(state[k]) for k in head}
    metrics = MetricRecord({"num-examples": 4})
    update = parse_ugm_reply(build_ugm_reply(delta, fisher, metrics, "c"), state,
                             node_id=1).contribution
    assert set(update.delta) == set(update.fisher) == set(head)
    odd = build_ugm_reply({**delta, "adapter.A": torch.ones(2)}, fisher, metrics, "c")
    with pytest.raises(InvalidReply, match=r"unexpected: \['adapter.A'\]"):
        parse_ugm_reply(odd, state, node_id=1)
    outside = build_ugm_reply(delta, {**fisher, "bn.weight": torch.ones(4)}, metrics, "c")
    with pytest.raises(InvalidReply, match=r"not in the delta: \['bn.weight'\]"):
        parse_ugm_reply(outside, state, node_id=1)
    empty = build_ugm_reply({}, {}, metrics, "c")
    with pytest.raises(InvalidReply, match="non-empty subset"):
        parse_ugm_reply(empty, state, node_id=1)


def test_replies_with_the_same_fisher_but_other_delta_keys_are_told_apart():
    state = global_state()
    metrics = MetricRecord({"num-examples": 5})

    def reply(node, keys):
        delta = {k: torch.zeros_like(state[k]) for k in keys}
        fisher = {k: torch.ones_like(state[k]) for k in PARAM_KEYS}
        return message(build_ugm_reply(delta, fisher, metrics, f"c{node}"), src=node)

    with_buffers = [*PARAM_KEYS, "bn.running_mean", "bn.running_var"]
    updates, dropped = parse_ugm_replies(
        [reply(1, with_buffers), reply(2, PARAM_KEYS), reply(3, with_buffers)], state)
    assert [u.node_id for u in updates] == [1, 3]
    assert [d.node_id for d in dropped] == [2]
    assert "covers 4 delta and 4 Fisher tensors" in dropped[0].reason
