"""The Fisher-inflation defence (FedUGM's ``fisher_clip``, ``robust.clip_fisher_inflation``)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from helpers import PARAM_KEYS, global_state, message, ugm_reply

from fl_ugm import FedUGM
from fl_ugm.robust import clip_fisher_inflation
from fl_ugm.strategy import FISHER_CLIPPED_METRIC

pytestmark = pytest.mark.usefixtures("server_identity")


def params_l2(a, b) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in PARAM_KEYS))


def attacked(reply, scale: float, *, flip: bool):
    """The same reply with its Fisher × scale (and −Δ if ``flip``)."""
    records = reply.content.array_records
    fisher = records["fisher"].to_torch_state_dict()
    delta = records["delta"].to_torch_state_dict()
    return message(RecordDict({
        "delta": ArrayRecord({k: -v if flip else v for k, v in delta.items()}),
        "fisher": ArrayRecord({k: v * scale for k, v in fisher.items()}),
        "metrics": MetricRecord({"num-examples": 40}),
        "client": ConfigRecord({"client-id": "attacker"}),
    }), src=reply.metadata.src_node_id)  # fmt: skip


def fedavg_of(replies, state):
    """Flower's own FedAvg on the same updates (its replies carry θ + Δ)."""
    messages = []
    for reply in replies:
        delta = reply.content.array_records["delta"].to_torch_state_dict()
        n = reply.content.metric_records["metrics"]["num-examples"]
        arrays = {k: state[k] + delta[k] if k in delta else state[k] for k in state}
        messages.append(message(RecordDict({
            "arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": n})}),
            src=reply.metadata.src_node_id))  # fmt: skip
    return FedAvg().aggregate_train(1, messages)[0].to_torch_state_dict()


def ugm_of(replies, state, **kwargs):
    """FedUGM's merge of ``replies`` with the Fisher clip alone (the update screen is
    test_robust.py's)."""
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=1, **{"update_screen": None, **kwargs})
    strategy.current_arrays = state
    return strategy.aggregate_train(1, replies)[0].to_torch_state_dict()


@pytest.mark.parametrize("flip", [False, True], ids=["inflated", "flipped+inflated"])
def test_one_inflated_client_moves_the_merge_at_most_3x_what_fedavg_lets_it(flip, caplog):
    """10 clients of 40 examples; one reports its Fisher × 1e6. The merge moves, relative to
    merging the other nine, by ≤ 3× what Flower's FedAvg lets that client move it; without
    the defence it takes the merge over."""
    state = global_state()
    honest = [ugm_reply(node, 40, state, seed=node) for node in range(1, 11)]
    hostile = attacked(honest[0], 1e6, flip=flip)
    others = honest[1:]
    fedavg_move = params_l2(fedavg_of([hostile, *others], state), fedavg_of(others, state))
    without = ugm_of(others, state)

    with caplog.at_level("WARNING", logger="flwr"):
        defended = params_l2(ugm_of([hostile, *others], state), without)
    undefended = params_l2(ugm_of([hostile, *others], state, fisher_clip=None), without)
    assert defended <= 3 * fedavg_move
    assert undefended > 5 * fedavg_move  # the attack is real
    assert "node 1 (client 'attacker') in round 1 reports a Fisher on" in caplog.text


def test_no_outlier_no_change():
    """Clients whose per-example Fisher masses are within the clip: bit-identical merge."""
    state = global_state()
    replies = [ugm_reply(node, n, state, seed=node) for node, n in ((1, 30), (2, 10), (3, 60))]
    defended = ugm_of(replies, state)
    plain = ugm_of(replies, state, fisher_clip=None)
    for key in state:
        assert torch.equal(defended[key], plain[key])


def test_clip_fisher_inflation_scales_outliers_to_exactly_the_bound():
    gen = torch.Generator().manual_seed(0)
    fishers = [{"w": torch.rand(5, generator=gen) * n, "b": torch.rand(2, generator=gen) * n}
               for n in (10, 20, 30, 40)]
    fishers[2] = {"w": fishers[2]["w"] * 1000, "b": fishers[2]["b"]}  # only "w" inflated
    sizes = [10, 20, 30, 40]
    out, clipped = clip_fisher_inflation(fishers, sizes, factor=3.0)
    assert [(i, k) for i, k, _ in clipped] == [(2, "w")]
    masses = [float(f["w"].sum()) / n for f, n in zip(out, sizes, strict=True)]
    lower_median = sorted(masses[:2] + masses[3:])[1]  # the 4 masses' lower median
    assert masses[2] == pytest.approx(3.0 * lower_median)
    assert torch.equal(out[2]["b"], fishers[2]["b"]) and out[0] is not fishers[0]
    assert torch.allclose(out[2]["w"] / fishers[2]["w"], out[2]["w"][0] / fishers[2]["w"][0])
    # a NaN mass neither counts for the median nor stops the others being clipped
    fishers[1] = {"w": torch.full((5,), math.nan), "b": fishers[1]["b"]}
    _, clipped = clip_fisher_inflation(fishers, sizes, factor=3.0)
    assert [(i, k) for i, k, _ in clipped] == [(2, "w")]
    with pytest.raises(ValueError, match=r"factor=0\.5"):
        clip_fisher_inflation(fishers, sizes, factor=0.5)
    with pytest.raises(ValueError, match=r"fisher_clip=0\.5"):
        FedUGM(fisher_clip=0.5)


