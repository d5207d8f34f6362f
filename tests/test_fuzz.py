"""A seeded mutational fuzz of the replies FedUGM receives: whatever a client sends (bytes,
dtypes, shapes, keys, numbers, ids, records), ``aggregate_train`` never raises and the
global stays finite; a reply it cannot use is dropped with a logged reason."""

from __future__ import annotations

import io
import logging
import math
import random
import warnings

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, MetricRecord
from helpers import global_state, message, ugm_reply

from fl_ugm import FedUGM
from fl_ugm.ledger import Ledger
from fl_ugm.protocol import build_ugm_reply
from fl_ugm.robust import UpdateScreen

pytestmark = pytest.mark.usefixtures("server_identity")

#: Rounds of the fuzz and mutated replies per round: 2,500 × 4 = 10,000 mutated replies.
ROUNDS, MUTATED_PER_ROUND = 2500, 4
NUMBERS = [0, -1, -1e-300, 1e-300, math.nan, math.inf, -math.inf, 1e308, 1.7e308, 2**62,
           3e38, [1.0, 2.0], 10]
IDS = ["client 1", "Zürich", "", "a" * 200, "../../x", ".", "c/1", "p1", "p2", 7, True]


def serialized(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def mutate_array(array: Array, rng: random.Random) -> Array:
    """One corruption of an Array: its bytes, its dtype or shape metadata, its values."""
    data, kind = bytes(array.data), rng.randrange(9)
    try:
        values = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # an Array an earlier mutation already broke
        values = np.zeros(3, dtype=np.float32)
    if kind == 0:  # truncated
        data = data[:rng.randrange(len(data))]
    elif kind == 1:  # garbage
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    elif kind == 2:  # a flipped byte anywhere, header included
        position = rng.randrange(len(data))
        data = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    elif kind == 3:  # big-endian bytes
        data = serialized(values.astype(values.dtype.newbyteorder(">")))
    elif kind == 4:  # another dtype, or a declared dtype that is not the bytes'
        dtype = rng.choice(["int64", "float64", "complex64", "bool", "float16", "bogus"])
        if rng.random() < 0.5 and dtype != "bogus":
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = serialized(values.astype(dtype))
        return Array(dtype=dtype, shape=tuple(array.shape), stype=array.stype, data=data)
    elif kind == 5:  # a declared shape that is not the bytes'
        shape = tuple(rng.choice([1, 2, 3, 0, 7]) for _ in range(rng.randrange(0, 3)))
        return Array(dtype=array.dtype, shape=shape, stype=array.stype, data=data)
    elif kind == 6 and values.size:  # extreme values
        filled = values.copy()
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            filled.reshape(-1)[rng.randrange(filled.size)] = rng.choice(
                [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45, 65504.0])
        data = serialized(filled)
    elif kind == 7:  # another serialization
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype="torch.raw", data=data)
    else:  # a fortran-ordered or reshaped array
        data = serialized(np.asfortranarray(values.reshape(values.shape[::-1]))
                          if values.ndim > 1 else values.reshape(1, -1))
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=data)


def mutate(content, rng: random.Random) -> None:
    """One to three corruptions of a reply's content, in place."""
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(8)
        records = [k for k in ("delta", "fisher") if k in content.array_records]
        if kind <= 2 and records:  # an Array
            record = content.array_records[rng.choice(records)]
            key = rng.choice(list(record.keys()))
            record[key] = mutate_array(record[key], rng)
        elif kind == 3 and records:  # keys: one missing, one unknown, one renamed
            record = content.array_records[rng.choice(records)]
            key = rng.choice(list(record.keys()))
            array = record.pop(key)
            if rng.random() < 0.5:
                record[rng.choice(["nope", key + ".x", "fc.weight"])] = array
        elif kind == 4:  # a record missing, or one too many
            name = rng.choice(["delta", "fisher", "metrics", "client", "ugm-scales"])
            if name in content and rng.random() < 0.7:
                del content[name]
            else:
                content["extra"] = MetricRecord({"num-examples": 1})
        elif kind == 5 and "metrics" in content:  # the claimed number of examples
            content["metrics"] = MetricRecord({"num-examples": rng.choice(NUMBERS)})
        elif kind == 6:  # the claimed id
            content["client"] = ConfigRecord({"client-id": rng.choice(IDS)})
        elif "ugm-scales" in content:  # a float16 reply's scales
            scales = content["ugm-scales"]
            key = rng.choice(list(scales.keys()))
            scales[key] = rng.choice([math.nan, 0.0, -1.0, math.inf, 1e308, 1e-308, "x", 3])


def honest_reply(node: int, state, rng: random.Random):
    reply = ugm_reply(node, rng.choice([10, 20, 40]), state, seed=rng.randrange(10**6),
                      client=ConfigRecord({"client-id": f"p{node}"}))
    if rng.random() < 0.5:  # the float16 wire format, with its scales
        content = reply.content
        tensors = {k: content[k].to_torch_state_dict() for k in ("delta", "fisher")}
        reply = message(build_ugm_reply(tensors["delta"], tensors["fisher"],
                                        content["metrics"], f"p{node}", "float16"), src=node)
    return reply


@pytest.mark.parametrize("screen", [UpdateScreen(min_cosine=0.0), None], ids=["screen", "off"])
def test_no_reply_can_stop_the_server_or_corrupt_the_global(screen, caplog):
    rng = random.Random(2026)
    state = global_state()
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=1, update_screen=screen)
    strategy.current_arrays = state
    mutated = merged = 0
    with caplog.at_level(logging.ERROR, logger="flwr"):
        for server_round in range(1, ROUNDS // 2 + 1):
            replies = [honest_reply(1, strategy.current_arrays, rng)]
            for node in range(2, 2 + MUTATED_PER_ROUND):
                reply = honest_reply(node, strategy.current_arrays, rng)
                mutate(reply.content, rng)
                replies.append(reply)
                mutated += 1
            arrays, _ = strategy.aggregate_train(server_round, replies)
            merged += arrays is not None
            for key, value in strategy.current_arrays.items():
                assert bool(torch.isfinite(value.float()).all()), (server_round, key)
    assert mutated == ROUNDS * MUTATED_PER_ROUND // 2 and merged > ROUNDS // 4


def test_fuzzed_replies_never_corrupt_the_ledger(tmp_path):
    """Fewer rounds, with a ledger: a reply the ledger could not store is dropped when it is
    parsed, and what the ledger holds reads back."""
    rng = random.Random(7)
    state = global_state()
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=1, ledger=tmp_path)
    strategy.current_arrays = state
    for server_round in range(1, 151):
        replies = [honest_reply(1, strategy.current_arrays, rng)]
        for node in range(2, 6):
            reply = honest_reply(node, strategy.current_arrays, rng)
            mutate(reply.content, rng)
            replies.append(reply)
        strategy.aggregate_train(server_round, replies)
    ledger = Ledger(tmp_path)
    for client in ledger.client_ids():
        record = ledger.client(client)
        assert all(bool(torch.isfinite(v).all()) for v in record.delta.values())
    for round_ in ledger.history():
        assert ledger.history_round(round_).participants
    assert all(bool(torch.isfinite(v.float()).all()) for v in ledger.global_state()[1].values())
