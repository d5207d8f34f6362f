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
