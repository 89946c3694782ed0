"""CRD negatives drawn as RepDistiller draws them (issue 17, row 6).

RepDistiller b84f547 ``dataset/cifar100.py::CIFAR100InstanceSample`` draws each sample's K
negatives from ``cls_negative[target]`` with ``replace = k > len(cls_negative[target])``: a
uniformly random K-subset of the other classes' samples (no repeats) whenever the pool holds K,
and K draws with replacement otherwise. Its ImageNet loader always draws with replacement.
The expected figures below are computed from those definitions, not from kdflow's code.
"""
from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

from kdflow.methods.config import config_record, parse_config
from kdflow.methods.distillers.base import DataInfo
from kdflow.methods.distillers.crd import (CRD, CRDConfig, sample_other_class,
                                           sample_with_replacement)
from kdflow.methods.errors import ConfigError
from tiny_net import TinyNet

CIFAR_N, CIFAR_CLASSES, CIFAR_K, BATCH = 50_000, 100, 16_384, 64


def class_index(labels: torch.Tensor, num_classes: int):
    count = torch.bincount(labels, minlength=num_classes)
    return torch.argsort(labels, stable=True), torch.cumsum(count, 0) - count, count


def cifar_labels() -> torch.Tensor:
    """CIFAR-100's training labels' layout: 500 samples per class, in a shuffled order."""
    g = torch.Generator().manual_seed(0)
    return (torch.arange(CIFAR_N) % CIFAR_CLASSES)[torch.randperm(CIFAR_N, generator=g)]


def build_crd(labels: torch.Tensor, num_classes: int, **settings) -> CRD:
    cfg = parse_config(CRDConfig, settings, "study.methods.crd")
    info = DataInfo(labels.shape[0], labels, num_classes, (3, 8, 8))
    return CRD(TinyNet((4, 6), (2, 1)), TinyNet((6, 8), (1, 2)), cfg, info)


def test_cifar_scale_negatives_are_distinct_and_of_other_classes():
    """K = 16,384 of a 49,500-sample pool: official draws never repeat an index for one anchor
    (with replacement, 14.9 % of them would be repeats)."""
    torch.manual_seed(0)
    labels = cifar_labels()
    dist = build_crd(labels, CIFAR_CLASSES)
    index = torch.randperm(CIFAR_N)[:BATCH]
    idx = dist.contrast_indices(index)
    assert idx.shape == (BATCH, CIFAR_K + 1) and torch.equal(idx[:, 0], index)
    negatives = idx[:, 1:]
    assert (labels[negatives] != labels[index].unsqueeze(1)).all()
    assert all(row.unique().numel() == CIFAR_K for row in negatives)


def test_with_replacement_option_repeats_at_the_official_imagenet_rate():
    """``with_replacement`` (RepDistiller's ImageNet loader): the expected share of repeated
    indices per anchor is 1 - M (1 - (1 - 1/M)^K) / K for a pool of M samples."""
    torch.manual_seed(0)
    labels = cifar_labels()
    order, start, count = class_index(labels, CIFAR_CLASSES)
    anchors = labels[:BATCH]
    neg = sample_with_replacement(anchors, CIFAR_K, order, start, count)
    assert (labels[neg] != anchors.unsqueeze(1)).all()
    pool = CIFAR_N - CIFAR_N // CIFAR_CLASSES
    expected = 1 - pool * (1 - (1 - 1 / pool) ** CIFAR_K) / CIFAR_K
    repeats = 1 - sum(row.unique().numel() for row in neg) / (BATCH * CIFAR_K)
    assert repeats == pytest.approx(expected, abs=0.005)
    dist = build_crd(labels, CIFAR_CLASSES, negative_sampling="with_replacement")
    drawn = dist.contrast_indices(torch.arange(BATCH))[:, 1:]
    assert any(row.unique().numel() < CIFAR_K for row in drawn)