@pytest.mark.parametrize("kind", ["inflate", "flip-inflate", "flip", "scale"])
def test_the_benchmark_attacks_do_what_they_say(kind):
    from simulations.adversaries import attack

    state = global_state()
    request = message(RecordDict({"arrays": ArrayRecord(state)}))  # the train message
    honest = ugm_reply(1, 40, state, seed=1)
    reply = ugm_reply(1, 40, state, seed=1)
    attack(reply, request, kind, 1e6)
    before, after = honest.content.array_records, reply.content.array_records
    fisher_scale = 1e6 if kind in ("inflate", "flip-inflate") else 1.0
    delta_sign = {"inflate": 1.0, "scale": 1e6}.get(kind, -1.0)
    for key in PARAM_KEYS:
        torch.testing.assert_close(after["fisher"][key].numpy(),
                                   fisher_scale * before["fisher"][key].numpy())
        torch.testing.assert_close(after["delta"][key].numpy(),
                                   delta_sign * before["delta"][key].numpy())
    # a FedAvg reply (θ_t) has no Fisher: flipping sends 2θ − θ_t, inflating changes nothing
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    plain = message(RecordDict({"arrays": ArrayRecord(trained)}))
    attack(plain, request, kind, 1e6)
    sent = plain.content.array_records["arrays"].to_torch_state_dict()
    for key in PARAM_KEYS:
        expected = {"inflate": trained[key], "scale": state[key] + 1e6}.get(kind, state[key] - 1)
        torch.testing.assert_close(sent[key], expected)
    with pytest.raises(ValueError, match="unknown attack"):
        attack(plain, request, "bribe", 1.0)


def test_attacks_on_float16_replies_and_the_norm_matched_backdoor():
    """A float16 reply is decoded before the attack and re-encoded after it (an inflated
    Fisher stays finite); norm-match gives Δ the honest reply's norm and keeps its direction."""
    from fl_ugm.protocol import build_ugm_reply, parse_ugm_reply
    from simulations.adversaries import attack, update_of

    state = global_state()
    request = message(RecordDict({"arrays": ArrayRecord(state)}))  # the train message
    honest = ugm_reply(1, 40, state, seed=1)
    delta, fisher = update_of(honest, request)
    half = message(build_ugm_reply(delta, fisher, MetricRecord({"num-examples": 40}), "c1",
                                   "float16"), src=1)
    attack(half, request, "inflate", 1e6)
    update = parse_ugm_reply(half.content, state, node_id=1).contribution
    for key in PARAM_KEYS:
        torch.testing.assert_close(update.fisher[key], 1e6 * fisher[key], rtol=1e-3, atol=0)
    assert update.client_id == "c1"

    backdoored = ugm_reply(1, 40, state, seed=2)
    poisoned_delta, _ = update_of(backdoored, request)
    attack(backdoored, request, "norm-match", 1.0, honest=honest)
    matched, _ = update_of(backdoored, request)
    def norm(tensors):
        return sum(float(v.square().sum()) for v in tensors.values()) ** 0.5

    assert norm(matched) == pytest.approx(norm(delta), rel=1e-6)
    assert norm(poisoned_delta) != pytest.approx(norm(delta), rel=1e-2)
    for key in delta:
        torch.testing.assert_close(matched[key] * norm(poisoned_delta) / norm(delta),
                                   poisoned_delta[key])


def test_honest_clips_are_info_and_large_ones_warnings(caplog):
    """A client 4–8× the median (honest variation reaches that) is clipped with an INFO
    line; one 1e6× the median with a WARNING."""
    state = global_state()
    replies = [ugm_reply(node, 40, state, seed=node) for node in range(1, 6)]
    mild = attacked(replies[0], 4.0 * 2, flip=False)  # ≈ 4–8× the others' masses
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=1)
    strategy.current_arrays = state
    with caplog.at_level("INFO", logger="flwr"):
        _, metrics = strategy.aggregate_train(1, [mild, *replies[1:]])
    clips = [r for r in caplog.records if "reports a Fisher on" in r.getMessage()]
    assert clips and {r.levelname for r in clips} == {"INFO"}
    assert metrics[FISHER_CLIPPED_METRIC] == len(clips)  # the round's train metrics count them
    unclipped = FedUGM(prior_precision=1.0, min_train_nodes=1, fisher_clip=None)
    unclipped.current_arrays = state
    assert FISHER_CLIPPED_METRIC not in unclipped.aggregate_train(1, [mild, *replies[1:]])[1]
    caplog.clear()
    with caplog.at_level("INFO", logger="flwr"):
        ugm_of([attacked(replies[0], 1e6, flip=False), *replies[1:]], state)
    clips = [r for r in caplog.records if "reports a Fisher on" in r.getMessage()]
    assert clips and {r.levelname for r in clips} == {"WARNING"}
