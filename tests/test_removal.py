"""Client removal through the strategy (FedUGM.remove): online and offline, repair rounds,
failures that change nothing, and the revert of coordinates no remaining client informs.

The clients are linear-regression problems solved exactly (DESIGN §1's oracle), answering
the strategy's real messages: TRAIN (fine-tune from the sent global under the prior δ) and
QUERY (their stable client id, ``fl_ugm.client.handle_query``).
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Error, MessageType
from test_strategy import message, server_identity  # noqa: F401  (autouse fixture)

from fl_ugm import FedUGM
from fl_ugm.client import CLIENT_RECORD, PRIOR_KEY, REMOVAL_KEY, handle_query
from fl_ugm.ledger import Ledger
from fl_ugm.removal import remove_from_ledger
from fl_ugm.strategy import RemovalError

H0 = 0.6


class LinearGrid:
    """Nodes 1..T hold ½‖y − Xθ‖² (XᵀX diagonal); a TRAIN message is answered with the exact
    minimiser of that loss plus (δ/2)‖θ − θ_global‖²: Δ and F = diag(XᵀX)."""

    def __init__(self, hessians, xty, *, failing: set[int] = frozenset(),
                 nan_nodes: set[int] = frozenset()):
        self.hessians, self.xty, self.failing, self.nan_nodes = hessians, xty, failing, nan_nodes
        self.sent: list[tuple[str, list[int]]] = []  # (message type, destination nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, len(self.hessians) + 1))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        self.sent.append((messages[0].metadata.message_type,
                          [m.metadata.dst_node_id for m in messages]))
        return [self._answer(m) for m in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        incoming = message(msg.content, src=0, dst=node, kind=msg.metadata.message_type)
        if msg.metadata.message_type == MessageType.QUERY:
            return handle_query(incoming, f"p{node - 1}")
        if node in self.failing:
            return Message(Error(code=0, reason="client crashed"), reply_to=incoming)
        config = msg.content.config_records["config"]
        theta = msg.content.array_records["arrays"].to_torch_state_dict()["w"]
        h, b = self.hessians[node - 1], self.xty[node - 1]
        delta = (float(config[PRIOR_KEY]) * theta + b) / (float(config[PRIOR_KEY]) + h) - theta
        if node in self.nan_nodes:
            delta = delta.clone()
            delta[0] = float("nan")
        return Message(RecordDict({
            "delta": ArrayRecord({"w": delta}), "fisher": ArrayRecord({"w": h}),
            "metrics": MetricRecord({"num-examples": 10}),
            CLIENT_RECORD: ConfigRecord({"client-id": f"p{node - 1}"}),
        }), reply_to=incoming)  # fmt: skip


def linear_problem(seed: int, dim: int = 5, clients: int = 3, *, silent: dict | None = None):
    """Hessians (diag XᵀX) and Xᵀy per client; ``silent={client: coordinate}`` zeroes that
    coordinate for every OTHER client (only ``client``'s data informs it)."""
    gen = torch.Generator().manual_seed(seed)
    hessians = [0.5 + 3 * torch.rand(dim, generator=gen, dtype=torch.float64)
                for _ in range(clients)]
    xty = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(clients)]
    for owner, coordinate in (silent or {}).items():
        for t in range(clients):
            if t != owner:
                hessians[t][coordinate] = xty[t][coordinate] = 0.0
    theta0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    return hessians, xty, theta0


def train(strategy: FedUGM, grid, theta, rounds: int, first_round: int = 1):
    arrays = ArrayRecord({"w": theta})
    for server_round in range(first_round, first_round + rounds):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return arrays.to_torch_state_dict()["w"]


def retrained(hessians, xty, theta0, keep):
    """The kept clients' exact joint MAP with the weights they had in the merge (α = n/Σn =
    1/3: every client reports num-examples = 10)."""
    alpha = 1.0 / len(hessians)
    return (H0 * theta0 + sum(alpha * xty[t] for t in keep)) / (
        H0 + sum(alpha * hessians[t] for t in keep))


def new_strategy(ledger_dir, nodes: int = 3) -> FedUGM:
    return FedUGM(prior_precision=H0, min_train_nodes=nodes, min_available_nodes=nodes,
                  ledger=ledger_dir)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_removal_through_the_strategy_is_exact_on_the_linear_oracle(mode, tmp_path):
    """Train one round, then remove p1 from a NEW strategy on the same ledger (a removal run
    after a server restart; online mode finds p1's node with a QUERY)."""
    hessians, xty, theta0 = linear_problem(seed=5)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=1)

    strategy = new_strategy(tmp_path)
    arrays, report = strategy.remove(grid, "p1", mode=mode)
    expected = retrained(hessians, xty, theta0, keep=[0, 2])
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], expected, rtol=0, atol=1e-10)
    assert report["mode"] == mode and report["removal_round"] == 2
    sent_types = [kind for kind, _ in grid.sent[1:]]
    if mode == "online":  # QUERY to all three nodes, then one removal request to p1's node
        assert sent_types == [MessageType.QUERY, MessageType.TRAIN]
        assert grid.sent[-1][1] == [2]
    else:
        assert sent_types == []
    ledger = Ledger(tmp_path)
    assert ledger.client_ids() == ["p0", "p2"]
    round_, state = ledger.global_state()
    assert round_ == 2 and torch.equal(state["w"], arrays.to_torch_state_dict()["w"])


