"""FedUGM in-process, without Ray: aggregate_train on hand-built replies, bad replies, and the
full strategy loop on a fake in-process grid with the real ClientApp logic."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx
from helpers import (
    FLOAT_BUFFERS,
    PARAM_KEYS,
    FakeGrid,
    Net,
    global_state,
    linear_replies,
    message,
    reference_from,
    ugm_reply,
)

from fl_ugm import FedUGM
from fl_ugm.merge import fisher_averaging, task_arithmetic, ugm_merge
from fl_ugm.protocol import proximal_precision

pytestmark = pytest.mark.usefixtures("server_identity")


def test_aggregate_train_is_ugm_merge_plus_buffer_average():
    state = global_state()
    strategy = FedUGM(prior_precision=0.5, min_train_nodes=2)
    strategy.current_arrays = state  # what configure_train remembers
    replies = [ugm_reply(10 + i, n, state, seed=i) for i, n in enumerate([30, 10, 60])]

    arrays, metrics = strategy.aggregate_train(1, replies)

    merged = arrays.to_torch_state_dict()
    contents = [r.content for r in replies]
    deltas = [c.array_records["delta"].to_torch_state_dict() for c in contents]
    fishers = [c.array_records["fisher"].to_torch_state_dict() for c in contents]
    expected = ugm_merge({k: state[k] for k in PARAM_KEYS},
                         [{k: d[k] for k in PARAM_KEYS} for d in deltas], fishers,
                         alphas=[0.3, 0.1, 0.6], prior_precision=0.5)
    for key in PARAM_KEYS:
        torch.testing.assert_close(merged[key], expected[key])
    for key in FLOAT_BUFFERS:  # num-examples average of the buffers
        average = state[key] + sum(w * d[key] for w, d in zip([0.3, 0.1, 0.6], deltas))
        torch.testing.assert_close(merged[key], average)
    assert merged["bn.num_batches_tracked"].item() == 7  # integer buffer kept from the global
    assert list(merged) == list(state)
    # metrics: FedAvg's weighted average by num-examples
    assert metrics["train-loss"] == pytest.approx(0.3 * 1 + 0.1 * 2 + 0.6 * 3)


def test_the_merge_does_not_depend_on_the_order_replies_arrive_in():
    """Nodes finish in any order; FedUGM merges in client-id order, so a run is reproducible
    from its seed (float32 sums in another order differ in the last bits, and over many
    rounds at a large lr such bits grow into points of accuracy)."""
    state = global_state()
    replies = [ugm_reply(50 - i, n, state, seed=i, client=ConfigRecord({"client-id": str(i)}))
               for i, n in enumerate([30, 10, 60, 45, 5])]
    merged = []
    for order in (replies, replies[::-1], [replies[k] for k in (2, 0, 4, 1, 3)]):
        strategy = FedUGM(prior_precision=0.5, min_train_nodes=2)
        strategy.current_arrays = state
        merged.append(strategy.aggregate_train(1, order)[0].to_torch_state_dict())
    assert any(not torch.equal(merged[0][k], state[k]) for k in PARAM_KEYS)
    for other in merged[1:]:
        assert all(torch.equal(other[k], merged[0][k]) for k in merged[0])


@pytest.mark.parametrize(("alpha", "scale", "expected"), [
    ("num-examples", 1.0, [0.25, 0.75]),
    ("uniform", 2.0, [1.0, 1.0]),
    ("ones", 0.5, [0.5, 0.5]),
])
def test_alpha_modes_and_scale(alpha, scale, expected):
    state = global_state()
    strategy = FedUGM(prior_precision=2.0, alpha=alpha, scale=scale, min_train_nodes=1)
    strategy.current_arrays = state
    replies = [ugm_reply(1, 10, state, seed=1), ugm_reply(2, 30, state, seed=2)]
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    reference = reference_from(replies, state, ugm_merge, alphas=expected, prior_precision=2.0)
    for key in PARAM_KEYS:
        torch.testing.assert_close(merged[key], reference[key])


def corrupted(name: str, state) -> Message:
    """A reply from node 99 that is bad in one way."""
    good = ugm_reply(99, 20, state, seed=99)
    records = good.content.array_records
    delta = records["delta"].to_torch_state_dict()
    fisher = records["fisher"].to_torch_state_dict()
    metrics = MetricRecord({"num-examples": 20})
    if name == "missing delta":
        return ugm_reply(99, 20, state, seed=99, delta=None)
    if name == "missing fisher":
        return ugm_reply(99, 20, state, seed=99, fisher=None)
    if name == "missing metrics":
        return ugm_reply(99, 20, state, seed=99, metrics=None)
    if name == "plain FedAvg reply":
        return message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), src=99)
    if name in ("zero examples", "negative examples", "nan examples", "list examples"):
        value = {"zero examples": 0, "negative examples": -5, "nan examples": math.nan,
                 "list examples": [20.0, 1.0]}[name]
        return ugm_reply(99, 20, state, seed=99,
                         metrics=MetricRecord({"num-examples": value}))
    if name == "NaN delta":
        delta["fc.weight"][0, 0] = math.nan
    elif name == "Inf fisher":
        fisher["fc.bias"][1] = math.inf
    elif name == "negative fisher":
        fisher["bn.weight"][0] = -1.0
    elif name == "NaN buffer delta":
        delta["bn.running_var"][0] = math.nan
    elif name == "wrong delta shape":
        delta["fc.weight"] = torch.zeros(4, 3)
    elif name == "wrong fisher shape":
        fisher["fc.bias"] = torch.zeros(4)
    elif name == "float64 delta":
        delta["fc.weight"] = delta["fc.weight"].double()
    elif name == "int fisher":
        fisher["fc.bias"] = torch.zeros(3, dtype=torch.int32)
    elif name == "missing delta key":
        del delta["fc.bias"]
    elif name == "extra delta key":
        delta["surprise"] = torch.zeros(2)
    elif name == "fisher covers other keys":
        del fisher["bn.bias"]
    else:
        raise AssertionError(name)
    return ugm_reply(99, 20, state, seed=99, delta=ArrayRecord(delta),
                     fisher=ArrayRecord(fisher))


BAD_REPLIES = [
    "missing delta", "missing fisher", "missing metrics", "plain FedAvg reply",
    "zero examples", "negative examples", "nan examples", "list examples", "NaN delta",
    "Inf fisher",
    "negative fisher", "NaN buffer delta", "wrong delta shape", "wrong fisher shape",
    "float64 delta", "int fisher", "missing delta key", "extra delta key",
    "fisher covers other keys",
]


@pytest.mark.parametrize("bad", BAD_REPLIES)
def test_bad_reply_is_dropped_and_the_rest_merged(bad, caplog, tmp_path):
    """The bad client is dropped with a logged reason, the global is the merge of the valid
    replies (finite), and the ledger records the valid clients only."""
    from fl_ugm.ledger import Ledger

    state = global_state()
    good = [ugm_reply(n, 20 * (n + 1), state, seed=n,
                      client=ConfigRecord({"client-id": f"good{n}"})) for n in (1, 2)]
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=2)
    strategy.current_arrays = state
    expected = strategy.aggregate_train(1, good)[0].to_torch_state_dict()

    bad_reply = corrupted(bad, state)
    bad_reply.content["client"] = ConfigRecord({"client-id": "bad"})
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=2, ledger=tmp_path)
    strategy.current_arrays = state
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, metrics = strategy.aggregate_train(2, [good[0], bad_reply, good[1]])

    merged = arrays.to_torch_state_dict()
    for key in state:
        assert torch.equal(merged[key], expected[key]), key
        assert torch.isfinite(merged[key].float()).all()
    assert "dropping node 99 in round 2" in caplog.text
    assert metrics["train-loss"] == pytest.approx(0.4 * 2 + 0.6 * 3)
    assert Ledger(tmp_path).client_ids() == ["good1", "good2"]


def test_error_reply_and_too_few_valid_replies_keep_the_global(caplog):
    state = global_state()
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=2)
    strategy.current_arrays = state
    crashed = Message(error=Error(code=1, reason="client crashed"),
                      reply_to=message(RecordDict(), src=0, dst=5))
    replies = [ugm_reply(1, 10, state, seed=1), crashed, corrupted("NaN delta", state)]
    with caplog.at_level("WARNING", logger="flwr"):
        assert strategy.aggregate_train(3, replies) == (None, None)
    assert "fewer than the 2 needed (min_train_nodes=2); keeping the global" in caplog.text
    # every client bad, and no replies at all
    assert strategy.aggregate_train(4, [corrupted("Inf fisher", state)]) == (None, None)
    assert strategy.aggregate_train(5, []) == (None, None)


@pytest.mark.parametrize(("min_train_nodes", "merged"), [(2, True), (3, False)])
def test_a_timeout_merges_the_replies_that_came_if_enough(min_train_nodes, merged):
    """Flower's start sends a round to three nodes with a 5 s timeout; node 3 needs 30 s, so
    its reply never arrives. The two replies are merged when min_train_nodes allows it, else
    the global is kept."""
    data, _ = separable_task()
    grid = FakeGrid(data, Net, latency={3: 30.0})
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=min_train_nodes,
                      min_available_nodes=3, fraction_evaluate=0.0)
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in Net().state_dict().items()}
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1,
                            timeout=5.0)
    assert grid.timeouts and set(grid.timeouts) == {5.0}  # train (and empty evaluate) round
    assert sorted(r.metadata.src_node_id for r in grid.delivered) == [1, 2]
    if not merged:  # no round produced a global: Flower's Result holds no arrays
        assert len(result.arrays) == 0 and result.train_metrics_clientapp == {}
        return
    sizes = [len(data[node][1]) for node in (1, 2)]
    reference = reference_from(grid.delivered, initial, ugm_merge,
                               alphas=[n / sum(sizes) for n in sizes], prior_precision=1.0)
    for key in PARAM_KEYS:
        torch.testing.assert_close(result.arrays.to_torch_state_dict()[key], reference[key])


def test_an_odd_fisher_key_set_cannot_outvote_the_majority(caplog):
    state = global_state()
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=2)
    strategy.current_arrays = state
    odd = corrupted("fisher covers other keys", state)
    agreeing = [ugm_reply(1, 10, state, seed=1), ugm_reply(2, 10, state, seed=2)]
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [odd, *agreeing])
    assert "dropping node 99 in round 1: it covers 6 delta and 3 Fisher tensors (other keys), " \
           "the other clients 6 and 4" \
        in caplog.text
    reference = reference_from(agreeing, state, ugm_merge, alphas=[0.5, 0.5],
                               prior_precision=1.0)
    for key in PARAM_KEYS:
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], reference[key])


def test_linear_regression_oracle_through_the_strategy():
    """Clients solve ½‖y − Xθ‖² + ½δ‖θ − θ0‖² exactly (XᵀX diagonal): the strategy's merge
    equals the exact joint MAP (DESIGN §1)."""
    gen = torch.Generator().manual_seed(3)
    dim, delta_prior, sizes = 6, 0.7, [20, 35, 50]
    theta0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    state = {"w": theta0.clone()}
    strategy = FedUGM(prior_precision=delta_prior, min_train_nodes=3)
    strategy.current_arrays = state
    replies, hessians, xty = linear_replies(gen, theta0, delta_prior, sizes)
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()["w"]
    alphas = [n / sum(sizes) for n in sizes]
    joint = (delta_prior * theta0 + sum(a * b for a, b in zip(alphas, xty))) / (
        delta_prior + sum(a * h for a, h in zip(alphas, hessians)))
    torch.testing.assert_close(merged, joint, rtol=0, atol=1e-10)


def test_the_carried_precision_keeps_every_round_an_exact_map_on_the_oracle():
    """carried_precision γ: round r's clients train under, and the merge uses, the prior
    P = δ + C_{r−1} per coordinate (C_r = γ (C_{r−1} + Σ α F)); on the linear oracle every
    round's global is then exactly argmin Σ α_t ℓ_t(θ) + ½‖θ − θ_{r−1}‖²_P, whose closed
    form this test computes round by round (clients sampled at random, sizes unequal)."""
    import random

    from helpers import LinearGrid, linear_problem, proximal_joint_map

    from fl_ugm.protocol import PRIOR_RECORD

    hessians, xty, theta0 = linear_problem(seed=41, clients=5)
    sizes, delta, gamma = [7, 12, 20, 31, 44], 0.6, 0.5
    grid = LinearGrid(hessians, xty, sizes=sizes)
    strategy = FedUGM(server_momentum=0.0, prior_precision=delta, carried_precision=gamma,
                      fraction_train=0.6,
                      min_train_nodes=2, min_available_nodes=5, fisher_clip=None,
                      update_screen=None)
    random.seed(2)
    arrays, theta, carried, sent = ArrayRecord({"w": theta0}), theta0, None, []
    for server_round in range(1, 5):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        prior = delta if carried is None else delta + carried
        sent.append(PRIOR_RECORD in messages[0].content.array_records)
        if carried is not None:
            torch.testing.assert_close(messages[0].content.array_records[PRIOR_RECORD]
                                       .to_torch_state_dict()["w"], prior, rtol=0, atol=1e-12)
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        kept, alphas, theta = proximal_joint_map(messages, theta, prior, sizes, hessians, xty)
        torch.testing.assert_close(arrays.to_torch_state_dict()["w"], theta, rtol=0,
                                   atol=1e-10)
        carried = gamma * ((0 if carried is None else carried)
                           + sum(a * hessians[t] for a, t in zip(alphas, kept)))
        torch.testing.assert_close(strategy.state.carried["w"], carried, rtol=0, atol=1e-12)
    assert sent == [False, True, True, True]  # round 1 uses δ alone
    with pytest.raises(ValueError, match=r"carried_precision=1\.0; γ must be in \[0, 1\)"):
        FedUGM(server_momentum=0.0, carried_precision=1.0)


def test_configure_train_asks_for_ugm_and_remembers_the_global():
    state = global_state()
    grid = FakeGrid({1: None, 2: None, 3: None}, Net)
    strategy = FedUGM(prior_precision=0.25, fisher="empirical", min_train_nodes=3,
                      min_available_nodes=3)
    messages = list(strategy.configure_train(4, ArrayRecord(state), ConfigRecord({"lr": 0.1}),
                                             grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    config = messages[0].content.config_records["config"]
    assert (config["ugm"], config["ugm-fisher"], config["ugm-prior"]) == (True, "empirical", 0.25)
    assert config["server-round"] == 4 and config["lr"] == 0.1
    assert proximal_precision(config, num_examples=123) == 0.25
    assert set(strategy.current_arrays) == set(state)


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"alpha='mean'; choose one of"):
        FedUGM(alpha="mean")
    with pytest.raises(ValueError, match=r"prior_precision=0\.0"):
        FedUGM(prior_precision=0.0)
    with pytest.raises(ValueError, match=r"fisher='hessian'"):
        FedUGM(fisher="hessian")
    with pytest.raises(ValueError, match="scale=-1"):
        FedUGM(scale=-1.0)
    with pytest.raises(RuntimeError, match="before configure_train"):
        FedUGM().aggregate_train(1, [])


def separable_task(num_nodes: int = 3, per_node: int = 60, seed: int = 0):
    """Four Gaussian blobs in 4-D, three classes, each node skewed to some classes."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.5 * torch.randn(3, 4, generator=gen)
    data = {}
    for node in range(1, num_nodes + 1):
        y = torch.randint(0, 3, (per_node,), generator=gen)
        y[: per_node // 2] = node % 3  # label skew
        x = centres[y] + torch.randn(per_node, 4, generator=gen)
        data[node] = (x, y)
    y_test = torch.randint(0, 3, (300,), generator=gen)
    test = (centres[y_test] + torch.randn(300, 4, generator=gen), y_test)
    return data, test


def accuracy(state: dict, test) -> float:
    net = Net()
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        return float((net(test[0]).argmax(1) == test[1]).float().mean())


@pytest.mark.parametrize("strategy_name", ["fedugm", "fedavg", "fedprox"])
def test_full_loop_in_process_with_flowers_own_start(strategy_name):
    data, test = separable_task()
    grid = FakeGrid(data, Net)
    kwargs = {"min_train_nodes": 3, "min_available_nodes": 3, "fraction_evaluate": 0.0}
    strategy = {
        "fedugm": lambda: FedUGM(prior_precision=1.0, server_momentum=0.0, **kwargs),
        "fedavg": lambda: FedAvg(**kwargs),
        "fedprox": lambda: FedProx(proximal_mu=0.01, **kwargs),
    }[strategy_name]()
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in Net().state_dict().items()}
    history = []

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        history.append(accuracy(arrays.to_torch_state_dict(), test))
        return MetricRecord({"accuracy": history[-1]})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=3,
                            evaluate_fn=central_eval)

    assert len(grid.rounds) == 3 and all(len(r) == 3 for r in grid.rounds)  # all nodes
    expected_records = (["delta", "fisher", "metrics", "ugm-scales"] if strategy_name == "fedugm"
                        else ["arrays", "metrics"])
    assert all(kinds == expected_records for r in grid.rounds for kinds in r)
    assert history[-1] > history[0] + 0.2, history
    assert history[-1] > 0.8, history
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]


