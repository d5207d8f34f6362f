"""The README's Python snippets work as written: the server's resume and removal, the
ClientApp (against FedUGM and Flower's FedAvg), and the core cycle of docs/api.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def snippet(name: str, page: str = "README.md") -> str:
    """The ```python block that follows ``<!-- README snippet: NAME -->`` (``<!-- snippet:
    NAME -->`` on a docs page)."""
    match = re.search(rf"<!-- (?:README )?snippet: {name} -->\s*```python\n(.*?)```",
                      (ROOT / page).read_text(), re.S)
    assert match, f"{page} has no snippet {name!r}"
    return match.group(1)


def test_the_core_snippet_merges_and_removes():
    namespace: dict = {}
    exec(compile(snippet("core", "docs/api.md"), "docs/api.md core snippet", "exec"),
         namespace)
    theta, merged, without_0 = namespace["theta"], namespace["merged"], namespace["without_0"]
    assert set(merged) == set(theta) == set(without_0)
    for key in theta:
        assert torch.isfinite(merged[key]).all() and torch.isfinite(without_0[key]).all()
    moved = sum(float((merged[k] - theta[k]).abs().max()) for k in theta)
    removed = sum(float((without_0[k] - merged[k]).abs().max()) for k in theta)
    assert moved > 1e-2 and removed > 1e-3


@pytest.mark.usefixtures("server_identity")
def test_the_server_snippet_resumes_a_killed_run_and_removes_a_client(tmp_path):
    """A run killed after 2 of 3 rounds; the snippet restarts it on the same ledger (one more
    round), then removes p1 by replay (a ledger round of its own)."""
    from flwr.app import ArrayRecord, MetricRecord
    from helpers import LinearGrid, linear_problem

    from fl_ugm import FedUGM
    from fl_ugm.ledger import Ledger

    hessians, xty, theta0 = linear_problem(seed=31)
    grid = LinearGrid(hessians, xty)
    killed = FedUGM(ledger=tmp_path, min_train_nodes=3, min_available_nodes=3)
    killed.start(grid=grid, initial_arrays=ArrayRecord({"w": theta0}), num_rounds=2)
    del killed  # ... the server was killed after round 2 (its lock goes with it)
    evaluated = []

    def central_eval(server_round, arrays):
        evaluated.append(server_round)
        return MetricRecord({"w0": float(arrays.to_torch_state_dict()["w"][0])})

    namespace = {"ledger_dir": str(tmp_path), "grid": grid, "initial_state": {"w": theta0},
                 "central_eval": central_eval}
    exec(compile(snippet("server"), "README server snippet", "exec"), namespace)
    ledger = Ledger(tmp_path)
    assert ledger.removed_clients() == {"p1": 4} and ledger.rounds() == [4]
    assert ledger.client_ids() == ["p0", "p2"]
    assert all(ledger.client(c).round == 3 for c in ("p0", "p2"))  # one round after resume
    assert namespace["report"]["method"] == "replay"
    assert evaluated == [0, 1, 3, 4]  # start (resumed global, round 1), before/after removal
    torch.testing.assert_close(namespace["arrays"].to_torch_state_dict()["w"],
                               ledger.global_state()[1]["w"], rtol=0, atol=0)


@pytest.mark.usefixtures("server_identity")
def test_the_own_loop_snippet_answers_fedugm_and_flowers_fedavg():
    """The snippet's train() with a frozen backbone and a DataLoader of dicts: to FedUGM a
    valid float16 UGM reply covering exactly the trainable parameters, under the client id of
    its simulation partition; to Flower's FedAvg the trained state dict."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from helpers import message
    from torch import nn
    from torch.utils.data import DataLoader

    from fl_ugm.engine import RunSettings
    from fl_ugm.protocol import parse_ugm_reply, ugm_train_config

    torch.manual_seed(0)
    images, labels = torch.randn(24, 1, 4, 4), torch.randint(0, 3, (24,))

    def build_model() -> nn.Module:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 3))
        model[0].requires_grad_(False)  # the "pretrained backbone"
        return model

    def my_loader(context):
        data = [{"img": x, "label": y} for x, y in zip(images, labels)]
        return DataLoader(data, batch_size=8)

    namespace: dict = {"build_model": build_model, "my_loader": my_loader}
    exec(compile(snippet("own-loop"), "README own-loop snippet", "exec"), namespace)
    glob = build_model().state_dict()
    config = ugm_train_config(ConfigRecord(), RunSettings())  # what FedUGM sends
    request = message(RecordDict({"arrays": ArrayRecord(glob), "config": config}))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 7}, state=RecordDict(),
                      run_config={})
    reply = namespace["train"](request, context)

    update = parse_ugm_reply(reply.content, glob, node_id=1).contribution
    assert sorted(update.delta) == sorted(update.fisher) == ["2.bias", "2.weight"]
    assert update.client_id == "7" and update.num_examples == 24
    assert all(a.dtype == "float16" for a in reply.content["delta"].values())
    assert float(update.delta["2.weight"].abs().max()) > 1e-4  # it trained

    fedavg = FedAvg(min_train_nodes=1, min_available_nodes=1)  # Flower's own, same app
    (to_fedavg,) = fedavg.configure_train(1, ArrayRecord(glob), ConfigRecord(), OneNode())
    to_fedavg = message(to_fedavg.content)
    reply = namespace["train"](to_fedavg, context)
    assert set(reply.content.array_records) == {"arrays"}
    trained = reply.content["arrays"].to_torch_state_dict()
    assert torch.equal(trained["0.weight"], glob["0.weight"])  # frozen
    assert not torch.equal(trained["2.weight"], glob["2.weight"])
    assert reply.content["metrics"]["num-examples"] == 24
    assert namespace["query"](request, context).content["client"]["client-id"] == "7"


class OneNode:
    def get_node_ids(self):
        return [1]
