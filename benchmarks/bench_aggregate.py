"""FedUGM.aggregate_train vs Flower's FedAvg.aggregate_train on the same client updates.

    python benchmarks/bench_aggregate.py [--clients 20] [--params 5000000] [--repeats 5]

Each client's update is a random Δ_t and Fisher F_t over a ≈5 M-parameter float32 model.
FedAvg receives the standard reply (``"arrays"`` = θ + Δ_t); FedUGM receives the UGM reply
(``"delta"`` and ``"fisher"``, twice the bytes). Both get identical Messages otherwise.
Prints median time per call (interleaved rounds), the ratio, and the peak extra memory
of one call (RSS high-water mark above the replies, in a fresh subprocess).
"""

from __future__ import annotations

import argparse

import torch
from _measure import (
    interleaved_medians,
    peak_growth_in_subprocess,
    report_peak_growth,
    train_message,
)
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fl_ugm import FedUGM


def make_replies(clients: int, params: int):
    """(global state, FedAvg replies, FedUGM replies) for the same client updates."""
    gen = torch.Generator().manual_seed(0)
    width = int((params / 4) ** 0.5)
    shapes = {"a.weight": (width, width), "a.bias": (width,), "b.weight": (width, 3 * width),
              "b.bias": (width,)}
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    fedavg, fedugm = [], []
    for node in range(1, clients + 1):
        delta = {k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        fisher = {k: torch.rand(s, generator=gen) for k, s in shapes.items()}
        metrics = MetricRecord({"num-examples": 100 + node, "train-loss": 1.0})
        fedavg.append(train_message(RecordDict({
            "arrays": ArrayRecord({k: state[k] + delta[k] for k in shapes}),
            "metrics": metrics}), src=node, dst=0, reply_to="x"))  # fmt: skip
        fedugm.append(train_message(RecordDict({
            "delta": ArrayRecord(delta), "fisher": ArrayRecord(fisher), "metrics": metrics}),
            src=node, dst=0, reply_to="x"))
    return state, fedavg, fedugm


def strategies(state, clients: int):
    fedavg = FedAvg(min_train_nodes=clients)
    fedugm = FedUGM(prior_precision=0.1, min_train_nodes=clients)
    fedugm.current_arrays = state  # what configure_train remembers each round
    return fedavg, fedugm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--params", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", choices=["fedavg", "fedugm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    state, fedavg_replies, fedugm_replies = make_replies(args.clients, args.params)
    fedavg, fedugm = strategies(state, args.clients)
    if args.memory_of:
        fedugm.aggregate_train(1, fedugm_replies[:2])  # numba: load the compiled kernel
        if args.memory_of == "fedavg":
            report_peak_growth(lambda: fedavg.aggregate_train(1, fedavg_replies))
        else:
            report_peak_growth(lambda: fedugm.aggregate_train(1, fedugm_replies))
        return
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    count = sum(t.numel() for t in state.values())
    print(f"K = {args.clients} replies x {count:,} float32 parameters "
          f"({4 * count / 2**20:.1f} MiB per model)")
    medians = interleaved_medians({
        "fedavg": lambda: fedavg.aggregate_train(1, fedavg_replies),
        "fedugm": lambda: fedugm.aggregate_train(1, fedugm_replies),
    }, args.repeats)  # fmt: skip
    print(f"{'strategy':26} {'median s':>9} {'x FedAvg':>9} {'peak extra MiB':>15}")
    for name, label in (("fedavg", "Flower FedAvg"), ("fedugm", "FedUGM")):
        extra = peak_growth_in_subprocess(__file__, name, args.clients, args.params)
        print(f"{label:26} {medians[name]:9.3f} {medians[name] / medians['fedavg']:8.2f}x "
              f"{extra / 2**20:15.1f}")


if __name__ == "__main__":
    main()