def test_server_adam_on_the_merged_step_is_flowers_fedadam_when_the_merge_is_fedavg():
    """server_optimizer="adam" applies FedAdam's update to the merged step: with the merge
    reduced to FedAvg's (rule task-arithmetic, α = n/Σn, a negligible δ) three rounds on
    the in-process grid end where Flower's own FedAdam ends, parameter for parameter. The
    float buffers (BatchNorm's statistics) take the merged value, where Flower's FedAdam
    steps them too."""
    from flwr.serverapp.strategy import FedAdam

    data, _ = separable_task()
    kwargs = {"min_train_nodes": 3, "min_available_nodes": 3, "fraction_evaluate": 0.0}
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in Net().state_dict().items()}
    ends = []
    for strategy in (FedAdam(eta=0.05, **kwargs),
                     FedUGM(prior_precision=1e-12, merge="task-arithmetic",
                            server_optimizer="adam", server_lr=0.05, server_momentum=0.9,
                            wire_dtype="float32", **kwargs)):
        result = strategy.start(grid=FakeGrid(data, Net), initial_arrays=ArrayRecord(initial),
                                num_rounds=3)
        ends.append(result.arrays.to_torch_state_dict())
    for key in PARAM_KEYS:
        torch.testing.assert_close(ends[1][key], ends[0][key].float(), rtol=1e-4, atol=1e-5)
    for key in FLOAT_BUFFERS:
        assert not torch.allclose(ends[1][key], ends[0][key].float(), rtol=1e-4, atol=1e-5)
    for key in ("fc.weight", "bn.weight", "bn.running_mean"):  # (fc.bias precedes bn: fixed)
        assert (ends[1][key] - initial[key]).abs().max() > 0.05


