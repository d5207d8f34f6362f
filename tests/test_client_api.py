"""The client side for any training loop: ``fl_ugm.client.ugm_reply`` (and its bad inputs), a
real Flower ``ClientApp`` with its own loop (custom loss, a DataLoader of dicts, a frozen
backbone, a low-rank adapter) trained by FedUGM through Flower messages, and trainable
subsets in the ledger and in replay removal (the linear oracle, DESIGN §1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAvg
from helpers import (
    LinearGrid,
    linear_problem,
    message,
    new_strategy,
    retrained,
    wire_tensors,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_ugm import FedUGM
from fl_ugm.client import ProximalTerm, client_id, load_global, ugm_reply
from fl_ugm.fisher import diagonal_fisher
from fl_ugm.ledger import Ledger
from fl_ugm.merge import ugm_merge
from fl_ugm.protocol import (
    CLIENT_RECORD,
    NUM_EXAMPLES_KEY,
    PRIOR_KEY,
    UGM_KEY,
    WIRE_DTYPE_KEY,
    parse_ugm_reply,
)
from fl_ugm.removal import remove_from_ledger

pytestmark = pytest.mark.usefixtures("server_identity")


class LowRankLinear(nn.Module):
    """A frozen Linear plus a trainable rank-r update B·A (LoRA): y = W x + b + (B A) x."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(0.1 * torch.randn(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


