"""Helpers shared by the in-process tests: hand-built Flower messages and UGM replies, a
small BatchNorm net, and in-process grids whose nodes answer the strategy's real messages
(the real ClientApp logic, or exactly solved linear-regression clients, docs/design.md §1's
oracle). Fixtures live in conftest.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from torch import nn

from fl_ugm import FedUGM
from fl_ugm.client import handle_evaluate, handle_query, handle_train
from fl_ugm.client_duals import next_dual, reported_delta
from fl_ugm.merge import task_arithmetic
from fl_ugm.protocol import CLIENT_RECORD, DUAL_STEP_KEY, PRIOR_KEY, PRIOR_RECORD


class Net(nn.Module):
    """Parameters plus a BatchNorm: float buffers (running stats) and an int64 counter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


PARAM_KEYS = ["fc.weight", "fc.bias", "bn.weight", "bn.bias"]
FLOAT_BUFFERS = ["bn.running_mean", "bn.running_var"]


def message(
    content: RecordDict, *, src: int = 0, dst: int = 1, kind: str = MessageType.TRAIN
) -> Message:
    """A Message outside a Flower runtime needs explicit Metadata (DESIGN §5)."""
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=src, dst_node_id=dst,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=kind,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = Net()
    net.bn.running_mean.uniform_()
    net.bn.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in net.state_dict().items()}


def ugm_reply(node: int, n: float, state, seed: int, **overrides) -> Message:
    gen = torch.Generator().manual_seed(seed)
    delta = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()
             if v.is_floating_point()}
    # a Fisher is a sum over the client's examples: it grows with n (so the per-example
    # masses of these replies are alike and FedUGM's Fisher-inflation clip stays idle)
    fisher = {k: torch.rand(state[k].shape, generator=gen) * n / 2 for k in PARAM_KEYS}
    records = {
        "delta": ArrayRecord(delta),
        "fisher": ArrayRecord(fisher),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0 + seed}),
    }
    for key, value in overrides.items():
        if value is None:
            records.pop(key)
        else:
            records[key] = value
    return message(RecordDict(records), src=node)


class FakeGrid:
    """In-process stand-in for Flower's Grid: each node runs the real ClientApp handlers."""

    def __init__(self, datasets: dict[int, tuple[torch.Tensor, torch.Tensor]], build_model,
                 latency: dict[int, float] | None = None):
        self.datasets = datasets
        self.build_model = build_model
        self.latency = latency or {}  # seconds a node takes to answer (default 0)
        self.rounds: list[list[str]] = []  # per train round, the record names each node sent
        self.timeouts: list[float | None] = []  # the timeout of every send_and_receive
        self.delivered: list[Message] = []  # every reply returned, in order

    def get_node_ids(self) -> Iterable[int]:
        return list(self.datasets)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        """Like Flower's grid: the replies that arrive within ``timeout`` (a node's latency
        decides), the others never."""
        self.timeouts.append(timeout)
        replies, kinds = [], []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if timeout is not None and self.latency.get(node, 0.0) > timeout:
                continue
            incoming = message(msg.content, src=0, dst=node, kind=msg.metadata.message_type)
            x, y = self.datasets[node]
            model = self.build_model()
            if msg.metadata.message_type == MessageType.TRAIN:
                reply = handle_train(incoming, model, x, y, epochs=2, batch_size=16, lr=0.1,
                                     seed=node)
                kinds.append(sorted(reply.content.keys()))
            else:
                reply = handle_evaluate(incoming, model, x, y)
            replies.append(reply)
        if kinds:
            self.rounds.append(kinds)
        self.delivered.extend(replies)
        return replies


def wire_tensors(reply: Message, record: str) -> dict[str, torch.Tensor]:
    """A reply's delta or Fisher as float32 tensors: float16 values times their scale."""
    tensors = reply.content.array_records[record].to_torch_state_dict()
    scales = reply.content.config_records.get("ugm-scales")
    if scales is None:
        return tensors
    return {k: v.float() * scales[f"{record}/{k}"] for k, v in tensors.items()}