def test_server_fisher_is_added_to_the_prior(caplog):
    state = global_state()
    server_fisher = {k: torch.full_like(state[k], 3.0) for k in PARAM_KEYS}
    strategy = FedUGM(prior_precision=0.5, server_fisher=server_fisher, min_train_nodes=2)
    strategy.current_arrays = state
    replies = [ugm_reply(1, 10, state, seed=1), ugm_reply(2, 30, state, seed=2)]
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    reference = reference_from(replies, state, ugm_merge, alphas=[0.25, 0.75],
                               prior_precision=3.5)
    for key in PARAM_KEYS:
        torch.testing.assert_close(merged[key], reference[key])
    partial = FedUGM(prior_precision=0.5, server_fisher={"fc.weight": server_fisher["fc.weight"]},
                     min_train_nodes=2)
    partial.current_arrays = state  # the clients train tensors the server Fisher lacks
    assert partial.aggregate_train(2, replies) == (None, None)
    assert "round 2 cannot merge (FedUGM: server_fisher has no entry for" in caplog.text
    assert "round 2 has" not in caplog.text  # the replies were enough; the merge was not
    assert torch.equal(partial.current_arrays["fc.bias"], state["fc.bias"])


@pytest.mark.parametrize("rule", ["fisher-averaging", "task-arithmetic"])
def test_baseline_merge_rules_see_the_same_replies(rule):
    state = global_state()
    strategy = FedUGM(prior_precision=0.5, merge=rule, alpha="ones", min_train_nodes=2)
    strategy.current_arrays = state
    replies = [ugm_reply(1, 10, state, seed=1), ugm_reply(2, 30, state, seed=2)]
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    merge = fisher_averaging if rule == "fisher-averaging" else task_arithmetic
    reference = reference_from(replies, state, merge, alphas=[1, 1])
    for key in PARAM_KEYS:
        torch.testing.assert_close(merged[key], reference[key])
    with pytest.raises(ValueError, match=r"merge='sum'"):
        FedUGM(merge="sum")


