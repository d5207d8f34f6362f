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

from _plain_loop import client_data, local_round

from fl_ugm.client_duals import next_dual, reported_delta
from fl_ugm.merge_rules import client_alphas, merge_round, merge_rule
from fl_ugm.server_optimizer import OptimizerState, server_step
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
    name = args.get("setting", "mnist")
    setting = SETTINGS[name]
    seed = int(args.get("seed", 100))
    rule_name, fisher_kind = args.get("rule", "ugm"), args.get("fisher", "sampled")
    delta, dual_step = float(args.get("delta", 10)), float(args.get("dual-step", 0))
    momentum, lr = float(args.get("momentum", 0)), float(args.get("lr", setting["lr"]))
    epochs, rounds = float(args.get("epochs", 1)), int(args.get("rounds", setting["rounds"]))
    if dual_step > 0 and not delta > 0:
        raise SystemExit("dual_probe: client duals need a prior delta > 0 (they divide by it).")
    torch.set_num_threads(2)
    inputs, labels, split, data = client_data(setting["task"], seed, test=setting["test"],
                                              server=setting["server"], clients=CLIENTS)
    torch.manual_seed(seed)
    model = tasks.build_model(setting["model"], inputs.shape[1], 10)
    rule = merge_rule(rule_name)
    duals: list[dict[str, torch.Tensor] | None] = [None] * CLIENTS
    velocity: OptimizerState = ()
    log = []
    for r in range(1, rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        deltas, fishers, sizes = local_round(setting["model"], start, data, seed=seed,
                                             server_round=r, lr=lr, epochs=epochs, prior=delta,
                                             fisher=fisher_kind, duals=duals)
        if dual_step > 0:
            for i, (step, fisher) in enumerate(zip(deltas, fishers, strict=True)):
                dual = duals[i] or {k: torch.zeros_like(f) for k, f in fisher.items()}
                curvature = fisher if rule_name == "ugm" else {
                    k: torch.zeros_like(f) for k, f in fisher.items()}  # FedDyn: F ≡ 0
                deltas[i] = reported_delta(step, curvature, delta, dual)
                duals[i] = next_dual(dual, step, delta, dual_step)
        alphas = client_alphas(sizes, "num-examples", 1.0)
        state, _ = merge_round(rule, start, deltas, fishers, sizes, alphas=alphas,
                               prior_precision=delta)
        if momentum > 0:
            state, velocity = server_step(start, state, velocity, optimizer="momentum",
                                          server_lr=1.0, server_momentum=momentum,
                                          server_round=r)
        model.load_state_dict(state)
        entry = {"round": r}
        for part, idx in (("val", split.server), ("test", split.test)):
            entry[part] = tasks.evaluate(model, inputs[idx], labels[idx]).accuracy
        log.append(entry)
    last = log[-setting["score_rounds"]:]
    scores = {f"{part}_score": sum(e[part] for e in last) / len(last) for part in ("val", "test")}
    print(json.dumps({"setting": name, "seed": seed, "rule": rule_name, "fisher": fisher_kind,
                      "delta": delta, "dual_step": dual_step, "momentum": momentum, "lr": lr,
                      "epochs": epochs, "rounds": rounds, **scores, "log": log}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