def reference_from(replies: list[Message], state, merge, **kwargs) -> dict[str, torch.Tensor]:
    """``merge`` (an fl_ugm.merge function) applied directly to the replies' parameters."""
    deltas = [wire_tensors(r, "delta") for r in replies]
    fishers = [wire_tensors(r, "fisher") for r in replies]
    params = {k: state[k] for k in PARAM_KEYS}
    deltas = [{k: d[k] for k in PARAM_KEYS} for d in deltas]
    if merge is task_arithmetic:
        return merge(params, deltas, **kwargs)
    return merge(params, deltas, fishers, **kwargs)


def linear_replies(gen, theta0, h0: float, sizes: list[int], *, client_ids: bool = False):
    """Clients that solve ½‖y − Xθ‖² + ½·h0‖θ − θ0‖² exactly, with XᵀX diagonal: their UGM
    replies (Fisher = the exact Hessian diag(XᵀX)), Hessians and Xᵀy."""
    replies, hessians, xty = [], [], []
    for t, n in enumerate(sizes):
        q, _ = torch.linalg.qr(torch.randn(n, len(theta0), generator=gen, dtype=torch.float64))
        x = q * (0.5 + 2 * torch.rand(len(theta0), generator=gen, dtype=torch.float64))
        y = torch.randn(n, generator=gen, dtype=torch.float64)
        h, b = (x * x).sum(0), x.T @ y
        hessians.append(h)
        xty.append(b)
        records = {
            "delta": ArrayRecord({"w": (h0 * theta0 + b) / (h0 + h) - theta0}),
            "fisher": ArrayRecord({"w": h}),
            "metrics": MetricRecord({"num-examples": n}),
        }
        if client_ids:
            records["client"] = ConfigRecord({"client-id": f"p{t}"})
        replies.append(message(RecordDict(records), src=t + 1))
    return replies, hessians, xty


H0 = 0.6


class LinearGrid:
    """Nodes 1..T hold ½‖y − Xθ‖² (XᵀX diagonal); a TRAIN message is answered with the exact
    minimiser of that loss plus ½‖θ − θ_global‖²_{H0}, with H0 the message's δ, its
    per-coordinate ``PRIOR_RECORD`` if it has one, or ``prior`` (a per-coordinate precision
    the clients are told out of band): Δ and F = diag(XᵀX). With the message's
    ``DUAL_STEP_KEY`` a node keeps a dual λ (``duals``) and minimises the loss − ⟨λ, θ⟩ + the
    prior instead, as ``fl_ugm.client_duals`` says. Node k is client p{k-1} and reports
    ``sizes[k-1]`` examples (default 10)."""

    def __init__(self, hessians, xty, *, failing: set[int] = frozenset(),
                 nan_nodes: set[int] = frozenset(), sizes=None, prior=None):
        self.hessians, self.xty, self.failing, self.nan_nodes = hessians, xty, failing, nan_nodes
        self.sizes = sizes or [10] * len(hessians)
        self.prior = prior
        self.sent: list[tuple[str, list[int]]] = []  # (message type, destination nodes)
        self.duals: dict[int, torch.Tensor] = {}  # node -> λ, with client duals
        self.trained: dict[int, torch.Tensor] = {}  # node -> θ_t of its last round

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, len(self.hessians) + 1))

    def participation(self) -> list[list[int]]:
        """The clients (node k = client k − 1) each TRAIN request went to, round by round."""
        return [[node - 1 for node in nodes] for kind, nodes in self.sent
                if kind == MessageType.TRAIN]

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
        theta = msg.content.array_records["arrays"].to_torch_state_dict()["w"]
        if msg.metadata.message_type == MessageType.EVALUATE:  # the client's loss at θ
            h, b = self.hessians[node - 1], self.xty[node - 1]
            loss = float((0.5 * h * theta**2 - b * theta).sum())
            return Message(RecordDict({"metrics": MetricRecord(
                {"num-examples": self.sizes[node - 1], "loss": loss})}), reply_to=incoming)
        config = msg.content.config_records["config"]
        h, b = self.hessians[node - 1], self.xty[node - 1]
        h0 = float(config[PRIOR_KEY]) if self.prior is None else self.prior
        if PRIOR_RECORD in msg.content.array_records:  # FedUGM's carried precision
            h0 = msg.content.array_records[PRIOR_RECORD].to_torch_state_dict()["w"]
        dual_step = float(config.get(DUAL_STEP_KEY, 0.0))
        dual = self.duals.get(node, torch.zeros_like(theta)) if dual_step else 0.0
        delta = (h0 * theta + b + dual) / (h0 + h) - theta
        self.trained[node] = theta + delta
        if dual_step:
            self.duals[node] = next_dual({"w": dual}, {"w": delta}, {"w": h0}, dual_step)["w"]
            delta = reported_delta({"w": delta}, {"w": h}, {"w": h0}, {"w": dual})["w"]
        if node in self.nan_nodes:
            delta = delta.clone()
            delta[0] = float("nan")
        return Message(RecordDict({
            "delta": ArrayRecord({"w": delta}), "fisher": ArrayRecord({"w": h}),
            "metrics": MetricRecord({"num-examples": self.sizes[node - 1]}),
            CLIENT_RECORD: ConfigRecord({"client-id": f"p{node - 1}"}),
        }), reply_to=incoming)  # fmt: skip


