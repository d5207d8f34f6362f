"""Load: 100 simulated clients, 10 % sampled per round, FedUGM vs Flower's FedAvg on Ray.

    python benchmarks/bench_load.py [--clients 100] [--rounds 10] [--fraction 0.1]

Each strategy runs in its own process (``python -m simulations.compare strategies=[X]
seeds=[0] ...``, the Flower app on Ray with one CPU per client); prints the median round
time (the first round, which starts the Ray workers, excluded), the total, the final
accuracy, and the peak resident memory of that process (the ServerApp and the Ray driver;
Ray's worker processes are not counted) with the ratio to FedAvg.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations.flower_app import history_path  # noqa: E402

#: runs simulations.compare in this process, then writes this process's peak RSS (KiB)
_CHILD = """
import resource, runpy, sys
peak_file, sys.argv = sys.argv[1], ["compare", *sys.argv[2:]]
try:
    runpy.run_module("simulations.compare", run_name="__main__")
except SystemExit as done:
    if done.code:
        raise
open(peak_file, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def run(strategy: str, args: argparse.Namespace, out: Path) -> dict:
    """One simulation in a child process; its history and that process's peak RSS."""
    peak_file = out / f"{strategy}.peak-kib"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(peak_file), f"strategies=[{strategy}]", "seeds=[0]",
         f"num-clients={args.clients}", f"fraction-train={args.fraction}",
         f"num-server-rounds={args.rounds}", f"dirichlet-alpha={args.dirichlet_alpha}",
         f"out={out / strategy}"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    history = json.loads(history_path(out / strategy / "histories", strategy, 0).read_text())
    return {"history": history, "peak_bytes": 1024 * int(peak_file.read_text())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5,
                        help="0.1 cannot split MNIST-5k's 4,000 examples 100 ways")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "load")
    args = parser.parse_args()
    results = {}
    for strategy in ("fedavg", "fedugm"):
        results[strategy] = run(strategy, args, args.out)
        print(f"{strategy} done", file=sys.stderr, flush=True)
    print(f"{args.clients} clients (Dirichlet {args.dirichlet_alpha}), {args.fraction:.0%} "
          f"sampled per round, {args.rounds} rounds, 1 seed (Ray, one CPU per client)")
    print(f"{'strategy':8} {'median round s':>14} {'total s':>8} {'final acc %':>11} "
          f"{'replies/round':>13} {'peak RSS MiB':>12} {'x FedAvg':>8}")
    base = results["fedavg"]["peak_bytes"]
    for name, result in results.items():
        history = result["history"]
        seconds = history["seconds"]
        rounds = [b - a for a, b in itertools.pairwise(seconds[1:])]  # round 1 starts Ray
        replies = statistics.fmean(len(r["nodes"]) for r in history["replies"])
        print(f"{name:8} {statistics.median(rounds):14.2f} {seconds[-1]:8.1f} "
              f"{100 * history['accuracy'][-1]:11.2f} {replies:13.1f} "
              f"{result['peak_bytes'] / 2**20:12.0f} {result['peak_bytes'] / base:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
