"""The plain federated loop (no Flower) that the probe scripts share: the clients' data and
one round of their local training, as the simulated ClientApp does it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fl_ugm.client import train_classifier
from fl_ugm.fisher import diagonal_fisher, iterate_batches
from simulations import tasks

Data = list[tuple[Tensor, Tensor]]


def client_data(task: str, seed: int, *, test: int, server: int, clients: int = 10,
                alpha: float = 0.1) -> tuple[Tensor, Tensor, tasks.Split, Data]:
    """(inputs, labels, the split, each client's (x, y)): ``task`` split by ``seed`` into
    ``server`` / client pool / ``test`` examples, the pool Dirichlet(``alpha``)-partitioned
    over ``clients``."""
    inputs, labels = tasks.load_task(task)
    split = tasks.split_indices(len(labels), test=test, server=server, seed=seed,
                                official_test=tasks.OFFICIAL_TEST_EXAMPLES.get(task, 0))
    parts = tasks.partition(labels[split.clients], clients, "dirichlet", seed, alpha=alpha)
    data = [(inputs[idx], labels[idx]) for idx in
            (torch.as_tensor(split.clients[p], dtype=torch.long) for p in parts)]
    return inputs, labels, split, data


def local_round(model: str, start: Mapping[str, Tensor], data: Data, *, seed: int,
                server_round: int, lr: float, epochs: float, prior: float,
                fisher: str = "sampled", duals: Sequence[Mapping[str, Tensor] | None] = ()
                ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], list[int]]:
    """(Δ_t of the float entries, F_t, n_t) per client: SGD (batch 32) from ``start`` under
    the prior δ = ``prior`` (and client t's dual ``duals[t]``, if given), then the
    ``fisher`` Fisher at θ_t (a sum over its examples)."""
    deltas, fishers, sizes = [], [], []
    for i, (x, y) in enumerate(data):
        local = tasks.build_model(model, x.shape[1], 10)
        local.load_state_dict(start)
        train_classifier(local, x, y, epochs=epochs, batch_size=32, lr=lr,
                         seed=seed * 100003 + 1009 * server_round + i, prox_precision=prior,
                         dual=duals[i] if duals else None)
        fishers.append(diagonal_fisher(
            local, iterate_batches(x, y, 256), kind=fisher,
            generator=torch.Generator().manual_seed(server_round * 31 + i)))
        deltas.append({k: v - start[k] for k, v in local.state_dict().items()
                       if v.is_floating_point()})
        sizes.append(len(y))
    return deltas, fishers, sizes
