"""How the update screen's candidates separate flipped clients from honest ones: a plain-loop
probe (no Flower) of the main setting, the one docs/design.md §1 ("Defences") quotes.

    python benchmarks/screen_probe.py ATTACK SEED POLICY ATTACKERS [ROUNDS]
    python benchmarks/screen_probe.py flip 100 plain:0:3 1,2 > run.json

MNIST-5k, 10 clients, Dirichlet 0.1, MLP, 1 epoch of SGD at lr 0.05 from the global under
the prior δ = 1, sampled Fisher, Fisher clip 3, UGM merge, ``ROUNDS`` (20) rounds; the
clients in ``ATTACKERS`` (comma-separated partitions, "" for none) tamper with their reply
by ``ATTACK``: ``flip`` (−Δ), ``flip-inflate`` (−Δ, Fisher × 10⁶), ``scale10`` (Δ × 10),
``none``. ``POLICY`` decides who is merged each round: ``none`` (everyone), ``oracle`` (all
but the attackers), or ``METRIC:THRESHOLD[:BOUND]``: clients with cosine > THRESHOLD to the
coordinate-wise median are kept, and kept deltas longer than BOUND × the median norm are
scaled to it, both measured in METRIC: ``plain`` (Δ), ``fw`` ((δ + F_t) Δ_t / n_t, what the
merge adds up) or ``cw`` (Δ in the metric of the median client's per-example Fisher). Unlike
``fl_ugm.robust.UpdateScreen`` there is no cap on how many are dropped. Prints one JSON
object: the final test accuracy and per round the accuracy, who was kept, and every
client's cosines and norm ratios in each metric. The design doc's figures (2 CPU cores,
about 15 s a run):

    for seed in 100 101 102; do for policy in none oracle plain:0:3 plain:-0.2:3 cw:0:3; do
      python benchmarks/screen_probe.py none $seed $policy ""  > honest-$policy-$seed.json
      python benchmarks/screen_probe.py flip $seed $policy 1   > flip1-$policy-$seed.json
      python benchmarks/screen_probe.py flip $seed $policy 1,2 > flip2-$policy-$seed.json
    done; done
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _plain_loop import client_data, local_round

from fl_ugm.merge_rules import client_alphas, merge_round, merge_rule
from fl_ugm.robust import clip_fisher_inflation
from simulations import tasks

CLIENTS, PRIOR, LR = 10, 1.0, 0.05


def stacked(tensors: list[dict[str, torch.Tensor]], keys: list[str]) -> torch.Tensor:
    """One float64 row per client: its tensors ``keys`` flattened and joined."""
    return torch.stack([torch.cat([t[k].flatten() for k in keys]) for t in tensors]).double()


def cosines_and_norms(rows: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per row, cosine with the coordinate-wise median row and norm / the median norm."""
    centre = rows.median(dim=0).values
    norms = rows.norm(dim=1)
    return ((rows @ centre) / (norms * centre.norm() + 1e-30)).tolist(), (
        norms / norms.median()).tolist()


def main(argv: list[str]) -> int:
    attack, seed, policy = argv[0], int(argv[1]), argv[2]
    attackers = [int(a) for a in argv[3].split(",")] if argv[3] else []
    rounds = int(argv[4]) if len(argv) > 4 else 20
    torch.set_num_threads(2)
    inputs, labels, split, data = client_data("mnist5k", seed, test=1000, server=0,
                                              clients=CLIENTS)
    torch.manual_seed(seed)
    model = tasks.build_model("mlp", inputs.shape[1], 10)
    rule, log = merge_rule("ugm"), []
    for r in range(1, rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        deltas, fishers, sizes = local_round("mlp", start, data, seed=seed, server_round=r,
                                             lr=LR, epochs=1, prior=PRIOR)
        for i in attackers:
            if attack in ("flip", "flip-inflate"):
                deltas[i] = {k: -v for k, v in deltas[i].items()}
            if attack == "flip-inflate":
                fishers[i] = {k: v * 1e6 for k, v in fishers[i].items()}
            if attack == "scale10":
                deltas[i] = {k: 10 * v for k, v in deltas[i].items()}
        fishers, _ = clip_fisher_inflation(fishers, sizes, 3.0)
        keys = list(fishers[0])
        plain = stacked(deltas, keys)
        weighted = stacked([{k: (PRIOR + f[k]) * d[k] / n for k in keys}
                            for d, f, n in zip(deltas, fishers, sizes, strict=True)], keys)
        consensus = stacked([{k: f[k] / n for k in keys} for f, n in zip(fishers, sizes,
                                                                         strict=True)], keys)
        consensus = consensus.median(dim=0).values + PRIOR / sum(sizes) * 10
        stats = {"fw": cosines_and_norms(weighted), "plain": cosines_and_norms(plain),
                 "cw": cosines_and_norms(plain * consensus.sqrt())}
        keep = list(range(CLIENTS))
        if policy == "oracle":
            keep = [t for t in keep if t not in attackers]
        elif policy != "none":
            metric, threshold, *bound = policy.split(":")
            cosines, ratios = stats[metric]
            keep = [t for t in keep if cosines[t] > float(threshold)]
            for t in keep:
                if bound and float(bound[0]) and ratios[t] > float(bound[0]):
                    scale = float(bound[0]) / ratios[t]
                    deltas[t] = {k: v * scale for k, v in deltas[t].items()}
        alphas = client_alphas([sizes[t] for t in keep], "num-examples", 1.0)
        state, _ = merge_round(rule, start, [deltas[t] for t in keep],
                               [fishers[t] for t in keep], [sizes[t] for t in keep],
                               alphas=alphas, prior_precision=PRIOR)
        model.load_state_dict(state)
        accuracy = tasks.evaluate(model, inputs[split.test], labels[split.test]).accuracy
        entry = {"round": r, "acc": accuracy, "keep": keep}
        for metric, (cosines, ratios) in stats.items():
            entry[f"{metric}_cos"] = [round(v, 3) for v in cosines]
            entry[f"{metric}_norm"] = [round(v, 3) for v in ratios]
        log.append(entry)
    print(json.dumps({"attack": attack, "seed": seed, "policy": policy,
                      "final": log[-1]["acc"], "log": log}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
