"""Fast checks of simulations.tasks: real data, partitions, models, proximal local training."""

from __future__ import annotations

import os

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


def test_official_test_set_stays_the_test_split():
    """Fashion-MNIST's last 10,000 images are its official test set: the test split comes
    only from them, validation and clients only from the 60,000 training images."""
    split = tasks.split_indices(700, test=100, server=50, seed=3, official_test=100)
    assert sorted(split.test.tolist()) == list(range(600, 700))
    assert len(split.server) == 50 and len(split.clients) == 550
    assert max(split.server.max(), split.clients.max()) < 600
    assert sorted(np.concatenate([split.server, split.clients]).tolist()) == list(range(600))
    assert len(tasks.split_indices(700, test=40, server=0, seed=3, official_test=100).test) == 40
    with pytest.raises(ValueError, match="official test set has 100"):
        tasks.split_indices(700, test=200, server=0, seed=3, official_test=100)


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
    # the batch size is a speed knob only: per-example sums, whatever the batching
    whole = tasks.evaluate(model, inputs[split.test], labels[split.test], batch_size=500)
    for batch_size in (7, 64):
        batched = tasks.evaluate(model, inputs[split.test], labels[split.test],
                                 batch_size=batch_size)
        assert batched.accuracy == whole.accuracy
        assert batched.loss == pytest.approx(whole.loss, rel=1e-6)


def test_the_server_scores_on_every_core_and_then_gives_them_back():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tasks.torch_threads(tasks.usable_cores()):
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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