def test_the_online_request_is_a_train_message_marked_as_removal(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=6)
    grid = LinearGrid(hessians, xty)
    strategy = new_strategy(tmp_path)
    train(strategy, grid, theta0, rounds=1)
    captured = []
    original = grid._answer
    grid._answer = lambda msg: captured.append(msg) or original(msg)
    strategy.remove(grid, "p0", mode="online")
    (request,) = captured
    config = request.content.config_records["config"]
    assert config[REMOVAL_KEY] is True and config[PRIOR_KEY] == H0
    sent_global = request.content.array_records["arrays"].to_torch_state_dict()["w"]
    torch.testing.assert_close(sent_global, Ledger(tmp_path).global_state(1)[1]["w"])


def test_repair_rounds_exclude_the_removed_client_and_report_metrics(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=7)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=2)
    strategy = new_strategy(tmp_path)
    evaluated = []

    def evaluate(server_round, arrays):
        evaluated.append(server_round)
        return MetricRecord({"w0": float(arrays.to_torch_state_dict()["w"][0])})

    arrays, report = strategy.remove(grid, "p1", mode="offline", repair_rounds=2,
                                     evaluate_fn=evaluate)
    # discovery, then two repair rounds sent only to p0's and p2's nodes
    assert grid.sent[-3][0] == MessageType.QUERY
    assert [sorted(nodes) for _, nodes in grid.sent[-2:]] == [[1, 3], [1, 3]]
    assert evaluated == [2, 5] and report["final_round"] == 5
    final = arrays.to_torch_state_dict()["w"]
    assert report["metrics_after"]["w0"] == pytest.approx(float(final[0]))
    # the repair rounds merge only the remaining clients: their fixed point is theirs alone
    removed = Ledger(tmp_path).global_state(3)[1]["w"]
    keep = [0, 2]
    one_round = (H0 * removed + sum(xty[t] / 2 for t in keep)) / (
        H0 + sum(hessians[t] / 2 for t in keep))
    again = (H0 * one_round + sum(xty[t] / 2 for t in keep)) / (
        H0 + sum(hessians[t] / 2 for t in keep))
    torch.testing.assert_close(final, again, rtol=0, atol=1e-10)
    assert Ledger(tmp_path).rounds()[-1] == 5


def test_a_failed_online_removal_changes_nothing(tmp_path):
    hessians, xty, theta0 = linear_problem(seed=8)
    train(new_strategy(tmp_path), LinearGrid(hessians, xty), theta0, rounds=1)
    before = Ledger(tmp_path)
    index = (tmp_path / "index.json").read_text()
    strategy = new_strategy(tmp_path)
    with pytest.raises(RemovalError, match=r"client crashed.*Nothing was changed"):
        strategy.remove(LinearGrid(hessians, xty, failing={2}), "p1", mode="online")
    with pytest.raises(RemovalError, match=r"removing client 'p1' failed: .*Nothing was"):
        strategy.remove(LinearGrid(hessians, xty, nan_nodes={2}), "p1", mode="online")
    with pytest.raises(RemovalError, match="no connected node identifies as client 'p9'"):
        strategy.remove(LinearGrid(hessians, xty), "p9", mode="online")
    with pytest.raises(RemovalError, match="mode 'later'"):
        strategy.remove(LinearGrid(hessians, xty), "p1", mode="later")
    assert (tmp_path / "index.json").read_text() == index
    assert Ledger(tmp_path).client_ids() == before.client_ids() == ["p0", "p1", "p2"]
    assert strategy.excluded_clients == set()
    with pytest.raises(RemovalError, match="needs the strategy's ledger"):
        FedUGM().remove(LinearGrid(hessians, xty), "p1")


def test_uninformed_coordinates_revert_to_before_the_client_over_many_rounds(tmp_path):
    """Coordinate 0 is informed by p1's data only. After several rounds Eq. 13 alone leaves
    most of p1's effect there (its last Δ is ≈ 0 once the global fits it); the revert takes
    the coordinate back to θ0, which is where retraining without p1 leaves it."""
    hessians, xty, theta0 = linear_problem(seed=9, silent={1: 0})
    grid = LinearGrid(hessians, xty)
    trained = train(new_strategy(tmp_path), grid, theta0, rounds=6)
    ledger = Ledger(tmp_path, keep_globals=3)
    without_p1 = train(new_strategy(tmp_path / "retrain", nodes=2), LinearGrid(
        [hessians[0], hessians[2]], [xty[0], xty[2]]), theta0, rounds=6)
    assert float(without_p1[0]) == float(theta0[0])  # nobody else moves it

    state, report = remove_from_ledger(ledger, "p1")
    eq13_only, _ = remove_from_ledger(ledger, "p1", revert_uninformed=False)
    assert float(state["w"][0]) == pytest.approx(float(theta0[0]), abs=1e-12)
    assert report["reverted_fraction"] == pytest.approx(1 / 5)
    stuck = abs(float(eq13_only["w"][0] - theta0[0]))
    assert stuck > 0.5 * abs(float(trained[0] - theta0[0])) > 0
    torch.testing.assert_close(state["w"][1:], eq13_only["w"][1:])  # informed: Eq. 13 only
