"""Client memory under partial participation: a plain-loop probe (no Flower) of the
Fashion-MNIST benchmark's setting, the one docs/design.md §1 ("Client memory") quotes.

    python benchmarks/memory_probe.py [key=value ...] > run.json
    python benchmarks/memory_probe.py rule=ugm delta=100 memory=recentred seed=101

Fashion-MNIST (Debian's dataset-fashion-mnist), the small CNN, 100 clients with
Dirichlet(0.1) label skew, ``k`` [10] sampled per round (``random.Random(seed)``), 1 local
epoch of SGD (batch 32) at ``lr`` [0.1] under the prior δ = ``delta`` [1] (summed-loss
units), the sampled Fisher, merge ``rule`` [ugm] (``task-arithmetic``: the n-weighted
average, FedAvg's), then server momentum β = ``momentum`` [0], for ``rounds`` [30].
``memory`` [none]: ``recentred`` merges every other client's latest reply re-centred to the
current global (``fl_ugm.engine.ClientMemory``, what ``FedUGM(client_memory=True)`` does);
``stale`` merges the remembered Δ as they were sent (MIFA's memory; for ``task-arithmetic``
the two are the same). ``seed`` [100] fixes the split, partition, initial model, sampling
and minibatch orders. Scores on the 5,000 validation images; prints one JSON object: the
settings, the accuracy per round and the score (mean of the last 10 rounds).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _plain_loop import client_data, local_round

from fl_ugm.engine import ClientMemory, Contribution
from fl_ugm.merge_rules import client_alphas, merge_round, merge_rule
from fl_ugm.server_optimizer import server_step
from simulations import tasks

CLIENTS = 100
MEMORIES = ("none", "recentred", "stale")


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    seed, rule_name = int(args.get("seed", 100)), args.get("rule", "ugm")
    delta, lr = float(args.get("delta", 1)), float(args.get("lr", 0.1))
    momentum, memory_kind = float(args.get("momentum", 0)), args.get("memory", "none")
    rounds, per_round = int(args.get("rounds", 30)), int(args.get("k", 10))
    if memory_kind not in MEMORIES:
        raise SystemExit(f"memory_probe: memory={memory_kind!r}; choose one of {MEMORIES}.")
    torch.set_num_threads(1)  # two probes share the 2 cores
    inputs, labels, split, data = client_data("fmnist", seed, test=10000, server=5000,
                                              clients=CLIENTS)
    torch.manual_seed(seed)
    model = tasks.build_model("cnn", inputs.shape[1], 10)
    rule, sampler, memory = merge_rule(rule_name), random.Random(seed), ClientMemory()
    velocity, log = (), []
    for r in range(1, rounds + 1):
        chosen = sorted(sampler.sample(range(CLIENTS), per_round))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        deltas, fishers, sizes = local_round("cnn", start, [data[i] for i in chosen],
                                             seed=seed, server_round=r, lr=lr, epochs=1,
                                             prior=delta)
        if memory_kind != "none":
            remembered = memory.recentred(
                start, delta if memory_kind == "recentred" and rule.uses_fisher else None,
                sorted(set(memory.replies) - set(map(str, chosen))))
            memory = memory.remember(r, start, [
                Contribution(str(i), n, d, f)
                for i, d, f, n in zip(chosen, deltas, fishers, sizes, strict=True)])
            for _, item in remembered:
                deltas.append(item.delta)
                fishers.append(item.fisher)
                sizes.append(item.num_examples)
        state, _ = merge_round(rule, start, deltas, fishers, sizes,
                               alphas=client_alphas(sizes, "num-examples", 1.0),
                               prior_precision=delta)
        if momentum > 0:
            state, velocity = server_step(start, state, velocity, optimizer="momentum",
                                          server_lr=1.0, server_momentum=momentum,
                                          server_round=r)
        model.load_state_dict(state)
        log.append(tasks.evaluate(model, inputs[split.server], labels[split.server]).accuracy)
    print(json.dumps({"seed": seed, "rule": rule_name, "delta": delta, "lr": lr,
                      "memory": memory_kind, "momentum": momentum, "k": per_round,
                      "rounds": rounds, "val_score": sum(log[-10:]) / len(log[-10:]),
                      "val_accuracy": log}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
