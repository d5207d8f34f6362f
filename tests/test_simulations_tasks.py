"""Fast checks of simulations.tasks: real data, partitions, models, proximal local training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_ugm.client import train_classifier
from simulations import tasks


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    return tasks.load_mnist5k()


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] - b[k]).pow(2).sum() for k in a)) ** 0.5


def test_mnist5k_is_real_mnist(mnist):
    inputs, labels = mnist
    assert inputs.shape == (5000, 784) and inputs.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))
    # Real digits: a border-to-centre ink profile, roughly 19 % of pixels inked on average.
    images = inputs.reshape(-1, 28, 28)
    assert float(images[:, :, :2].mean()) < 0.01 < float(images[:, 10:18, 10:18].mean())
    assert 0.1 < float((inputs > 0.5).float().mean()) < 0.3


def test_digits_loader():
    inputs, labels = tasks.load_digits()
    assert inputs.shape == (1797, 64) and inputs.dtype == torch.float32
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_split_is_disjoint_and_complete():
    split = tasks.split_indices(5000, test=1000, server=500, seed=0)
    assert (len(split.test), len(split.server), len(split.clients)) == (1000, 500, 3500)
    together = np.concatenate([split.server, split.clients, split.test])
    assert sorted(together.tolist()) == list(range(5000))
    assert len(tasks.split_indices(1797, test=0.2, server=0.1, seed=0).test) == 359
    with pytest.raises(ValueError, match="leaves none"):
        tasks.split_indices(1797, test=1000, server=797, seed=0)


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_partition_covers_pool_and_is_seeded(mnist, scheme):
    labels = mnist[1][:3500]
    parts = tasks.partition(labels, 10, scheme, seed=0, alpha=0.1)
    assert len(parts) == 10 and sum(len(p) for p in parts) == 3500
    assert sorted(np.concatenate(parts).tolist()) == list(range(3500))  # disjoint, complete
    same = tasks.partition(labels, 10, scheme, seed=0, alpha=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    other = tasks.partition(labels, 10, scheme, seed=1, alpha=0.1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_01_is_non_iid_and_iid_is_not(mnist):
    labels = mnist[1][:3500].numpy()

    def top2_share(parts):
        return [np.sort(np.bincount(labels[p], minlength=10))[-2:].sum() / len(p) for p in parts]

    for seed in range(3):
        dirichlet = tasks.partition(labels, 10, "dirichlet", seed, alpha=0.1)
        assert min(len(p) for p in dirichlet) >= 10  # min_partition_size
        assert sum(share > 0.6 for share in top2_share(dirichlet)) >= 7
    iid = tasks.partition(labels, 10, "iid", 0)
    assert max(top2_share(iid)) < 0.35 and {len(p) for p in iid} == {350}


def test_pathological_gives_each_client_its_classes(mnist):
    labels = mnist[1][:3500].numpy()
    parts = tasks.partition(labels, 10, "pathological", 0, classes_per_client=2)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("features", [784, 64])
def test_models_and_param_helpers(name, features):
    torch.manual_seed(0)
    model = tasks.build_model(name, features, 10)
    assert model(torch.rand(3, features)).shape == (3, 10)
    params = tasks.get_params(model)
    assert list(params) == [k for k, _ in model.named_parameters()]
    params[next(iter(params))].add_(1.0)  # a copy: the model is untouched
    assert distance(params, tasks.get_params(model)) > 0
    tasks.set_params(model, params)
    assert distance(params, tasks.get_params(model)) == 0
    with pytest.raises(ValueError):
        tasks.build_model("resnet", features, 10)


def test_proximal_term_pulls_toward_anchor(mnist):
    inputs, labels = mnist[0][:200], mnist[1][:200]
    torch.manual_seed(0)
    start = tasks.get_params(tasks.build_model("mlp", 784, 10))
    lr, n = 0.01, 200
    moved, losses = [], []
    for delta in [0.0, n / (10 * lr), n / lr]:  # SGD's prior step lr·δ/n: 0, 0.1, 1 (stiffest)
        model = tasks.build_model("mlp", 784, 10)
        tasks.set_params(model, start)
        loss = train_classifier(
            model, inputs, labels, epochs=5, batch_size=20, lr=lr, prox_precision=delta,
            anchor=start, seed=0,
        )  # fmt: skip
        moved.append(distance(tasks.get_params(model), start))
        losses.append(loss)
    assert moved[0] > moved[1] > moved[2]
    assert moved[2] < 0.1 * moved[0]  # huge δ: the weights barely move
    assert losses[0] < losses[1] < losses[2]  # ... and the data fit suffers accordingly
    # anchor=None means "the weights on entry"
    model = tasks.build_model("mlp", 784, 10)
    tasks.set_params(model, start)
    train_classifier(
        model, inputs, labels, epochs=5, batch_size=20, lr=lr, prox_precision=n / lr, seed=0
    )
    assert distance(tasks.get_params(model), start) == pytest.approx(moved[2], rel=1e-5)


def test_training_then_evaluate_on_digits():
    inputs, labels = tasks.load_digits()
    split = tasks.split_indices(len(labels), test=500, server=0, seed=0)
    torch.manual_seed(0)
    model = tasks.build_model("mlp", 64, 10)
    before = tasks.evaluate(model, inputs[split.test], labels[split.test])
    loss = train_classifier(
        model, inputs[split.clients], labels[split.clients],
        epochs=10, batch_size=32, lr=0.01, optimizer="adam", seed=0,
    )  # fmt: skip
    after = tasks.evaluate(model, inputs[split.test], labels[split.test])
    assert 0.0 <= before.accuracy < 0.3 and after.accuracy > 0.9
    assert after.loss < before.loss and 0 < loss < 0.5
    assert model.training  # evaluate restores the mode


def test_a_last_batch_of_one_joins_the_previous_one_for_batchnorm():
    """33 examples in batches of 16: 16 + 17 (a batch of 1 would break BatchNorm), every
    example seen once per epoch."""
    seen: list[int] = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 3))
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    inputs, labels = torch.randn(33, 4), torch.randint(0, 3, (33,))
    train_classifier(model, inputs, labels, epochs=1, batch_size=16, lr=0.1, seed=0)
    assert seen == [16, 17]


def test_a_supernode_reads_its_own_data_file_from_node_config(tmp_path):
    """``data-path`` in node_config (a deployment) gives the same data as the exported
    partition; a missing or malformed file is a clear error."""
    from flwr.app import Context, RecordDict
    from safetensors.torch import save_file

    from simulations.export_partitions import main as export
    from simulations.flower_app import client_data, client_partition
    from simulations.runner import app_run_config

    cfg = {**app_run_config(), "task": "digits", "num-clients": 3}
    assert export([str(tmp_path), "task=digits", "num-clients=3"]) == 0

    def context(**node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                       run_config={})

    x, y = client_data(cfg, context(**{"data-path": str(tmp_path / "client-2.safetensors")}))
    expected_x, expected_y = client_partition(cfg, 2)
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    assert torch.equal(client_data(cfg, context(**{"partition-id": 2}))[1], expected_y)
    with pytest.raises(FileNotFoundError, match="is not a file on this SuperNode"):
        client_data(cfg, context(**{"data-path": str(tmp_path / "nope.safetensors")}))
    save_file({"x": x}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="must hold exactly 'inputs'"):
        client_data(cfg, context(**{"data-path": str(tmp_path / "bad.safetensors")}))


@pytest.mark.parametrize("module", ["compare", "unlearn", "one_shot", "sensitivity",
                                    "export_partitions"])
def test_every_experiment_has_help_and_creates_nothing(module, capsys, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"simulations.{module}").main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m simulations.{module}" in out  # the usage lines of the docstring
    assert "config keys (key=value overrides them):" in out and "  seed" in out
    assert list(tmp_path.iterdir()) == []  # no folder named --help, no results
    with pytest.raises(SystemExit, match=r"unknown config key 'sedes'; known keys: .*seed"):
        main(["out-dir", "sedes=[0]"] if module == "export_partitions" else ["sedes=[0]"])
    if module != "export_partitions":
        with pytest.raises(SystemExit, match=r"arguments must be key=value, got \['seeds'\]"):
            main(["seeds"])


def test_the_server_scores_the_test_or_the_validation_split():
    from simulations.flower_app import evaluation_set

    inputs, labels = torch.arange(100.0)[:, None], torch.arange(100)
    split = tasks.split_indices(100, test=20, server=10, seed=0)
    cfg = {"pretrain-epochs": 0}
    x, y = evaluation_set(cfg, inputs, labels, split)
    assert sorted(y.tolist()) == sorted(split.test.tolist()) == sorted(x[:, 0].long().tolist())
    x, y = evaluation_set({**cfg, "evaluate-on": "validation"}, inputs, labels, split)
    assert sorted(y.tolist()) == sorted(split.server.tolist()) == sorted(x[:, 0].long().tolist())
    with pytest.raises(ValueError, match="pretrain-epochs=0"):
        evaluation_set({"pretrain-epochs": 2, "evaluate-on": "validation"}, inputs, labels,
                       split)
    with pytest.raises(ValueError, match="server-examples > 0"):
        evaluation_set({**cfg, "evaluate-on": "validation"}, inputs, labels,
                       tasks.split_indices(100, test=20, server=0, seed=0))
    with pytest.raises(ValueError, match="choose test or validation"):
        evaluation_set({**cfg, "evaluate-on": "valid"}, inputs, labels, split)


def test_setting_selection_uses_the_validation_split_and_its_own_seed(monkeypatch, tmp_path):
    """Each strategy gets the setting (lr × its own tune grid) with the best final VALIDATION
    accuracy (ties: smaller lr), from runs at selection-seed; the mean over the lr grid takes
    the best setting at each lr."""
    from omegaconf import OmegaConf

    from simulations import compare

    scores = {("fedavg", 0.1, None): 0.7, ("fedavg", 0.3, None): 0.8,
              ("fedugm", 0.1, None): 0.75, ("fedugm", 0.3, None): 0.75,
              ("fedprox", 0.1, 0.01): 0.6, ("fedprox", 0.1, 1.0): 0.9,
              ("fedprox", 0.3, 0.01): 0.7, ("fedprox", 0.3, 1.0): 0.5}
    calls = []

    def fake_simulate(run_config, label=""):
        calls.append(run_config)
        key = (run_config["strategy"], run_config["lr"], run_config.get("proximal-mu"))
        return {"accuracy": [0.1, scores[key]]}

    monkeypatch.setattr(compare, "simulate", fake_simulate)
    cfg = OmegaConf.create({"strategies": ["fedavg", "fedugm", "fedprox"], "lr-grid": [0.3, 0.1],
                            "tune": {"fedprox": {"proximal-mu": [0.01, 1.0]}},
                            "selection-seed": 100})
    selection = compare.select_settings(cfg, {"lr": 0.05}, tmp_path)
    assert selection["fedavg"]["chosen"] == {"lr": 0.3}
    assert selection["fedugm"]["chosen"] == {"lr": 0.1}  # a tie: the smaller lr
    assert selection["fedprox"]["chosen"] == {"lr": 0.1, "proximal-mu": 1.0}
    assert selection["fedavg"]["mean_over_lr_grid"] == pytest.approx(0.75)
    assert selection["fedprox"]["mean_over_lr_grid"] == pytest.approx((0.9 + 0.7) / 2)
    assert len(calls) == 2 + 2 + 4
    assert all(c["evaluate-on"] == "validation" and c["seed"] == 100 for c in calls)
    table = compare.format_selection(selection, 100)
    assert "| fedprox |" in table and "lr 0.1 proximal-mu 1" in table


def test_the_app_builds_flowers_own_server_optimizers():
    from flwr.serverapp.strategy import FedAdam, FedAvgM

    from simulations.flower_app import build_strategy

    cfg = {"strategy": "fedavgm", "server-lr": 0.7, "server-momentum": 0.5,
           "fedadam-eta": 0.02, "fedadam-tau": 0.003}
    avgm = build_strategy(cfg, 4)
    assert type(avgm) is FedAvgM
    assert (avgm.server_learning_rate, avgm.server_momentum) == (0.7, 0.5)
    adam = build_strategy({**cfg, "strategy": "fedadam"}, 4)
    assert type(adam) is FedAdam and (adam.eta, adam.tau) == (0.02, 0.003)
    with pytest.raises(ValueError, match="Flower's fedavgm samples every node"):
        build_strategy({**cfg, "exclude-clients": "1"}, 4)
