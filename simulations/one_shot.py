"""One-shot merging of non-IID clients, as a plain loop without Flower.

Per seed: the server pretrains the global model θ on its own split; every client fine-tunes
from θ under the proximal prior δ (``prior_delta``), sends Δ_t = θ_t − θ and its sampled
Fisher F_t (a sum over its n_t examples); the server merges once and each merge is scored
on the test split. References: the pretrained θ and ``centralized`` (θ fine-tuned on the
union of the clients' data, same epochs, no prior).

Usage::

    python -m simulations.one_shot                      # configs/one_shot.yaml
    python -m simulations.one_shot prior_delta=[0.1,1,100] seeds=[0] out=results/sweep
    python -m simulations.one_shot --help                # every key, with defaults

Progress goes to stderr, a table of test accuracy (mean ± std over seeds, %) to stdout, and
``summary.json`` to ``out``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from fl_ugm.client import OPTIMIZERS, train_classifier
from fl_ugm.fisher import FISHER_KINDS, diagonal_fisher, iterate_batches
from fl_ugm.merge import fisher_averaging, task_arithmetic, ugm_merge, weighted_average
from simulations import runner, tasks
from simulations.runner import mean_std, plain, progress, write_json

DEFAULT_CONFIG = runner.CONFIGS / "one_shot.yaml"
CHOICES = {
    "task": tasks.TASKS,
    "model": tasks.MODELS,
    "partition": tasks.SCHEMES,
    "optimizer": OPTIMIZERS,
    "fisher": FISHER_KINDS,
}


def load_config(
    argv: Sequence[str] | None = None, paths: Sequence[Path] = (DEFAULT_CONFIG,),
    doc: str | None = __doc__,
) -> DictConfig:
    """The YAML defaults (later files override earlier ones) with ``key=value`` overrides
    merged on top (``simulations.runner.load_config``), checked."""
    cfg = runner.load_config(sys.argv[1:] if argv is None else argv, paths,
                             prog=Path(paths[-1]).stem, doc=doc)
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"one_shot: {key}={cfg[key]!r}; choose one of {allowed}.")
    for delta in prior_deltas(cfg):
        if not delta > 0:
            raise SystemExit(f"one_shot: prior_delta must be > 0, got {delta}.")
    return cfg


def prior_deltas(cfg: DictConfig) -> list[float]:
    """``prior_delta`` as a list (a scalar becomes a one-element sweep)."""
    value = cfg.prior_delta
    return [float(v) for v in value] if isinstance(value, ListConfig) else [float(value)]


def subtract(a: tasks.Params, b: tasks.Params) -> tasks.Params:
    """a − b, key by key."""
    return {k: a[k] - b[k] for k in a}


Merges = Callable[
    [tasks.Params, list[tasks.Params], list[tasks.Params], list[int], float],
    dict[str, tasks.Params],
]


def one_shot_merges(
    base: tasks.Params,
    deltas: list[tasks.Params],
    fishers: list[tasks.Params],
    sizes: list[int],
    prior_delta: float,
) -> dict[str, tasks.Params]:
    """The strategies compared in one shot, keyed by their result names."""
    alphas = [n / sum(sizes) for n in sizes]
    return {
        "fedavg": weighted_average(base, deltas, alphas=sizes),
        "task-arithmetic": task_arithmetic(base, deltas, alphas=[1.0] * len(deltas)),
        "fisher-averaging": fisher_averaging(base, deltas, fishers, alphas=alphas),
        "fedugm": ugm_merge(base, deltas, fishers, alphas=alphas, prior_precision=prior_delta),
    }


def run_seed(
    cfg: DictConfig,
    seed: int,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    merges: Merges = one_shot_merges,
    draw: int = 0,
) -> dict[str, tasks.Evaluation]:
    """One full one-shot experiment; returns the test evaluation of every merge. ``seed``
    fixes the data split, partition, initialisation and pretraining; ``draw`` the clients'
    minibatch orders and Fisher samples (draw 0: the seed's own)."""
    split = tasks.split_indices(
        len(labels), test=cfg.test_examples, server=cfg.server_examples, seed=seed
    )
    x_test, y_test = inputs[split.test], labels[split.test]
    pool_x, pool_y = inputs[split.clients], labels[split.clients]
    parts = tasks.partition(
        pool_y,
        cfg.num_clients,
        cfg.partition,
        seed,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size,
    )
    sizes = [len(p) for p in parts]
    progress(f"[seed {seed}] client sizes {sizes}")

    torch.manual_seed(seed)
    model = tasks.build_model(cfg.model, inputs.shape[1], int(labels.max()) + 1)
    train = {"batch_size": cfg.batch_size, "optimizer": cfg.optimizer}
    train_classifier(
        model, inputs[split.server], labels[split.server],
        epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=seed, **train,
    )  # fmt: skip
    base = tasks.get_params(model)
    results = {"pretrained": tasks.evaluate(model, x_test, y_test)}
    progress(f"[seed {seed}] pretrained on {len(split.server)}: "
             f"{results['pretrained'].accuracy:.3f}")

    union = torch.as_tensor(np.sort(np.concatenate(parts)), dtype=torch.long)
    train_classifier(
        model, pool_x[union], pool_y[union],
        epochs=cfg.local_epochs, lr=cfg.lr, seed=seed, **train,
    )  # fmt: skip
    results["centralized"] = tasks.evaluate(model, x_test, y_test)

    deltas_swept = prior_deltas(cfg)
    for delta in deltas_swept:
        client_deltas, fishers = [], []
        for t, part in enumerate(parts):
            tasks.set_params(model, base)
            idx = torch.as_tensor(part, dtype=torch.long)
            loss = train_classifier(
                model, pool_x[idx], pool_y[idx],
                epochs=cfg.local_epochs, lr=cfg.lr, prox_precision=delta, anchor=base,
                seed=seed * 1000 + t + 7919 * draw, **train,
            )  # fmt: skip
            fishers.append(
                diagonal_fisher(
                    model,
                    iterate_batches(pool_x[idx], pool_y[idx], cfg.fisher_batch_size),
                    kind=cfg.fisher,
                    generator=torch.Generator().manual_seed(seed * 1000 + t + 104729 * draw),
                )
            )
            client_deltas.append(subtract(tasks.get_params(model), base))
            progress(f"[seed {seed}] δ={delta:g} client {t}: n={len(part)}, train loss "
                     f"{loss:.3f}")

        merged = merges(base, client_deltas, fishers, sizes, delta)
        suffix = f"@delta={delta:g}" if len(deltas_swept) > 1 else ""
        for name, params in merged.items():
            tasks.set_params(model, params)
            results[name + suffix] = tasks.evaluate(model, x_test, y_test)
    return results


def format_table(per_seed: list[list[dict[str, tasks.Evaluation]]]) -> str:
    """Markdown table of test accuracy and loss, mean ± std over seeds (of each seed's mean
    over its draws); with several draws, the spread across draws: the std over one seed's
    draws, averaged over seeds."""
    draws = len(per_seed[0])
    spread = " spread across draws (points) |" if draws > 1 else ""
    lines = [f"| strategy | test accuracy (%) | test loss (nats) |{spread}",
             "|---|---|---|" + ("---|" if draws > 1 else "")]
    for name in per_seed[0][0]:
        acc = np.array([[r[name].accuracy for r in seed] for seed in per_seed])  # seeds x draws
        loss = [float(np.mean([r[name].loss for r in seed])) for seed in per_seed]
        row = f"| {name} | {mean_std(acc.mean(1).tolist(), 100, 2)} | {mean_std(loss, 1, 3)} |"
        if draws > 1:
            row += f" {100 * acc.std(1, ddof=1).mean():.2f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config(argv)
    torch.set_num_threads(cfg.threads)
    inputs, labels = tasks.load_task(cfg.task)
    if int(cfg.draws) < 1:
        raise SystemExit(f"one_shot: draws={cfg.draws}; give 1 or more.")
    start = time.perf_counter()
    per_seed = []
    for seed in cfg.seeds:
        per_seed.append([run_seed(cfg, int(seed), inputs, labels, draw=draw)
                         for draw in range(int(cfg.draws))])
        progress(f"[seed {seed}] done at {time.perf_counter() - start:.1f} s")
    wall = time.perf_counter() - start

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "strategies": {
            name: {
                "final_accuracy": [float(np.mean([r[name].accuracy for r in seed]))
                                   for seed in per_seed],
                "final_loss": [float(np.mean([r[name].loss for r in seed]))
                               for seed in per_seed],
                "accuracy_per_draw": [[r[name].accuracy for r in seed] for seed in per_seed],
            }
            for name in per_seed[0][0]
        },
        "config": plain(cfg),
        "wall_time_s": wall,
    }
    write_json(out / "summary.json", summary)
    print(format_table(per_seed))
    print(f"\n{len(per_seed)} seeds in {wall:.1f} s; summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