def test_k_equal_to_the_pool_draws_the_whole_pool():
    labels = torch.tensor([0, 2, 1, 2, 0, 0, 3, 2, 1, 3, 2, 0])
    order, start, count = class_index(labels, 4)
    for c in range(4):
        pool = sorted((labels != c).nonzero().flatten().tolist())
        rows = sample_other_class(torch.full((5,), c), len(pool), order, start, count)
        assert all(sorted(row.tolist()) == pool for row in rows)


def test_subsets_are_uniform_k_subsets_of_the_pool():
    """np.random.choice without replacement gives every K-subset the same chance: each pool
    sample is drawn with probability K/M, each pair with K(K-1)/(M(M-1)). With replacement
    a sample's chance would be 1 - (1 - 1/M)^K (0.298 instead of 0.333 here)."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1, 2, 0, 0, 3, 2, 1, 3, 2, 0])
    order, start, count = class_index(labels, 4)
    rows, k = 20_000, 3
    neg = sample_other_class(torch.zeros(rows, dtype=torch.long), k, order, start, count)
    pool = (labels != 0).nonzero().flatten().tolist()
    m = len(pool)
    assert all(len(set(row)) == k and set(row) <= set(pool) for row in neg.tolist())
    hits = torch.zeros(len(labels), len(labels), dtype=torch.float64)
    for row in neg.tolist():
        for a, b in combinations(row, 2):
            hits[a, b] += 1
            hits[b, a] += 1
    p1 = k / m
    sd1 = math.sqrt(p1 * (1 - p1) / rows)
    for s in pool:
        freq = (neg == s).any(dim=1).double().mean().item()
        assert abs(freq - p1) < 5 * sd1, (s, freq, p1)
    p2 = k * (k - 1) / (m * (m - 1))
    sd2 = math.sqrt(p2 * (1 - p2) / rows)
    for a, b in combinations(pool, 2):
        assert abs(hits[a, b].item() / rows - p2) < 5 * sd2, (a, b)


def test_anchor_draws_with_replacement_only_when_k_exceeds_its_pool():
    """Per anchor, as RepDistiller's ``replace = k > len(cls_negative[target])``: class 0 (10
    samples) has a pool of 2 < K = 5, class 1 (2 samples) a pool of 10 >= K."""
    torch.manual_seed(0)
    labels = torch.tensor([0] * 10 + [1] * 2)
    order, start, count = class_index(labels, 2)
    anchors = torch.tensor([0, 1] * 200)
    neg = sample_other_class(anchors, 5, order, start, count)
    small, large = neg[anchors == 0], neg[anchors == 1]
    assert set(small.flatten().tolist()) == {10, 11}
    assert all(len(set(row)) == 5 and max(row) < 10 for row in large.tolist())
    assert len(set(large.flatten().tolist())) == 10
    dist = build_crd(labels, 2, num_negatives=5)
    assert dist.short_pools
    assert not build_crd(labels, 2, num_negatives=2).short_pools


def test_draws_follow_the_seed_and_skip_the_fallback_when_pools_suffice():
    labels = cifar_labels()[:5000]
    order, start, count = class_index(labels, CIFAR_CLASSES)
    anchors = labels[:8]

    def draw(seed: int, fallback: bool) -> torch.Tensor:
        torch.manual_seed(seed)
        return sample_other_class(anchors, 1000, order, start, count, fallback)

    assert torch.equal(draw(3, True), draw(3, True))
    assert torch.equal(draw(3, True), draw(3, False))
    assert not torch.equal(draw(3, True), draw(4, True))


def test_default_is_without_replacement_and_keeps_job_records():
    cfg = parse_config(CRDConfig, None, "study.methods.crd")
    assert cfg.negative_sampling == "without_replacement"
    assert "negative_sampling" not in config_record(cfg)
    other = parse_config(CRDConfig, {"negative_sampling": "with_replacement"}, "m")
    assert config_record(other)["negative_sampling"] == "with_replacement"
    with pytest.raises(ConfigError) as err:
        parse_config(CRDConfig, {"negative_sampling": "distinct"}, "study.methods.crd")
    assert err.value.field == "study.methods.crd.negative_sampling"
    assert err.value.allowed == ["without_replacement", "with_replacement"]
