"""Client dual variables on top of FedUGM: a plain-loop probe (no Flower) of two issue-13
settings, the one docs/design.md §1 ("Client dual variables") quotes.

    python benchmarks/dual_probe.py [key=value ...] > run.json
    python benchmarks/dual_probe.py setting=finetune seed=100 delta=100 dual-step=1

Keys (defaults in brackets): ``setting`` [mnist] — ``mnist``: MNIST-5k, MLP, 500 validation
and 1,000 test digits, 20 rounds, lr 0.5, the score is the mean of the last 5 rounds;
``finetune``: the EfficientNet-Lite0 head on Fashion-MNIST features (opt-in installs, README
"Fine-tuning cases"), 5,000 validation and 10,000 test images, 5 rounds, lr 0.1, the score
is the mean over all rounds. Both: 10 clients, all every round, Dirichlet 0.1, ``epochs``
[1] local epochs of SGD (batch 32) at ``lr`` under the prior δ = ``delta`` [10] (summed-loss
units), ``fisher`` [sampled] Fisher, merge ``rule`` [ugm] (``task-arithmetic`` is FedAvg's
average), then server momentum β = ``momentum`` [0] on the merged step, for ``rounds``.
``dual-step`` ρ [0] > 0 gives every client a dual λ_t (``fl_ugm.client_duals``): it trains
on ℓ_t − ⟨λ_t, w⟩ + δ/2‖w − θ‖², reports Δ'_t = Δ_t − λ_t / (δ + F_t) (F ≡ 0 for task
arithmetic: FedDyn), then λ_t ← λ_t − ρδΔ_t. ``seed`` [100] fixes the split, partition,
initial model and minibatch orders. Prints one JSON object: the settings, per round the
validation and test accuracy, and the scores on both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_ugm.client import train_classifier
from fl_ugm.fisher import diagonal_fisher, iterate_batches
from fl_ugm.merge_rules import client_alphas, merge_round, merge_rule
from simulations import tasks

CLIENTS = 10
SETTINGS = {
    "mnist": {"task": "mnist5k", "model": "mlp", "test": 1000, "server": 500, "rounds": 20,
              "lr": 0.5, "score_rounds": 5},
    "finetune": {"task": "fmnist-efficientnet", "model": "efficientnet-head", "test": 10000,
                 "server": 5000, "rounds": 5, "lr": 0.1, "score_rounds": 5},
}


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    setting = SETTINGS[args.get("setting", "mnist")]
    seed = int(args.get("seed", 100))
    rule_name, fisher_kind = args.get("rule", "ugm"), args.get("fisher", "sampled")
    delta, dual_step = float(args.get("delta", 10)), float(args.get("dual-step", 0))
    momentum, lr = float(args.get("momentum", 0)), float(args.get("lr", setting["lr"]))
    epochs, rounds = float(args.get("epochs", 1)), int(args.get("rounds", setting["rounds"]))
    torch.set_num_threads(2)
    inputs, labels = tasks.load_task(setting["task"])
    split = tasks.split_indices(len(labels), test=setting["test"], server=setting["server"],
                                seed=seed,
                                official_test=tasks.OFFICIAL_TEST_EXAMPLES.get(setting["task"], 0))
    parts = tasks.partition(labels[split.clients], CLIENTS, "dirichlet", seed, alpha=0.1)
    data = [(inputs[idx], labels[idx]) for idx in
            (torch.as_tensor(split.clients[p], dtype=torch.long) for p in parts)]
    torch.manual_seed(seed)
    model = tasks.build_model(setting["model"], inputs.shape[1], 10)
    rule = merge_rule(rule_name)
    duals: list[dict[str, torch.Tensor] | None] = [None] * CLIENTS
    velocity: dict[str, torch.Tensor] | None = None
    log = []
    for r in range(1, rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        deltas, fishers, sizes = [], [], []
        for i, (x, y) in enumerate(data):
            local = tasks.build_model(setting["model"], inputs.shape[1], 10)
            local.load_state_dict(start)
            train_classifier(local, x, y, epochs=epochs, batch_size=32, lr=lr,
                             seed=seed * 100003 + 1009 * r + i, prox_precision=delta,
                             dual=duals[i])
            fisher = diagonal_fisher(local, iterate_batches(x, y, 256), kind=fisher_kind,
                                     generator=torch.Generator().manual_seed(r * 31 + i))
            step = {k: local.state_dict()[k] - v for k, v in start.items() if v.is_floating_point()}
            if dual_step > 0:
                if duals[i] is None:
                    duals[i] = {k: torch.zeros_like(f) for k, f in fisher.items()}
                curvature = {k: delta + (f if rule_name == "ugm" else 0 * f)
                             for k, f in fisher.items()}
                reported = {k: v - duals[i][k] / curvature[k] if k in fisher else v
                            for k, v in step.items()}
                duals[i] = {k: v - dual_step * delta * step[k] for k, v in duals[i].items()}
                step = reported
            deltas.append(step)
            fishers.append(fisher)
            sizes.append(len(y))
        alphas = client_alphas(sizes, "num-examples", 1.0)
        state, _ = merge_round(rule, start, deltas, fishers, sizes, alphas=alphas,
                               prior_precision=delta)
        if momentum > 0:
            update = {k: state[k] - start[k] for k in deltas[0]}
            velocity = update if velocity is None else {
                k: momentum * velocity[k] + update[k] for k in update}
            state = {k: start[k] + velocity[k] if k in velocity else state[k] for k in state}
        model.load_state_dict(state)
        entry = {"round": r}
        for name, idx in (("val", split.server), ("test", split.test)):
            entry[name] = tasks.evaluate(model, inputs[idx], labels[idx]).accuracy
        log.append(entry)
    last = log[-setting["score_rounds"]:]
    scores = {f"{name}_score": sum(e[name] for e in last) / len(last) for name in ("val", "test")}
    print(json.dumps({**args, "seed": seed, "rule": rule_name, "delta": delta,
                      "dual_step": dual_step, "momentum": momentum, "lr": lr, "epochs": epochs,
                      **scores, "log": log}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
