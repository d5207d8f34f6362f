"""Fixtures shared by the test modules (helper functions and fake grids: tests/helpers.py)."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def server_identity():
    """Outside a Flower runtime, Message() needs the process's run/node identity set.

    In-process strategy tests use it (``pytestmark = pytest.mark.usefixtures(...)``); the
    Ray and deployment tests must not, since Flower's runtimes set their own."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