def linear_problem(seed: int, dim: int = 5, clients: int = 3, *, silent: dict | None = None,
                   shared: torch.Tensor | None = None):
    """Hessians (diag XᵀX) and Xᵀy per client; ``silent={client: coordinate}`` zeroes that
    coordinate for every OTHER client (only ``client``'s data informs it). Targets are
    random, or with ``shared`` = θ* noisy observations of one model, y = Xθ* + ε (clients
    that agree: Xᵀy = XᵀXθ* + Xᵀε)."""
    gen = torch.Generator().manual_seed(seed)
    hessians = [0.5 + 3 * torch.rand(dim, generator=gen, dtype=torch.float64)
                for _ in range(clients)]
    xty = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(clients)]
    if shared is not None:
        xty = [h * shared + 0.3 * noise for h, noise in zip(hessians, xty, strict=True)]
    for owner, coordinate in (silent or {}).items():
        for t in range(clients):
            if t != owner:
                hessians[t][coordinate] = xty[t][coordinate] = 0.0
    theta0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    return hessians, xty, theta0


def proximal_joint_map(messages: list[Message], theta, prior, sizes, hessians, xty):
    """(sampled clients, their α, the round's exact global): argmin Σ α_t ℓ_t(θ) +
    ½‖θ − θ_prev‖²_prior over the clients ``messages`` went to (node k = client k − 1)."""
    kept = [m.metadata.dst_node_id - 1 for m in messages]
    alphas = [sizes[t] / sum(sizes[u] for u in kept) for t in kept]
    theta = (prior * theta + sum(a * xty[t] for a, t in zip(alphas, kept))) / (
        prior + sum(a * hessians[t] for a, t in zip(alphas, kept)))
    return kept, alphas, theta


def train(strategy: FedUGM, grid, theta, rounds: int, first_round: int = 1):
    arrays = ArrayRecord({"w": theta})
    for server_round in range(first_round, first_round + rounds):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return arrays.to_torch_state_dict()["w"]


def train_sampled(strategy: FedUGM, grid: LinearGrid, theta, rounds: int, *, seed: int,
                  removed: int):
    """(final θ, the clients sampled each round) of ``rounds`` rounds with Flower's node
    sampling seeded by ``seed``; checks that client ``removed`` took part in some rounds
    but not all (the partial participation a replay must reproduce)."""
    import random

    random.seed(seed)  # Flower samples the nodes with random.sample
    trained = train(strategy, grid, theta, rounds=rounds)
    participation = grid.participation()
    assert 0 < sum(removed in sampled for sampled in participation) < rounds
    return trained, participation


def retrained(hessians, xty, theta0, keep):
    """The kept clients' exact joint MAP with the weights they had in the merge (α = n/Σn =
    1/3: every client reports num-examples = 10)."""
    alpha = 1.0 / len(hessians)
    return (H0 * theta0 + sum(alpha * xty[t] for t in keep)) / (
        H0 + sum(alpha * hessians[t] for t in keep))


#: The oracle's random targets make its clients disagree by construction (cosines to the
#: median Δ of −0.5 to −0.6), so FedUGM's update screen would drop one per round; the
#: tests of the ledger's and the removal's arithmetic turn it off (test_robust.py tests it).
NO_SCREEN = {"update_screen": None}


def new_strategy(ledger_dir, nodes: int = 3, **options) -> FedUGM:
    return FedUGM(server_momentum=0.0, prior_precision=H0, min_train_nodes=nodes,
                  min_available_nodes=nodes,
                  ledger=ledger_dir, **NO_SCREEN, **options)