def test_overlays_stack_and_missing_data_stops_compare_before_any_run(tmp_path, monkeypatch):
    """YAML overlays apply in order (the quick profile over the benchmark); a task whose
    data is missing stops compare with the install command before a simulation starts."""
    from simulations import compare
    from simulations.runner import load_config, simulation_layers

    cfg = load_config(["configs/fmnist.yaml", "configs/fmnist_quick.yaml", "seeds=[7]"],
                      simulation_layers(compare.COMPARE_CONFIG), prog="t", doc="")
    assert cfg.task == "fmnist" and cfg["num-clients"] == 100 and list(cfg.seeds) == [7]
    full = load_config(["configs/fmnist.yaml"], simulation_layers(compare.COMPARE_CONFIG),
                       prog="t", doc="")
    assert cfg["num-server-rounds"] < full["num-server-rounds"]
    monkeypatch.setattr(tasks, "FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setattr(compare, "simulate", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        compare.main(["configs/fmnist.yaml", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_compare_checks_its_grids_before_any_run_and_every_documented_command_passes(
        tmp_path, monkeypatch):
    """A typo in ``tune`` (a strategy or a run-config key) or a report round the run does
    not have stops compare before the first run; every ``python -m simulations.compare
    configs/...`` command written in a config's header loads on the compare layers (an
    unknown key is an error) and passes the check."""
    import re

    from simulations import compare
    from simulations.runner import CONFIGS, load_config, simulation_layers

    monkeypatch.setattr(compare, "simulate", lambda *a, **k: pytest.fail("a run started"))
    for typo, message in [("tune={fedprox: {proximal-nu: [0.1]}}", "proximal-nu"),
                          ("tune={fedprx: {proximal-mu: [0.1]}}", "unknown strategy 'fedprx'"),
                          ("report-rounds=[1,30]", "report-rounds [30] are not rounds")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            compare.main(["lr-grid=[0.1]", typo, f"out={tmp_path}"])
    commands = {tuple(re.findall(r"configs/\S+\.yaml", line))
                for path in CONFIGS.glob("*.yaml") for line in path.read_text().splitlines()
                if line.startswith("#") and "python -m simulations.compare configs/" in line}
    assert ("configs/tune_mnist.yaml", "configs/tune_mnist_5epochs.yaml") in commands
    for overlays in sorted(commands):
        compare.check_benchmark_config(load_config(list(overlays), simulation_layers(
            compare.COMPARE_CONFIG), prog="t", doc=""))


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


def test_setting_selection_uses_the_validation_split_and_its_own_seeds(monkeypatch, tmp_path):
    """Each strategy gets the setting (lr × its own tune grid) with the best VALIDATION
    accuracy averaged over the selection seeds (ties: smaller lr); the mean over the lr
    grid takes the best setting at each lr."""
    from omegaconf import OmegaConf

    from simulations import compare

    # seed 100 alone would choose fedavg lr 0.1 (0.85 > 0.8); the mean over 100 and 101
    # chooses lr 0.3 (0.8 > 0.7)
    scores = {("fedavg", 0.1, None, 100): 0.85, ("fedavg", 0.1, None, 101): 0.55,
              ("fedavg", 0.3, None, 100): 0.8, ("fedavg", 0.3, None, 101): 0.8,
              ("fedugm", 0.1, None): 0.75, ("fedugm", 0.3, None): 0.75,
              ("fedprox", 0.1, 0.01): 0.6, ("fedprox", 0.1, 1.0): 0.9,
              ("fedprox", 0.3, 0.01): 0.7, ("fedprox", 0.3, 1.0): 0.5}
    calls = []

    def fake_simulate(run_config, label=""):
        calls.append(run_config)
        key = (run_config["strategy"], run_config["lr"], run_config.get("proximal-mu"))
        accuracy = scores.get((*key, run_config["seed"]), scores.get(key))
        return {"accuracy": [0.1, accuracy]}

    monkeypatch.setattr(compare, "simulate", fake_simulate)
    cfg = OmegaConf.create({"strategies": ["fedavg", "fedugm", "fedprox"], "lr-grid": [0.3, 0.1],
                            "tune": {"fedprox": {"proximal-mu": [0.01, 1.0]}},
                            "selection-seeds": [100, 101], "score-rounds": 1,
                            "reuse-runs": False})
    selection = compare.select_settings(cfg, {"lr": 0.05}, tmp_path)
    assert selection["fedavg"]["chosen"] == {"lr": 0.3}
    assert selection["fedavg"]["validation"][1]["per_seed"] == [0.85, 0.55]
    assert selection["fedugm"]["chosen"] == {"lr": 0.1}  # a tie: the smaller lr
    assert selection["fedprox"]["chosen"] == {"lr": 0.1, "proximal-mu": 1.0}
    assert selection["fedavg"]["mean_over_lr_grid"] == pytest.approx((0.8 + 0.7) / 2)
    assert selection["fedprox"]["mean_over_lr_grid"] == pytest.approx((0.9 + 0.7) / 2)
    assert len(calls) == 2 * (2 + 2 + 4)
    assert all(c["evaluate-on"] == "validation" for c in calls)
    assert sorted({c["seed"] for c in calls}) == [100, 101]
    table = compare.format_selection(selection, [100, 101])
    assert "| fedprox |" in table and "lr 0.1 proximal-mu 1: 90.00" in table
    assert "mean over seeds 100, 101" in table
    with pytest.raises(SystemExit, match="selection-seeds is empty"):
        compare.select_settings(OmegaConf.merge(cfg, {"selection-seeds": []}), {}, tmp_path)
    assert compare.selection_seeds(OmegaConf.merge(cfg, {"selection-seeds": 100})) == [100]


def test_a_variants_axis_keeps_knobs_that_go_together():
    from omegaconf import OmegaConf

    from simulations import compare

    cfg = OmegaConf.create({"lr-grid": [0.1, 0.3], "tune": {"fedugm": {
        "variants": [{"ugm-server-momentum": 0.5},
                     {"ugm-server-optimizer": "adam", "ugm-server-lr": 0.01}],
        "ugm-carry": [0.0, 0.5]}}})
    grid = compare.setting_grid(cfg, "fedugm")
    assert len(grid) == 2 * 2 * 2
    assert {"lr": 0.3, "ugm-server-optimizer": "adam", "ugm-server-lr": 0.01,
            "ugm-carry": 0.5} in grid
    assert not any("ugm-server-optimizer" in g and "ugm-server-momentum" in g for g in grid)
    assert compare.setting_grid(cfg, "fedavg") == [{"lr": 0.1}, {"lr": 0.3}]


def test_reuse_runs_reads_back_only_a_run_with_the_same_config(monkeypatch, tmp_path):
    from simulations import compare
    from simulations.flower_app import history_path

    calls = []

    def fake_simulate(run_config, label=""):
        calls.append(run_config["lr"])
        history = {"accuracy": [0.1, run_config["lr"]]}
        path = history_path(run_config["out"], run_config["strategy"], run_config["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(__import__("json").dumps(history))
        return history

    monkeypatch.setattr(compare, "simulate", fake_simulate)
    config = {"strategy": "fedavg", "seed": 0, "lr": 0.5, "out": str(tmp_path)}
    assert compare.run_once(config, "a", reuse=True)["accuracy"] == [0.1, 0.5]
    assert compare.run_once(config, "b", reuse=True)["accuracy"] == [0.1, 0.5]
    assert calls == [0.5]  # read back
    compare.run_once({**config, "lr": 0.3}, "c", reuse=True)  # another setting: run
    compare.run_once({**config, "lr": 0.3}, "d", reuse=False)  # reuse off: run
    assert calls == [0.5, 0.3, 0.3]
    # a key added to the app after the run: reused at its default value, not at another
    compare.run_once({**config, "lr": 0.3, "ugm-carry": 0.0}, "e", reuse=True)
    assert calls == [0.5, 0.3, 0.3]
    compare.run_once({**config, "lr": 0.3, "ugm-carry": 0.5}, "f", reuse=True)
    assert calls == [0.5, 0.3, 0.3, 0.3]


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


def test_the_app_builds_flowers_robust_strategies_and_fedugms_options():
    from flwr.serverapp.strategy import FedTrimmedAvg, MultiKrum

    from simulations.flower_app import build_strategy
    from simulations.runner import app_run_config

    cfg = {**app_run_config(), "krum-malicious": 4, "trimmed-beta": 0.1}
    krum = build_strategy({**cfg, "strategy": "multikrum", "fraction-train": 0.2}, 100)
    assert type(krum) is MultiKrum  # 20 sampled, f = 4: it averages 16
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select) == (4, 16)
    trimmed = build_strategy({**cfg, "strategy": "fedtrimmedavg"}, 10)
    assert type(trimmed) is FedTrimmedAvg and trimmed.beta == 0.1
    ugm = build_strategy({**cfg, "strategy": "fedugm"}, 10)
    settings = ugm.settings
    assert (settings.update_screen.norm_bound, settings.update_screen.min_cosine) == (3.0, None)
    assert settings.client_dual_step == 0.0 and not settings.client_memory
    mifa = build_strategy({**cfg, "strategy": "mifa"}, 10).settings  # FedAvg's average + memory
    assert (mifa.merge, mifa.alpha, mifa.client_memory) == ("task-arithmetic", "num-examples",
                                                            True)
    assert build_strategy({**cfg, "strategy": "fedugm", "ugm-client-memory": True},
                          10).settings.client_memory
    assert build_strategy({**cfg, "strategy": "fedugm", "ugm-dual-step": 0.3},
                          10).settings.client_dual_step == 0.3
    screen = build_strategy({**cfg, "strategy": "fedugm", "screen-min-cosine": 0}, 10)
    assert screen.settings.update_screen.min_cosine == 0.0
    parts = build_strategy({**cfg, "strategy": "fedugm", "screen-norm-bound": 0,
                            "screen-min-cosine": -1}, 10).settings.update_screen
    assert (parts.norm_bound, parts.min_cosine) == (None, None)
    assert build_strategy({**cfg, "strategy": "fedugm", "update-screen": False},
                          10).settings.update_screen is None


def test_scores_rounds_to_the_best_baseline_and_seconds_per_round():
    """A run scores the mean of its last k rounds; the best baseline is the non-FedUGM
    strategy with the highest mean score; rounds to it (and to 95 % of it) are read off
    each strategy's seed-mean curve; seconds per round is the median round."""
    from simulations import compare

    def run(seed, accuracy, step=2.0):
        # cumulative seconds; the first round has 30 s of worker start-up
        seconds = [10.0 + step * r + 30 * (r > 0) for r in range(len(accuracy))]
        return {"seed": seed, "accuracy": accuracy, "loss": [0.0] * len(accuracy),
                "seconds": seconds, "replies": [{"bytes": 100}, {"bytes": 300}]}

    histories = {
        "fedavg": [run(0, [0.1, 0.5, 0.6, 0.7]), run(1, [0.1, 0.5, 0.6, 0.5])],
        "fedavgm": [run(0, [0.1, 0.3, 0.8, 0.6]), run(1, [0.1, 0.3, 0.8, 0.8])],
        "fedugm": [run(0, [0.1, 0.6, 0.7, 0.9], 3.0), run(1, [0.1, 0.7, 0.7, 0.9], 3.0)],
    }
    assert compare.score([0.1, 0.5, 0.6, 0.7], 2) == pytest.approx(0.65)
    assert compare.score([0.1, 0.5], 5) == pytest.approx(0.5)  # never the initial model
    with pytest.raises(ValueError, match="score-rounds=0"):
        compare.score([0.1, 0.5], 0)
    summary = compare.summarize(histories, last_rounds=2)
    assert summary["fedavgm"]["score"] == pytest.approx([0.7, 0.8])
    assert summary["fedugm"]["best_baseline"] == "fedavgm"  # 0.75 beats fedavg's 0.6
    # seed-mean curves: fedavgm .3 .8 .7, fedugm .65 .7 .9; target .75, 95 %: .7125
    assert summary["fedavgm"]["rounds_to_best_baseline"] == 2
    assert summary["fedugm"]["rounds_to_best_baseline"] == 3
    assert summary["fedugm"]["rounds_to_95pct_best_baseline"] == 3
    assert summary["fedavg"]["rounds_to_best_baseline"] is None
    assert summary["fedugm"]["seconds_per_round"] == pytest.approx(3.0)
    assert summary["fedavg"]["reply_bytes_per_round"] == pytest.approx(200)
    table = compare.format_table(summary, 3, last_rounds=2)
    assert "accuracy, mean of last 2 rounds" in table and "rounds to fedavgm's score" in table
    assert "| fedugm | 80.00 ± 0.00 | 3 (1.50×) | 3 |" in table
    assert "| fedavg | 60.00 ± 7.07 | — | — | 2.00 | 0.000 |" in table
    # the few-round horizons (the fine-tuning regime): accuracy after round k, per seed
    summary = compare.summarize(histories, last_rounds=2, report_rounds=[1, 3])
    assert summary["fedugm"]["accuracy_after_round"] == {1: [0.6, 0.7], 3: [0.9, 0.9]}
    table = compare.format_table(summary, 3, last_rounds=2)
    assert "| after round 1 (%) | after round 3 (%) |" in table
    assert "| fedugm | 80.00 ± 0.00 | 65.00 ± 7.07 | 90.00 ± 0.00 | 3 (1.50×) |" in table


@pytest.mark.usefixtures("server_identity")
def test_a_seeded_run_samples_the_same_clients_whatever_the_node_ids():
    """Node ids are random per run; RecordingGrid lists nodes and returns replies in client
    order, so Flower's sample_nodes under a seeded ``random`` picks the same clients in
    every run of a seed, and every strategy averages the replies in the same order."""
    import random

    from flwr.app import RecordDict
    from flwr.serverapp.strategy.strategy_utils import sample_nodes
    from helpers import message

    from simulations.flower_app import RecordingGrid

    class Nodes:  # the two calls RecordingGrid makes of a Grid here
        def __init__(self, node_of: dict[str, int]) -> None:
            self.node_of = node_of

        def get_node_ids(self):
            return set(self.node_of.values())

        def send_and_receive(self, messages, *, timeout=None):
            # arrival order: not the order sent
            return [message(RecordDict(), src=m.metadata.dst_node_id)
                    for m in reversed(list(messages))]

    clients = [str(c) for c in range(12)]
    chosen = []
    for run in range(3):
        ids = random.Random(run).sample(range(1, 10**9), len(clients))
        nodes = Nodes(dict(zip(clients, ids, strict=True)))
        client_of = {node: c for c, node in nodes.node_of.items()}
        grid = RecordingGrid(nodes, {}, client_of)
        random.seed(7)
        rounds = [sample_nodes(grid, 4, 4)[0] for _ in range(3)]
        chosen.append([[client_of[n] for n in r] for r in rounds])
        replies = grid.send_and_receive([message(RecordDict(), dst=n) for n in rounds[0]])
        assert [client_of[r.metadata.src_node_id] for r in replies] == sorted(
            chosen[-1][0], key=int)
    assert chosen[0] == chosen[1] == chosen[2]
    assert len({tuple(r) for r in chosen[0]}) > 1  # the rounds themselves differ
