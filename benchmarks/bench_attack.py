"""One client sends hostile replies: final accuracy of FedUGM with its Fisher-inflation
defence, without it, and of Flower's FedAvg under the same attack, each vs no attack.

    python benchmarks/bench_attack.py [key=value ...]     # e.g. seeds=[0,1,2] attack-client=3

Ray simulations of the Flower app (``simulations.flower_app``) with the main comparison's
settings (``configs/compare.yaml``: MNIST-5k, 10 clients, Dirichlet 0.1, 20 rounds); partition
``attack-client`` (default 1) multiplies the Fisher it reports by ``attack-scale`` (1e6),
and in the second attack also sends −Δ; the third sends −Δ with its honest Fisher. FedAvg
has no Fisher to inflate, so against it the first attack is a no-op and the second is the
flipped update alone. Prints final test
accuracy (mean ± std over seeds) and what the attack costs; writes ``summary.json`` to
``out`` (default results/attack).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations.compare import COMPARE_CONFIG  # noqa: E402
from simulations.runner import (  # noqa: E402
    load_config,
    mean_std,
    plain,
    progress,
    quiet_flower_console,
    simulate,
    simulation_layers,
    write_json,
)

NO_CLIP = {"fisher-clip": 0}
INFLATE = {"attack": "inflate"}
FLIP = {"attack": "flip-inflate"}
FLIP_ONLY = {"attack": "flip"}
#: (label, strategy, run-config overrides, the no-attack label it is compared with)
SCENARIOS = [
    ("FedAvg, no attack", "fedavg", {"attack-client": -1}, None),
    ("FedAvg, flipped Δ", "fedavg", FLIP, "FedAvg, no attack"),
    ("FedUGM, no attack", "fedugm", {"attack-client": -1}, None),
    ("FedUGM, Fisher ×1e6", "fedugm", INFLATE, "FedUGM, no attack"),
    ("FedUGM, flipped Δ + Fisher ×1e6", "fedugm", FLIP, "FedUGM, no attack"),
    ("FedUGM, flipped Δ, honest Fisher", "fedugm", FLIP_ONLY, "FedUGM, no attack"),
    ("FedUGM no clip, no attack", "fedugm", {**NO_CLIP, "attack-client": -1}, None),
    ("FedUGM no clip, Fisher ×1e6", "fedugm", {**NO_CLIP, **INFLATE},
     "FedUGM no clip, no attack"),
    ("FedUGM no clip, flipped Δ + Fisher ×1e6", "fedugm", {**NO_CLIP, **FLIP},
     "FedUGM no clip, no attack"),
]


def main(argv: list[str]) -> int:
    cfg = load_config(["seeds=[0,1]", "out=results/attack", "attack-client=1", *argv],
                      simulation_layers(COMPARE_CONFIG), prog="bench_attack", doc=__doc__)
    quiet_flower_console()
    out = Path(str(cfg.out))
    finals: dict[str, list[float]] = {}
    start = time.perf_counter()
    for label, strategy, overrides, _ in SCENARIOS:
        scenario = OmegaConf.merge(cfg, overrides)
        slug = label.lower().replace(" ", "-").replace(",", "").replace("×", "x")
        finals[label] = [
            simulate({**plain(scenario, "strategies", "seeds"), "strategy": strategy,
                      "seed": int(seed), "out": str(out / slug)}, label=label)["accuracy"][-1]
            for seed in cfg.seeds
        ]
        progress(f"{label}: {mean_std(finals[label], 100)} % ({time.perf_counter() - start:.0f} "
                 "s elapsed)")

    print(f"\nattack-client {cfg['attack-client']}, scale {cfg['attack-scale']:g}, "
          f"{len(cfg.seeds)} seeds, {cfg['num-server-rounds']} rounds, {cfg['num-clients']} "
          f"clients, Dirichlet {cfg['dirichlet-alpha']}")
    print("| scenario | final test accuracy (%) | cost of the attack (points) |")
    print("|---|---|---|")
    costs = {}
    for label, _, _, baseline in SCENARIOS:
        cost = "—"
        if baseline is not None:
            diffs = [100 * (b - a) for a, b in zip(finals[label], finals[baseline], strict=True)]
            costs[label] = diffs
            per_seed = ", ".join(f"{d:.1f}" for d in diffs)
            cost = f"{statistics.fmean(diffs):.2f} (per seed {per_seed})"
        print(f"| {label} | {mean_std(finals[label], 100)} | {cost} |")
    write_json(out / "summary.json", {"final_accuracy": finals, "attack_cost_points": costs,
                                      "config": plain(cfg),
                                      "wall_time_s": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