class AdaptedNet(nn.Module):
    """A frozen backbone (Linear + BatchNorm in eval mode + ReLU) and a LoRA-adapted head whose
    bias is trained too: trainable = {head.lora_a, head.lora_b, head.base.bias}."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = LowRankLinear(nn.Linear(8, 3))
        self.head.base.bias.requires_grad_(True)

    def train(self, mode: bool = True) -> AdaptedNet:
        super().train(mode)
        self.backbone.eval()  # frozen statistics too
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(features))


TRAINABLE = ["head.base.bias", "head.lora_a", "head.lora_b"]


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


def unpack(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["features"], batch["label"]


def client_data(node: int, n: int) -> DictDataset:
    gen = torch.Generator().manual_seed(100 + node)
    y = torch.randint(0, 3, (n,), generator=gen)
    y[: n // 2] = node % 3  # label skew
    x = torch.randn(n, 6, generator=gen) + y[:, None].float()
    return DictDataset(x, y)


def own_loop_client_app() -> ClientApp:
    """A user's ClientApp: their own loop (label-smoothed cross-entropy + FedUGM's proximal
    prior, Adam, a DataLoader of dicts), the Fisher over that loader, one ugm_reply call."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = int(context.node_config["partition-id"])
        data = client_data(node, n=40 + 20 * node)
        torch.manual_seed(node)
        model = AdaptedNet()
        load_global(msg, model)
        n = len(data)
        prox = ProximalTerm(msg, model, n)
        loader = DataLoader(data, batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(node))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        model.train()
        for _ in range(3):
            for batch in loader:
                x, y = unpack(batch)
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1) + prox(model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        fisher = diagonal_fisher(model, DataLoader(data, batch_size=32), unpack=unpack,
                                 generator=torch.Generator().manual_seed(node))
        return ugm_reply(msg, model, fisher=fisher, num_examples=n, client_id=client_id(context),
                         metrics={"train-loss": loss.item()})

    return app


class ClientAppGrid:
    """An in-process Grid whose nodes run a real ClientApp (its registered train function)."""

    def __init__(self, app: ClientApp, nodes: int) -> None:
        self.app, self.nodes = app, nodes
        self.replies: list[list[Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:  # fraction_evaluate = 0: an empty evaluate round
            return []
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            incoming = message(msg.content, src=0, dst=node, kind=msg.metadata.message_type)
            context = Context(run_id=1, node_id=node, node_config={"partition-id": node},
                              state=RecordDict(), run_config={})
            replies.append(self.app(incoming, context))
        self.replies.append(replies)
        return replies


def test_an_own_loop_client_app_with_a_frozen_backbone_and_an_adapter_trains_with_fedugm():
    torch.manual_seed(0)
    initial = AdaptedNet()
    with torch.no_grad():  # a "pretrained" backbone with non-trivial BatchNorm statistics
        initial.backbone[1].running_mean.uniform_(-0.5, 0.5)
        initial.backbone[1].running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    grid = ClientAppGrid(own_loop_client_app(), nodes=3)
    strategy = FedUGM(server_momentum=0.0, prior_precision=2.0, min_train_nodes=3,
                      min_available_nodes=3,
                      fraction_evaluate=0.0, fisher_clip=None, update_screen=None)
    globals_after: list[dict[str, torch.Tensor]] = [state]

    def record(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round > 0:
            globals_after.append(arrays.to_torch_state_dict())
        return MetricRecord({})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=2,
                            evaluate_fn=record)

    assert len(grid.replies) == 2 and all(len(r) == 3 for r in grid.replies)
    for round_index, replies in enumerate(grid.replies):
        base, merged = globals_after[round_index], globals_after[round_index + 1]
        for reply in replies:  # only the trainable entries travel, in float16
            assert sorted(reply.content["delta"]) == TRAINABLE == sorted(reply.content["fisher"])
            assert all(a.dtype == "float16" for a in reply.content["delta"].values())
        deltas = [wire_tensors(r, "delta") for r in replies]
        fishers = [wire_tensors(r, "fisher") for r in replies]
        sizes = [float(r.content["metrics"][NUM_EXAMPLES_KEY]) for r in replies]
        expected = ugm_merge({k: base[k] for k in TRAINABLE}, deltas, fishers,
                             alphas=[s / sum(sizes) for s in sizes], prior_precision=2.0)
        for key in TRAINABLE:  # the merged adapter is the UGM merge of what was sent
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
            assert not torch.equal(merged[key], base[key])
        for key in set(state) - set(TRAINABLE):  # frozen weights and buffers: bit-identical
            assert torch.equal(merged[key], state[key]), key
    assert sorted(result.train_metrics_clientapp) == [1, 2]


def test_the_same_own_loop_client_app_serves_flowers_fedavg():
    """A client app written for FedUGM, unchanged, under Flower's own FedAvg: it gets the
    standard reply (the trained state dict), and FedAvg's global is the example-weighted
    average of the trained models."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in AdaptedNet().state_dict().items()}
    grid = ClientAppGrid(own_loop_client_app(), nodes=3)
    strategy = FedAvg(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=1)

    (replies,) = grid.replies
    assert all(set(r.content.array_records) == {"arrays"} for r in replies)
    trained = [r.content["arrays"].to_torch_state_dict() for r in replies]
    sizes = [float(r.content["metrics"][NUM_EXAMPLES_KEY]) for r in replies]
    assert sorted(sizes) == [60.0, 80.0, 100.0]  # the nodes in sampling order
    merged = result.arrays.to_torch_state_dict()
    for key in TRAINABLE:
        expected = sum(t[key] * n for t, n in zip(trained, sizes)) / sum(sizes)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(merged[key], state[key])


def test_ugm_reply_sends_the_trainable_entries_in_the_asked_dtype():
    torch.manual_seed(1)
    model = AdaptedNet()
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    request = message(RecordDict({"arrays": ArrayRecord(glob),
                                  "config": ConfigRecord({UGM_KEY: True,
                                                          WIRE_DTYPE_KEY: "float32"})}))
    with torch.no_grad():
        model.head.lora_b.add_(0.5)
    fisher = {k: torch.full_like(p, 2.0) for k, p in model.named_parameters() if p.requires_grad}
    reply = ugm_reply(request, model, fisher=fisher, num_examples=12, client_id="c7",
                      metrics={"train-loss": 0.25})

    update = parse_ugm_reply(reply.content, glob, node_id=1).contribution
    assert sorted(update.delta) == TRAINABLE  # frozen backbone not sent, no float buffer
    torch.testing.assert_close(update.delta["head.lora_b"], torch.full((3, 2), 0.5))
    assert float(update.delta["head.lora_a"].abs().max()) == 0.0
    assert update.num_examples == 12 and update.client_id == "c7"
    assert reply.content["metrics"]["train-loss"] == 0.25
    assert reply.content[CLIENT_RECORD]["client-id"] == "c7"
    assert all(a.dtype == "float32" for a in reply.content["delta"].values())


def bad_inputs():
    """(description, mutate(model, global, fisher) -> kwargs override, message fragment)."""

    def extra_param(model, glob, fisher):
        model.extra = nn.Parameter(torch.zeros(2))
        fisher["extra"] = torch.ones(2)

    def reshaped(model, glob, fisher):
        glob["head.lora_a"] = torch.zeros(3, 8)

    def frozen_in_fisher(model, glob, fisher):
        fisher["backbone.0.weight"] = torch.ones(8, 6)

    def missing_fisher(model, glob, fisher):
        del fisher["head.lora_a"]

    def nan_model(model, glob, fisher):
        with torch.no_grad():
            model.head.lora_b[0, 0] = float("nan")

    def nan_fisher(model, glob, fisher):
        fisher["head.lora_b"][0, 0] = float("nan")

    def negative_fisher(model, glob, fisher):
        fisher["head.lora_b"][0, 0] = -1.0

    def fisher_shape(model, glob, fisher):
        fisher["head.lora_b"] = torch.ones(2, 3)

    return [
        ("key missing from the global", extra_param, "'extra' is not in the global"),
        ("shape mismatch", reshaped, "has shape (2, 8), the global (3, 8)"),
        ("frozen key in the Fisher", frozen_in_fisher, "are not trainable parameters"),
        ("trainable key without Fisher", missing_fisher, "no entry for the trainable"),
        ("NaN in the trained model", nan_model, "NaN/Inf; local training diverged"),
        ("NaN in the Fisher", nan_fisher, "NaN/Inf or negative"),
        ("negative Fisher", negative_fisher, "NaN/Inf or negative"),
        ("Fisher shape", fisher_shape, "fisher['head.lora_b'] has shape (2, 3)"),
    ]


@pytest.mark.parametrize(("case", "mutate", "fragment"), bad_inputs(),
                         ids=[c[0] for c in bad_inputs()])
def test_ugm_reply_says_what_is_wrong(case, mutate, fragment):
    torch.manual_seed(2)
    model = AdaptedNet()
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    fisher = {k: torch.ones_like(p) for k, p in model.named_parameters() if p.requires_grad}
    mutate(model, glob, fisher)
    request = message(RecordDict({"arrays": ArrayRecord(glob),
                                  "config": ConfigRecord({UGM_KEY: True})}))
    with pytest.raises(ValueError, match=r"ugm_reply") as error:
        ugm_reply(request, model, fisher=fisher, num_examples=10)
    assert fragment in str(error.value), case


@pytest.mark.parametrize("n", [0, -3, float("nan")])
def test_ugm_reply_needs_a_positive_example_count(n):
    model = AdaptedNet()
    request = message(RecordDict({"arrays": ArrayRecord(model.state_dict())}))
    fisher = {k: torch.ones_like(p) for k, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="num_examples"):
        ugm_reply(request, model, fisher=fisher, num_examples=n)


def test_ugm_reply_and_load_global_need_the_global_record():
    model = AdaptedNet()
    request = message(RecordDict({"config": ConfigRecord({})}))
    with pytest.raises(ValueError, match="no 'arrays' record"):
        load_global(request, model)
    with pytest.raises(ValueError, match="no 'arrays' record"):
        ugm_reply(request, model, fisher={}, num_examples=1)


class SubsetLinearGrid(LinearGrid):
    """The linear oracle's clients, with a global that also holds a frozen 'backbone' tensor
    the clients never send (their replies cover only 'w')."""

    def _answer(self, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            assert "backbone" in msg.content["arrays"]
        return super()._answer(msg)


def test_subset_replies_through_the_ledger_and_replay_removal(tmp_path):
    """Clients that send only 'w' of {'w', 'backbone'}: 'backbone' keeps the global's value
    bit for bit, the ledger records 'w' only, and replay removal equals retraining."""
    hessians, xty, theta0 = linear_problem(seed=8, clients=3)
    backbone = torch.randn(4, 3, dtype=torch.float64)
    grid = SubsetLinearGrid(hessians, xty)

    def strategy() -> FedUGM:
        return FedUGM(server_momentum=0.0, prior_precision=0.6, min_train_nodes=3,
                      min_available_nodes=3,
                      fisher_clip=None, update_screen=None, ledger=tmp_path)

    arrays = ArrayRecord({"w": theta0, "backbone": backbone})
    server = strategy()
    for server_round in (1, 2, 3):
        messages = server.configure_train(server_round, arrays, ConfigRecord(), grid)
        assert all(float(m.content["config"][PRIOR_KEY]) == 0.6 for m in messages)
        arrays, _ = server.aggregate_train(server_round, grid.send_and_receive(messages))
        assert torch.equal(arrays.to_torch_state_dict()["backbone"], backbone)

    ledger = Ledger(tmp_path)
    assert set(ledger.client("p0").applied) == {"w"}
    state, report = remove_from_ledger(ledger, "p1", recentring=1.0, shared_rank=0)
    theta = theta0  # the same three rounds without p1
    for _ in range(3):
        kept = [0, 2]
        deltas = [{"w": (0.6 * theta + xty[t]) / (0.6 + hessians[t]) - theta} for t in kept]
        theta = ugm_merge({"w": theta}, deltas, [{"w": hessians[t]} for t in kept],
                          alphas=[0.5, 0.5], prior_precision=0.6)["w"]
    torch.testing.assert_close(state["w"], theta, rtol=0, atol=1e-8)
    assert torch.equal(state["backbone"], backbone)
    assert report["method"] == "replay"


def test_subset_replies_and_the_one_round_removal_through_the_strategy(tmp_path):
    """Eq. 13 (offline, from the ledger) after one round of 'w'-only replies: exact, and the
    frozen 'backbone' is untouched in the new global and the ledger's checkpoint."""
    hessians, xty, theta0 = linear_problem(seed=9, clients=3)
    backbone = torch.randn(2, 2, dtype=torch.float64)
    grid = SubsetLinearGrid(hessians, xty)
    server = new_strategy(tmp_path)
    arrays = ArrayRecord({"w": theta0, "backbone": backbone})
    messages = server.configure_train(1, arrays, ConfigRecord(), grid)
    server.aggregate_train(1, grid.send_and_receive(messages))

    arrays, report = new_strategy(tmp_path).remove(grid, "p1", method="eq13", mode="offline",
                                                   repair_rounds=0)
    state = arrays.to_torch_state_dict()
    expected = retrained(hessians, xty, theta0, keep=[0, 2])
    torch.testing.assert_close(state["w"], expected, rtol=0, atol=1e-10)
    assert torch.equal(state["backbone"], backbone)
    assert torch.equal(Ledger(tmp_path).global_state()[1]["backbone"], backbone)
    assert report["method"] == "eq13"


def test_a_per_coordinate_proximal_precision_is_one_sgd_step_of_its_gradient():
    """train_classifier's prior: (1 / 2n) Σ P (w − anchor)² with P a float or a tensor per
    parameter (a parameter it does not name gets none); one full-batch SGD step checks it."""
    from fl_ugm.client import train_classifier

    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    start = nn.Linear(3, 2)
    anchor = {k: v.detach() + 0.5 for k, v in start.named_parameters()}
    precision = {"weight": torch.rand(2, 3) * 8}  # no entry for the bias

    def one_step(prox):
        model = nn.Linear(3, 2)
        model.load_state_dict(start.state_dict())
        train_classifier(model, x, y, epochs=1, batch_size=4, lr=0.1, seed=0,
                         prox_precision=prox, anchor=anchor)
        return dict(model.named_parameters())

    reference = nn.Linear(3, 2)
    reference.load_state_dict(start.state_dict())
    F.cross_entropy(reference(x), y).backward()
    stepped = one_step(precision)
    torch.testing.assert_close(
        stepped["weight"], start.weight - 0.1 * (reference.weight.grad + precision["weight"] / 4
                                                 * (start.weight - anchor["weight"])))
    torch.testing.assert_close(stepped["bias"], start.bias - 0.1 * reference.bias.grad)
    as_float, as_tensors = one_step(2.0), one_step({"weight": torch.full((2, 3), 2.0),
                                                    "bias": torch.full((2,), 2.0)})
    for key in ("weight", "bias"):
        torch.testing.assert_close(as_float[key], as_tensors[key])
