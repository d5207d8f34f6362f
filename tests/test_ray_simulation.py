"""A real Flower simulation on Ray (3 clients, 2 rounds, scikit-learn digits): FedUGM, and
the same ClientApp under Flower's built-in FedAvg and FedAvgM (server momentum)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_config():
    from simulations.runner import OFFLINE_ENV

    os.environ.update(OFFLINE_ENV)  # offline, and Ray's documented switch for its notice
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update({"task": "digits", "model": "mlp", "num-clients": 3, "num-server-rounds": 2,
                   "test-examples": 400, "local-epochs": 2, "lr": 0.1, "partition": "dirichlet",
                   "dirichlet-alpha": 1.0})
    return config


@pytest.mark.parametrize("strategy", ["fedugm", "fedavg", "fedavgm"])
def test_simulation_on_ray(strategy, run_config, tmp_path):
    from flwr.simulation import run_simulation

    from simulations.flower_app import history_path, make_apps
    from simulations.tasks import build_model

    ledger = str(tmp_path / "ledger") if strategy == "fedugm" else ""
    config = dict(run_config, strategy=strategy, out=str(tmp_path), ledger=ledger)
    server_app, client_app = make_apps(config)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})

    history = json.loads(history_path(tmp_path, strategy, 0).read_text())
    parameters = sum(p.numel() for p in build_model("mlp", 64, 10).parameters())
    assert len(history["accuracy"]) == 3  # initial model + 2 rounds
    assert [r["round"] for r in history["replies"]] == [1, 2]
    for round_log in history["replies"]:
        assert len(round_log["nodes"]) == 3 and round_log["errors"] == 0
        assert round_log["clients"] == ["0", "1", "2"]  # replies in client order
        expected = (["client", "delta", "fisher", "metrics", "ugm-scales"] if strategy == "fedugm"
                    else ["arrays", "metrics"])
        assert round_log["records"] == expected
        # FedUGM's float16 Δ + F cost FedAvg's float32 θ: 4 bytes per parameter and client,
        # plus a .npy header (≤ 256 bytes) per array: 4 tensors, FedUGM sends 2 records
        arrays = 3 * 4 * (2 if strategy == "fedugm" else 1)
        assert 0 < round_log["bytes"] - 3 * 4 * parameters <= 256 * arrays
    assert history["accuracy"][-1] > history["accuracy"][0] + 0.4, history["accuracy"]
    assert history["loss"][-1] < history["loss"][0]
    if strategy == "fedugm":  # the ledger holds every client under its partition id
        from fl_ugm.ledger import Ledger

        ledger = Ledger(tmp_path / "ledger")
        assert ledger.client_ids() == ["0", "1", "2"] and ledger.rounds() == [0, 1, 2]