def test_ledger_through_the_strategy_gives_exact_removal_on_the_linear_oracle(tmp_path):
    """FedUGM with a ledger records the start global, every client's reply (under its
    client-id) and the merge; offline removal from that ledger equals exact retraining."""
    from fl_ugm.ledger import Ledger
    from fl_ugm.removal import remove_from_ledger

    gen = torch.Generator().manual_seed(11)
    dim, h0, sizes = 5, 0.6, [15, 25, 40]
    theta0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    strategy = FedUGM(server_momentum=0.0, prior_precision=h0, min_train_nodes=3,
                      min_available_nodes=3,
                      ledger=tmp_path / "ledger")
    grid = FakeGrid({1: None, 2: None, 3: None}, Net)
    strategy.configure_train(1, ArrayRecord({"w": theta0}), ConfigRecord(), grid)
    replies, hessians, xty = linear_replies(gen, theta0, h0, sizes, client_ids=True)
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()["w"]

    ledger = Ledger(tmp_path / "ledger")
    assert ledger.client_ids() == ["p0", "p1", "p2"] and ledger.rounds() == [0, 1]
    assert ledger.meta["prior_precision"] == h0
    alphas = [n / sum(sizes) for n in sizes]
    keep = [0, 2]
    retrained = (h0 * theta0 + sum(alphas[t] * xty[t] for t in keep)) / (
        h0 + sum(alphas[t] * hessians[t] for t in keep))
    everyone = (h0 * theta0 + sum(a * b for a, b in zip(alphas, xty))) / (
        h0 + sum(a * h for a, h in zip(alphas, hessians)))
    torch.testing.assert_close(merged, everyone, rtol=0, atol=1e-10)
    torch.testing.assert_close(ledger.global_state()[1]["w"], merged, rtol=0, atol=0)
    state, report = remove_from_ledger(ledger, "p1", method="eq13")
    torch.testing.assert_close(state["w"], retrained, rtol=0, atol=1e-10)
    assert report["alpha"] == pytest.approx(alphas[1])


