"""The README's Python snippets work as written: the core cycle runs end to end, and the
ClientApp snippet compiles and uses the real fl_ugm helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(name: str) -> str:
    """The ```python block that follows ``<!-- README snippet: NAME -->``."""
    match = re.search(rf"<!-- README snippet: {name} -->\s*```python\n(.*?)```",
                      README.read_text(), re.S)
    assert match, f"README has no snippet {name!r}"
    return match.group(1)


def test_the_core_snippet_merges_and_removes():
    namespace: dict = {}
    exec(compile(snippet("core"), "README core snippet", "exec"), namespace)
    theta, merged, without_0 = namespace["theta"], namespace["merged"], namespace["without_0"]
    assert set(merged) == set(theta) == set(without_0)
    for key in theta:
        assert torch.isfinite(merged[key]).all() and torch.isfinite(without_0[key]).all()
    moved = sum(float((merged[k] - theta[k]).abs().max()) for k in theta)
    removed = sum(float((without_0[k] - merged[k]).abs().max()) for k in theta)
    assert moved > 1e-2 and removed > 1e-3


def test_the_client_app_snippet_defines_train_evaluate_and_query():
    from flwr.clientapp import ClientApp

    namespace: dict = {}
    exec(compile(snippet("client-app"), "README ClientApp snippet", "exec"), namespace)
    assert isinstance(namespace["app"], ClientApp)
    for handler in ("train", "evaluate", "query"):
        assert callable(namespace[handler])
    with pytest.raises(KeyError):  # node_config without a client-id: fails loudly
        namespace["client_id"](type("Context", (), {"node_config": {}})())


def test_the_own_loop_snippet_answers_a_fedugm_train_message():
    """The snippet's train() with a frozen backbone and a DataLoader of dicts: its reply is
    a valid float16 UGM reply that covers exactly the trainable parameters."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
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
    context = Context(run_id=1, node_id=1, node_config={"client-id": "7"}, state=RecordDict(),
                      run_config={})
    reply = namespace["train"](request, context)

    update = parse_ugm_reply(reply.content, glob, node_id=1).contribution
    assert sorted(update.delta) == sorted(update.fisher) == ["2.bias", "2.weight"]
    assert update.client_id == "7" and update.num_examples == 24
    assert all(a.dtype == "float16" for a in reply.content["delta"].values())
    assert float(update.delta["2.weight"].abs().max()) > 1e-4  # it trained
