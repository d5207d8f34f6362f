"""Update poisoning: what each attack costs FedUGM (its default defences: the Fisher clip and
the norm bound; with the cosine screen added; without the update screen) and Flower's
FedAvg, FedAvg + MultiKrum and FedAvg + FedTrimmedAvg.

    python benchmarks/bench_attack.py                                  # everything, ~80 min
    python benchmarks/bench_attack.py threats=[1/10] attacks=[flip] seeds=[0]   # one cell
    python benchmarks/bench_attack.py dirichlet-alpha=1.0 out=results/attack_alpha1  # milder skew

Ray simulations of the Flower app (``simulations.flower_app``) with the main comparison's
settings (``configs/compare.yaml``: MNIST-5k, MLP, Dirichlet 0.1, 20 rounds, lr 0.05).
Threat models (``threats``): ``1/10`` and ``2/10`` (partitions 1, and 1 and 2, of 10
clients, every client in every round) and ``10/100`` (every 10th of 100 clients, 20 sampled
per round, Dirichlet 0.5: at 0.1 some of the 4,000 digits' 100 partitions would be
empty; MultiKrum assumes f = 4 there, 2 otherwise). Attacks (``attacks``,
``simulations.adversaries``):

* ``flip``: the attacker sends −Δ (to FedAvg: 2θ − θ_t);
* ``flip-inflate``: −Δ and its Fisher × 10⁶ (FedAvg replies carry no Fisher: the same as
  ``flip`` there, not run again);
* ``scale``: Δ × 10;
* ``backdoor``: the attacker trains on its data with the 6×6 checkerboard trigger and label
  0, and rescales its Δ to the norm of the honest update it would have sent (no norm bound
  sees it); scored by the attack success rate too (triggered test images not of class 0
  classified as 0).

Each run is compared with the same strategy's honest run of the same seed, and FedUGM also
with a run that never samples the attackers (what a defence that leaves them out from the
first round can reach at best: their honest data is missing too). Prints one table
per threat model (final test accuracy, mean ± std over ``seeds``, and the attack's cost in
points) and writes ``summary.json`` to ``out`` (default results/attack). Runs are saved as
they finish; ``reuse-runs=true`` (the default) reads back the ones a previous call left in
``out`` with the same run config.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations.adversaries import backdoor_success  # noqa: E402
from simulations.compare import COMPARE_CONFIG, run_once  # noqa: E402
from simulations.flower_app import experiment_for, fresh_model  # noqa: E402
from simulations.runner import (  # noqa: E402
    load_config,
    mean_std,
    plain,
    progress,
    quiet_flower_console,
    simulation_layers,
    write_json,
)

#: label: (strategy, run-config overrides)
STRATEGIES = {
    "FedUGM": ("fedugm", {}),  # the default: Fisher clip and norm bound
    "FedUGM + cosine screen": ("fedugm", {"screen-min-cosine": 0.0}),
    "FedUGM, no update screen": ("fedugm", {"update-screen": False}),
    "FedAvg": ("fedavg", {}),
    "FedAvg + MultiKrum": ("multikrum", {}),
    "FedAvg + FedTrimmedAvg": ("fedtrimmedavg", {}),
}
#: name: run-config overrides of the attacking clients
ATTACKS = {
    "flip": {"attack": "flip"},
    "flip-inflate": {"attack": "flip-inflate", "attack-scale": 1e6},
    "scale": {"attack": "scale", "attack-scale": 10.0},
    "backdoor": {"attack": "norm-match", "backdoor-trigger": "checker", "backdoor-target": 0},
}
#: threat model: (setup overrides, attacking partitions)
THREATS = {
    "1/10": ({"num-clients": 10}, [1]),
    "2/10": ({"num-clients": 10}, [1, 2]),
    "10/100": ({"num-clients": 100, "fraction-train": 0.2, "krum-malicious": 4,
                "dirichlet-alpha": 0.5},
               list(range(0, 100, 10))),
}
DEFAULTS = {"seeds": [0, 1, 2], "out": "results/attack", "reuse-runs": True,
            "threats": list(THREATS), "attacks": list(ATTACKS), "strategies": list(STRATEGIES)}


def run(cfg, setup: dict, strategy_label: str, attack: str | None, attackers: list[int],
        seed: int, folder: str) -> dict[str, float]:
    """One run: {"accuracy": final test accuracy, "backdoor": attack success (backdoor only)}."""
    strategy, overrides = STRATEGIES[strategy_label]
    out = Path(str(cfg.out)) / folder / strategy_label.lower().replace(" ", "-").replace(
        ",", "").replace("+", "plus")
    run_config = {**plain(cfg, *DEFAULTS), **setup, **overrides, "strategy": strategy,
                  "seed": seed, "out": str(out)}
    if attack is not None:
        run_config.update({**ATTACKS[attack], "attack-client": attackers})
        if attack == "backdoor":
            run_config.update({"backdoor-client": attackers,
                               "save-final": str(out / f"final-seed{seed}.safetensors")})
    history = run_once(run_config, f"{folder}: {strategy_label}", bool(cfg["reuse-runs"]))
    result = {"accuracy": history["accuracy"][-1]}
    if attack == "backdoor":
        inputs, labels, split, _ = experiment_for(run_config)
        model = fresh_model(run_config, inputs)
        model.load_state_dict(load_file(run_config["save-final"]))
        result["backdoor"] = backdoor_success(
            model, inputs[split.test], labels[split.test], trigger="checker",
            target=int(run_config["backdoor-target"]))
    return result


def main(argv: list[str]) -> int:
    cfg = load_config(argv, [*simulation_layers(COMPARE_CONFIG), DEFAULTS],
                      prog="bench_attack", doc=__doc__)
    for key, known in (("threats", THREATS), ("attacks", ATTACKS), ("strategies", STRATEGIES)):
        unknown = [x for x in cfg[key] if x not in known]
        if unknown:
            raise SystemExit(f"bench_attack: unknown {key} {unknown}; choose from {list(known)}.")
    quiet_flower_console()
    start = time.perf_counter()
    seeds = [int(s) for s in cfg.seeds]
    summary: dict = {"config": plain(cfg), "threats": {}}
    tables = []
    honest: dict[tuple[int, str], list[dict]] = {}  # (num-clients, strategy) -> per seed
    for threat in cfg.threats:
        setup, attackers = THREATS[threat]
        clients, folder = int(setup["num-clients"]), threat.replace("/", "-of-")
        rows = {}
        for label in cfg.strategies:
            if (clients, label) not in honest:
                honest[clients, label] = [run(cfg, setup, label, None, [], seed,
                                              f"{clients}-clients/honest") for seed in seeds]
            rows[label] = {"honest": honest[clients, label]}
            for attack in cfg.attacks:
                if attack == "flip-inflate" and STRATEGIES[label][0] != "fedugm":
                    continue  # no Fisher to inflate: the same run as flip
                rows[label][attack] = [
                    run(cfg, setup, label, attack, attackers, seed, f"{folder}/{attack}")
                    for seed in seeds]
            progress(f"{threat} {label} done ({time.perf_counter() - start:.0f} s elapsed)")
        summary["threats"][threat] = rows
        tables.append(format_table(threat, rows, list(cfg.attacks), len(seeds)))
        if "FedUGM" in cfg.strategies:  # the floor of any defence that leaves them out
            excluded = {"exclude-clients": ",".join(str(a) for a in attackers)}
            floor = [run(cfg, {**setup, **excluded}, "FedUGM", None, [], seed,
                         f"{folder}/attackers-excluded") for seed in seeds]
            summary["threats"][threat]["FedUGM without the attackers"] = floor
            tables.append(f"FedUGM without the attackers (never sampled; what a defence that "
                          f"leaves them out from round 1 can reach at best): "
                          f"{mean_std([r['accuracy'] for r in floor], 100)} %")
    print("\n\n".join(tables))
    for (clients, label), runs in honest.items():
        unscreened = honest.get((clients, "FedUGM, no update screen"))
        if label.startswith("FedUGM") and unscreened and runs is not unscreened:
            cost = [100 * (u["accuracy"] - r["accuracy"]) for u, r in zip(unscreened, runs,
                                                                          strict=True)]
            summary.setdefault("honest_cost_points", {})[f"{label}, {clients} clients"] = cost
            print(f"\n{label} against no update screen, honest runs of {clients} clients: "
                  f"{statistics.fmean(cost):+.2f} points lost (per seed "
                  f"{', '.join(f'{c:+.2f}' for c in cost)})")
    summary["wall_time_s"] = time.perf_counter() - start
    write_json(Path(str(cfg.out)) / "summary.json", summary)
    return 0


def format_table(threat: str, rows: dict, attacks: list[str], num_seeds: int) -> str:
    """Final test accuracy (%) per strategy and attack, and the attack's cost against the
    same strategy's honest run (points, mean over seeds)."""
    lines = [f"{threat} attackers, {num_seeds} seeds: final test accuracy (%), and in brackets "
             "the points lost against the strategy's honest run",
             "| " + " | ".join(["strategy", "honest", *attacks]) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for label, results in rows.items():
        honest = [r["accuracy"] for r in results["honest"]]
        cells = [mean_std(honest, 100)]
        for attack in attacks:
            if attack not in results:
                cells.append("= flip")
                continue
            accuracy = [r["accuracy"] for r in results[attack]]
            cost = statistics.fmean(100 * (h - a) for h, a in zip(honest, accuracy, strict=True))
            cell = f"{mean_std(accuracy, 100)} ({cost:+.2f})"
            if attack == "backdoor":
                cell += f", success {mean_std([r['backdoor'] for r in results[attack]], 100)}"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