def test_an_excluded_client_is_not_sampled_and_its_replies_are_dropped(caplog):
    state = global_state()
    strategy = FedUGM(prior_precision=1.0, min_train_nodes=1, min_available_nodes=3)
    grid = FakeGrid({1: None, 2: None, 3: None}, Net)
    strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    replies = [ugm_reply(node, 10, state, seed=node,
                         client=ConfigRecord({"client-id": f"p{node}"})) for node in (1, 2, 3)]
    strategy.aggregate_train(1, replies)
    strategy.roster.exclude("p2")
    sent = strategy.configure_train(2, ArrayRecord(state), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 3]
    with caplog.at_level("WARNING", logger="flwr"):
        strategy.aggregate_train(2, replies)
    assert "client 'p2' was removed or excluded from this run; its reply is ignored" in caplog.text


@pytest.mark.parametrize("rule", ["ugm", "fisher-averaging", "task-arithmetic"])
def test_ledger_applied_shares_add_up_to_the_merged_update(rule, tmp_path):
    from fl_ugm.ledger import Ledger

    state = global_state()
    strategy = FedUGM(prior_precision=0.5, merge=rule, min_train_nodes=3, ledger=tmp_path)
    strategy.current_arrays = state
    replies = [ugm_reply(n, 10 * n, state, seed=n, client=ConfigRecord({"client-id": f"p{n}"}))
               for n in (1, 2, 3)]
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    ledger = Ledger(tmp_path)
    first = {c: ledger.client(c).applied for c in ledger.client_ids()}
    for key in PARAM_KEYS:
        total = sum(first[c][key] for c in first)
        torch.testing.assert_close(total, merged[key] - state[key], rtol=1e-5, atol=1e-6)
    strategy.aggregate_train(2, replies)  # same global, same replies: the shares double
    for client, shares in first.items():
        again = Ledger(tmp_path).client(client).applied
        for key in PARAM_KEYS:
            torch.testing.assert_close(again[key], 2 * shares[key])


