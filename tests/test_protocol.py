"""The message contract (fl_ugm.protocol): the reply builder and parser agree, and one round's
replies are filtered by the majority Fisher key set with a documented tie rule."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from helpers import PARAM_KEYS, global_state, message, ugm_reply

from fl_ugm.protocol import (
    CLIENT_ID_KEY,
    CLIENT_RECORD,
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
    update = parse_ugm_reply(content, state, node_id=3)
    assert (update.node_id, update.client_id, update.num_examples) == (3, "c-7", 12.0)
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
        assert all("its Fisher covers" in d.reason for d in dropped)
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
