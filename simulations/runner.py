"""What every experiment script shares: configs, the command line, a quiet console, one
Flower simulation on Ray, and the reporting epilogue (mean ± std, JSON, figures).

Configs are omegaconf layers merged in order, then an optional YAML file given as the first
argument, then ``key=value`` overrides; an unknown key is an error that lists the known ones,
and ``-h``/``--help`` prints the script's docstring and every key with its default.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # opts into Ray's future default (no GPU env override when num_gpus=0), which silences
    # its FutureWarning; nothing changes on a machine whose clients use no GPU
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
#: Ray: one CPU per simulated client, and Ray's own logs kept off the console.
BACKEND_CONFIG = {"client_resources": {"num_cpus": 1},
                  "init_args": {"logging_level": "ERROR", "log_to_driver": False}}
#: The runner's own config keys: ``ray-address`` is an existing Ray cluster's address
#: (``HOST:PORT`` of its head, as ``ray start --head`` prints it; "" starts a local Ray).
RUNNER_KEYS = {"ray-address": ""}


def app_run_config() -> dict[str, Any]:
    """The Flower app's run config defaults (``[tool.flwr.app.config]`` in pyproject.toml)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def simulation_layers(*experiment: Path) -> list[dict | Path]:
    """Config layers of a Ray experiment: the app's run config, the adversaries' keys
    (``configs/adversaries.yaml``), then the experiment's own YAML files."""
    return [app_run_config(), RUNNER_KEYS, CONFIGS / "adversaries.yaml", *experiment]


def load_config(argv: Sequence[str], layers: Sequence[Mapping | Path], *, prog: str,
                doc: str | None) -> DictConfig:
    """``layers`` (dicts or YAML files), then the YAML files that lead ``argv`` (each over
    the previous, e.g. ``configs/fmnist.yaml configs/fmnist_quick.yaml``), then the
    ``key=value`` items of ``argv``. ``-h``/``--help`` prints ``doc`` and the keys, and exits."""
    default = OmegaConf.merge(*(OmegaConf.load(layer) if isinstance(layer, Path)
                                else OmegaConf.create(dict(layer)) for layer in layers))
    args = list(argv)
    if any(arg in ("-h", "--help") for arg in args):
        print((doc or "").strip() + "\n\nconfig keys (key=value overrides them):")
        for key, value in OmegaConf.to_container(default).items():
            print(f"  {key}={value!r}")
        raise SystemExit(0)
    while args and args[0].endswith((".yaml", ".yml")):
        default = OmegaConf.merge(default, OmegaConf.load(args.pop(0)))
    bad = [arg for arg in args if "=" not in arg]
    if bad:
        raise SystemExit(f"{prog}: arguments must be key=value, got {bad}; see --help.")
    OmegaConf.set_struct(default, True)  # a typo in a top-level key is an error ...
    for key in default:
        if isinstance(default[key], DictConfig):  # ... but mappings (tune) take any entries
            OmegaConf.set_struct(default[key], False)
    try:
        return OmegaConf.merge(default, OmegaConf.from_cli(args))
    except ConfigKeyError as err:
        known = ", ".join(sorted(str(k) for k in default))
        raise SystemExit(f"{prog}: unknown config key {err.key!r}; known keys: {known}") from None


def plain(cfg: DictConfig, *drop: str) -> dict[str, Any]:
    """``cfg`` as a plain dict, without the keys ``drop`` (e.g. the experiment's lists)."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in drop}


class _DropExpectedNotices(logging.Filter):
    """Drop two Flower warnings that every experiment run would print and that say nothing
    wrong: ``run_simulation``'s deprecation banner (it is deprecated in favour of ``flwr run``,
    which runs a separate SuperLink; flwr 1.41 has no supported in-process path) and
    "fraction_evaluate is set to 0.0" (the app evaluates on the server, by design). Every
    other warning stays."""

    NOTICES = ("`run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


def quiet_flower_console() -> None:
    """Show only Flower's warnings and errors (our own progress lines are the log), set the
    offline environment, and drop the notices of :class:`_DropExpectedNotices`."""
    from flwr.supercore.logger import update_console_handler

    os.environ.update(OFFLINE_ENV)
    update_console_handler(level=logging.WARNING)
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _DropExpectedNotices) for f in flower.filters):
        flower.addFilter(_DropExpectedNotices())


def simulate(run_config: Mapping[str, Any], label: str = "",
             server_app: ServerApp | None = None) -> dict[str, Any]:
    """One Flower simulation on Ray of the app (``simulations.flower_app``; or its ClientApp
    with another ``server_app``), its clients played by ``simulations.adversaries.Adversary``
    (honest unless the config names an attacker); returns the history the ServerApp wrote to
    ``run_config["out"]`` and prints a progress line."""
    from flwr.simulation import run_simulation

    from simulations.adversaries import Adversary
    from simulations.flower_app import history_path, make_apps

    path = history_path(run_config["out"], run_config["strategy"], run_config["seed"])
    path.unlink(missing_ok=True)  # never read a previous run's history
    started = time.perf_counter()
    app_server, client_app = make_apps(run_config, Adversary())
    run_simulation(server_app=server_app or app_server, client_app=client_app,
                   num_supernodes=int(run_config["num-clients"]),
                   backend_config=backend_config(str(run_config.get("ray-address", ""))))
    if not path.exists():
        raise RuntimeError(f"the {run_config['strategy']} simulation (seed {run_config['seed']}) "
                           "wrote no history; see the Flower log above.")
    history = json.loads(path.read_text())
    rounds = len(history["replies"])
    final = f", final accuracy {100 * history['accuracy'][-1]:.2f} %" if history["accuracy"] else ""
    progress(f"{label or run_config['strategy']} (seed {run_config['seed']}): {rounds} train "
             f"round{'' if rounds == 1 else 's'}{final}, {time.perf_counter() - started:.1f} s")
    return history


def backend_config(ray_address: str = "") -> dict[str, Any]:
    """Flower's Ray backend config: a local Ray, or the cluster at ``ray_address`` (its
    nodes need this repository and its packages at the same paths: Flower passes the
    driver's ``sys.path`` to the workers)."""
    if not ray_address:
        return BACKEND_CONFIG
    return {**BACKEND_CONFIG, "init_args": {**BACKEND_CONFIG["init_args"],
                                            "address": ray_address}}


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (sample std; 0 for a single value) of ``scale`` × values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def figure(ncols: int = 1, size: tuple[float, float] = (7, 4.5)):
    """(figure, axes) from matplotlib's file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
