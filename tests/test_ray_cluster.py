"""The simulations on an existing Ray cluster: a head and a worker node started with
``ray start`` on loopback, and ``python -m simulations.compare ray-address=HOST:PORT``.

The head offers no CPU, so every simulated client runs on the worker node; the run must give
the same accuracies as on a local Ray (the simulations are reproducible from their seeds).
Slow (about 1.5 min): ``python -m pytest -m slow tests/test_ray_cluster.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"  # this env's
RUN = ["strategies=[fedavg,fedugm]", "seeds=[0]", "num-server-rounds=2", "num-clients=3",
       "task=digits", "test-examples=400"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray(*args: str, log: Path, env: dict) -> subprocess.Popen:
    """``ray start ... --block`` in its own session (stopped by its process group)."""
    with log.open("wb") as sink:
        return subprocess.Popen([RAY, "start", *args, "--block", "--disable-usage-stats"],
                                cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def compare(out: Path, env: dict, *extra: str) -> dict:
    subprocess.run([sys.executable, "-m", "simulations.compare", *RUN, f"out={out}", *extra],
                   cwd=ROOT, env=env, check=True, timeout=600, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def test_a_comparison_runs_on_a_two_node_ray_cluster(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's sockets: a short path
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONPATH": str(ROOT),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray("--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
               "--include-dashboard=false", f"--temp-dir={temp}", log=tmp_path / "head.log",
               env=env)
    nodes = [head]
    try:
        deadline = time.monotonic() + 60
        while True:  # the head's GCS accepts connections
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(0.5)
        nodes.append(ray(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                         log=tmp_path / "worker.log", env=env))
        status = ""
        while "2.0 CPU" not in status:  # the worker's CPUs joined
            assert time.monotonic() < deadline + 60, status
            time.sleep(1)
            status = subprocess.run([RAY, "status", f"--address={address}"], env=env,
                                    capture_output=True, text=True).stdout

        on_cluster = compare(tmp_path / "cluster", env, f"ray-address={address}")
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    local = compare(tmp_path / "local", env)
    for strategy in ("fedavg", "fedugm"):
        assert on_cluster["strategies"][strategy]["final_accuracy"] == (
            local["strategies"][strategy]["final_accuracy"])
        assert min(on_cluster["strategies"][strategy]["final_accuracy"]) > 0.2  # 2x chance
