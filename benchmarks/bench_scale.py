"""The server's state at scale (issue 31): many clients, a large model, a few sampled a round.

    python benchmarks/bench_scale.py                      # 1,000 clients, 2M parameters, 20 a round
    python benchmarks/bench_scale.py --clients 100 --params 200000 --fill 5 --rounds 3  # smoke

Each strategy runs in its own process (peak RSS is per process), through Flower's Message
API in process (no Ray: the server's cost is what is measured): Flower's FedAvg, and FedUGM
with its defaults (under partial participation: the client memory and server momentum),
its memory on disk (``memory_dir``) and a ledger keeping every round's history in bfloat16.
The task is synthetic with little local work: client k holds ½ (w − w*_k)ᵀ H_k (w − w*_k)
(diagonal H_k, drawn from seed k) and returns its exact minimiser under the prior the
server asks for (Δ and F = diag H_k in float16 on the wire, as FedUGM's clients do).
The first ``--fill`` rounds ask the clients in turn (20 new ones a round) so that the memory
holds every client; the ``--rounds`` after them sample at random and are the ones timed.
FedUGM also runs without the ledger (its memory still on disk). Prints, per strategy: the
median round time (clients' work + the server's) and the server's share
(``aggregate_train``), the peak RSS, and the bytes on disk (ledger, memory).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _measure import train_message
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fl_ugm import FedUGM
from fl_ugm.client import ugm_reply
from fl_ugm.ledger import Ledger
from fl_ugm.protocol import PRIOR_KEY

#: Flower's FedAvg; FedUGM with its memory on disk and the ledger (history in bfloat16); the
#: same without the ledger (to tell the memory's cost from the ledger's).
STRATEGIES = ("fedavg", "fedugm", "fedugm-no-ledger")


class Vector(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size))


class QuadraticGrid:
    """``clients`` nodes (node k + 1 = client k) with quadratic losses drawn from seed k; in
    a fill round only the next ``per_round`` nodes in turn are connected."""

    def __init__(self, clients: int, size: int, per_round: int) -> None:
        self.clients, self.size, self.per_round = clients, size, per_round
        self.turn: int | None = 0  # None: every node connected

    def get_node_ids(self) -> list[int]:
        if self.turn is None:
            return list(range(1, self.clients + 1))
        first = (self.turn * self.per_round) % self.clients
        return [first + j + 1 for j in range(self.per_round)]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return [self._answer(m) for m in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        gen = torch.Generator().manual_seed(node)
        hessian = 50 + 50 * torch.rand(self.size, generator=gen)  # a sum over 100 examples
        optimum = torch.randn(self.size, generator=gen)
        incoming = train_message(msg.content, src=0, dst=node)
        theta = msg.content.array_records["arrays"].to_torch_state_dict()["w"]
        prior = float(msg.content.config_records["config"].get(PRIOR_KEY, 0.0))
        model = Vector(self.size)
        with torch.no_grad():
            model.w.copy_((prior * theta + hessian * optimum) / (prior + hessian))
        return ugm_reply(incoming, model, fisher={"w": hessian}, num_examples=100,
                         client_id=f"c{node - 1}")


def run_one(args: argparse.Namespace) -> dict:
    """One strategy's run in this process; returns its figures."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = QuadraticGrid(args.clients, args.params, args.per_round)
    common = {"fraction_train": args.per_round / args.clients,
              "min_train_nodes": args.per_round, "min_available_nodes": args.per_round,
              "fraction_evaluate": 0.0}
    work = Path(args.dir) / args.strategy
    shutil.rmtree(work, ignore_errors=True)
    if args.strategy.startswith("fedugm"):
        ledger = None
        if args.strategy == "fedugm":
            ledger = Ledger(work / "ledger", history_dtype="bfloat16", keep_globals=1)
        strategy = FedUGM(ledger=ledger, memory_dir=work / "memory", **common)
        assert strategy.settings.client_memory
    else:
        strategy = FedAvg(**common)
    arrays = ArrayRecord({"w": torch.zeros(args.params)})
    rounds, servers = [], []
    for server_round in range(1, args.fill + args.rounds + 1):
        grid.turn = server_round - 1 if server_round <= args.fill else None
        started = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages)
        merging = time.perf_counter()
        arrays, _ = strategy.aggregate_train(server_round, replies)
        done = time.perf_counter()
        if server_round > args.fill:
            rounds.append(done - started)
            servers.append(done - merging)
        print(f"[{args.strategy}] round {server_round}/{args.fill + args.rounds}: "
              f"{done - started:.2f} s", file=sys.stderr, flush=True)
    remembered = len((getattr(strategy, "state", None) and strategy.state.memory.index) or {})
    disk = {part.name: sum(p.stat().st_size for p in part.rglob("*") if p.is_file())
            for part in work.glob("*")} if work.exists() else {}
    shutil.rmtree(work, ignore_errors=True)  # tens of GB at full size
    return {"strategy": args.strategy, "round_s": statistics.median(rounds),
            "server_s": statistics.median(servers),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "disk_gb": {k: v / 1e9 for k, v in disk.items()}, "remembered": remembered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--params", type=int, default=2_000_000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--fill", type=int, default=50, help="rounds asking clients in turn")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds, sampled")
    parser.add_argument("--dir", default="/tmp/fl_ugm_scale", help="ledger and memory (disk)")
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strategy:  # a child: one strategy
        random.seed(0)
        print(json.dumps(run_one(args)))
        return
    results = {}
    for name in STRATEGIES:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--strategy", name],
                               capture_output=False, stdout=subprocess.PIPE, text=True,
                               check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{args.clients} clients, {args.params:,} parameters (float32), {args.per_round} a "
          f"round; {args.fill} fill rounds, then the median of {args.rounds} sampled rounds")
    print("| strategy | round (s) | server's aggregate_train (s) | peak RSS (GiB) | disk (GB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        disk = ", ".join(f"{k} {v:.1f}" for k, v in r["disk_gb"].items()) or "—"
        print(f"| {name} | {r['round_s']:.2f} | {r['server_s']:.2f} | "
              f"{r['peak_rss_gib']:.2f} | {disk} |")
    avg = results["fedavg"]
    for name in STRATEGIES[1:]:
        ugm = results[name]
        print(f"{name} / fedavg: round time {ugm['round_s'] / avg['round_s']:.2f}x, server "
              f"time {ugm['server_s'] / avg['server_s']:.2f}x, peak RSS "
              f"{ugm['peak_rss_gib'] / avg['peak_rss_gib']:.2f}x; clients remembered at the "
              f"end: {ugm['remembered']}")


if __name__ == "__main__":
    main()