def test_subtract_applied_removes_a_clients_accumulated_updates(tmp_path):
    from fl_ugm.ledger import Ledger
    from fl_ugm.removal import subtract_applied

    state = global_state()
    strategy = FedUGM(prior_precision=0.5, min_train_nodes=2, ledger=tmp_path)
    strategy.current_arrays = state
    replies = [ugm_reply(n, 10, state, seed=n, client=ConfigRecord({"client-id": f"p{n}"}))
               for n in (1, 2)]
    merged = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    ledger = Ledger(tmp_path)
    without, report = subtract_applied(ledger, "p1")
    for key in PARAM_KEYS:
        torch.testing.assert_close(without[key], merged[key] - ledger.client("p1").applied[key])
        torch.testing.assert_close(without[key] - state[key], ledger.client("p2").applied[key],
                                   rtol=1e-5, atol=1e-6)
    assert report["mode"] == "subtract-applied"


def test_a_client_id_belongs_to_the_first_node_that_used_it(caplog):
    """Two nodes claiming a new client id in the same round are both dropped (either could
    be the impostor); once node 1 has used it, node 2's claims are dropped while node 1 is
    connected, and a second reply from node 1 in a round too."""
    state = global_state()
    strategy = FedUGM(server_momentum=0.0, prior_precision=1.0, min_train_nodes=1)
    strategy.current_arrays = state

    def claim(node, seed):
        return ugm_reply(node, 10, state, seed=seed, client=ConfigRecord({"client-id": "same"}))

    with caplog.at_level("WARNING", logger="flwr"):
        assert strategy.aggregate_train(1, [claim(1, 1), claim(2, 2)]) == (None, None)
    assert ("dropping node 2 in round 1 (client 'same'): nodes [1, 2] all replied as client "
            "'same' this round and none of them is bound to it") in caplog.text
    first = claim(1, 1)
    strategy.aggregate_train(2, [first])  # node 1 uses the id: bound to it
    strategy.current_arrays = state
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, _ = strategy.aggregate_train(3, [claim(2, 2), first, claim(1, 3)])
    assert ("dropping node 2 in round 3 (client 'same'): client id 'same' is bound to node 1, "
            "which replied too.") in caplog.text
    assert "dropping node 1 in round 3 (client 'same'): a second reply as client 'same'" \
        in caplog.text
    reference = reference_from([first], state, ugm_merge, alphas=[1.0], prior_precision=1.0)
    for key in PARAM_KEYS:
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], reference[key])
    strategy.current_arrays = state
    with caplog.at_level("WARNING", logger="flwr"):
        assert strategy.aggregate_train(4, [claim(2, 2)]) == (None, None)
    assert "client id 'same' is bound to node 1, which is connected; node 2's claim" \
        in caplog.text
