"""Load: many simulated clients, a few sampled per round, FedUGM (with its ledger) vs
Flower's FedAvg on Ray, side by side.

    python benchmarks/bench_load.py                          # 100 clients, MNIST-5k, 10 % a round
    python benchmarks/bench_load.py --clients 1000 --fraction 0.02 --ledger \\
        --set configs/fmnist.yaml dirichlet-alpha=0.5 lr=0.1  # 1,000 clients, ~12 min

Each strategy runs in its own process (``python -m simulations.compare strategies=[X]
seeds=[0] lr-grid=[] tune={} ...``, the Flower app on Ray with one CPU per client; ``--set``
adds config files and key=value items). Prints per strategy the median round time (the
first round, which starts the Ray workers, excluded), the total, the final accuracy and the
peak resident memory of that process (the ServerApp and the Ray driver; Ray's worker
processes are not counted), each with its ratio to FedAvg. With ``--ledger`` FedUGM keeps a
ledger with every round's history (what a deployment that removes clients runs with); the
script then reports its bytes (per round of history, and in all) and times an offline
replay removal of the client that took part most (``fl_ugm.removal.remove_from_ledger``),
against FedAvg's whole run, which retraining without the client would repeat.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import subprocess
import sys
import time
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


def run(strategy: str, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    """One simulation in a child process; its history and that process's peak RSS."""
    peak_file = out / f"{strategy}.peak-kib"
    out.mkdir(parents=True, exist_ok=True)
    configs = [item for item in extra if item.endswith((".yaml", ".yml"))]
    items = [item for item in extra if item not in configs]
    log = (out / f"{strategy}.log").open("w")
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(peak_file), *configs, f"strategies=[{strategy}]",
         "seeds=[0]", "lr-grid=[]", "tune={}", f"num-clients={args.clients}",
         f"fraction-train={args.fraction}", f"num-server-rounds={args.rounds}",
         f"dirichlet-alpha={args.dirichlet_alpha}", f"out={out / strategy}", *items],
        cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    history = json.loads(history_path(out / strategy / "histories", strategy, 0).read_text())
    return {"history": history, "peak_bytes": 1024 * int(peak_file.read_text())}


def ledger_report(directory: Path) -> dict:
    """The ledger's bytes and the time of an offline replay removal of its most active
    client (computed, not committed: the ledger is left as it is)."""
    from fl_ugm.ledger import Ledger
    from fl_ugm.removal import remove_from_ledger

    ledger = Ledger(directory)
    rounds = ledger.history()
    counts = collections.Counter(item.client_id for round_ in rounds
                                 for item in ledger.history_round(round_).participants)
    client = max(sorted(counts), key=counts.get)
    started = time.perf_counter()
    _, report = remove_from_ledger(ledger, client)
    return {"history_bytes_per_round": ledger.history_bytes() / len(rounds),
            "disk_bytes": ledger.disk_usage(), "clients_recorded": len(ledger.client_ids()),
            "removed_client": client, "removed_client_rounds": counts[client],
            "removal_s": time.perf_counter() - started, "removal_report": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5,
                        help="0.1 cannot split MNIST-5k's 4,000 examples 100 ways")
    parser.add_argument("--ledger", action="store_true",
                        help="FedUGM keeps a ledger with every round's history")
    parser.add_argument("--set", nargs="*", default=[], metavar="ITEM",
                        help="config files and key=value items passed to simulations.compare")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "load")
    args = parser.parse_args()
    ledger = args.out / "ledger"
    if args.ledger and ledger.exists():
        raise SystemExit(f"bench_load: {ledger} exists; give a new --out (a ledger is never "
                         "overwritten).")
    results = {}
    for strategy in ("fedavg", "fedugm"):
        extra = [*args.set, *([f"ledger={ledger}"] if args.ledger and strategy == "fedugm"
                              else [])]
        results[strategy] = run(strategy, args, args.out, extra)
        print(f"{strategy} done", file=sys.stderr, flush=True)
    print(f"{args.clients} clients (Dirichlet {args.dirichlet_alpha}), {args.fraction:.0%} "
          f"sampled per round, {args.rounds} rounds, 1 seed (Ray, one CPU per client)"
          f"{'; FedUGM with a ledger' if args.ledger else ''}")
    print(f"{'strategy':8} {'median round s':>14} {'x FedAvg':>8} {'total s':>8} "
          f"{'final acc %':>11} {'replies/round':>13} {'peak RSS MiB':>12} {'x FedAvg':>8}")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}}
    base = results["fedavg"]
    for name, result in results.items():
        history = result["history"]
        seconds = history["seconds"]
        result["round_s"] = statistics.median(b - a for a, b in itertools.pairwise(seconds[1:]))
        replies = statistics.fmean(len(r["nodes"]) for r in history["replies"])
        print(f"{name:8} {result['round_s']:14.2f} {result['round_s'] / base['round_s']:8.2f} "
              f"{seconds[-1]:8.1f} {100 * history['accuracy'][-1]:11.2f} {replies:13.1f} "
              f"{result['peak_bytes'] / 2**20:12.0f} "
              f"{result['peak_bytes'] / base['peak_bytes']:8.2f}")
        summary[name] = {"round_s": result["round_s"], "total_s": seconds[-1],
                         "final_accuracy": history["accuracy"][-1],
                         "peak_rss_bytes": result["peak_bytes"]}
    if args.ledger:
        report = ledger_report(ledger)
        summary["ledger"] = {k: v for k, v in report.items() if k != "removal_report"}
        fedavg_total = base["history"]["seconds"][-1]
        print(f"ledger: {report['history_bytes_per_round'] / 2**20:.1f} MiB of history per "
              f"round, {report['disk_bytes'] / 2**20:.1f} MiB on disk in all "
              f"({report['clients_recorded']} clients recorded); offline replay removal of "
              f"client {report['removed_client']} ({report['removed_client_rounds']} rounds): "
              f"{report['removal_s']:.1f} s = {report['removal_s'] / fedavg_total:.2f}x "
              f"FedAvg's whole run ({fedavg_total:.0f} s, what retraining would repeat)")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
