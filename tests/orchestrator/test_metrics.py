"""mIoU and pixel accuracy against a direct per-class computation on random label maps."""
import math

import torch

from kdflow.methods.tasks import IGNORE_INDEX
from kdflow.orchestrator.metrics import (ClassificationMetrics, SegmentationMetrics,
                                         confusion_matrix, mean_iou)


def direct_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """IoU per class from pixel sets, ignored pixels dropped, classes absent from both skipped."""
    keep = target != IGNORE_INDEX
    ious = []
    for c in range(num_classes):
        p, t = (pred == c) & keep, (target == c) & keep
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return 100.0 * sum(ious) / len(ious)


def test_miou_matches_a_direct_computation_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        k = int(torch.randint(2, 12, (1,), generator=gen))
        target = torch.randint(0, k, (3, 17, 23), generator=gen)
        pred = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target,
                           torch.randint(0, k, target.shape, generator=gen))
        target[torch.rand(target.shape, generator=gen) < 0.2] = IGNORE_INDEX
        if trial % 3 == 0:  # a class present in neither map
            pred[pred == k - 1] = 0
            target[target == k - 1] = 0
        got = mean_iou(confusion_matrix(pred, target, k))
        assert math.isclose(got, direct_miou(pred, target, k), rel_tol=1e-9)


def test_ignored_pixels_never_count_whatever_is_predicted_there():
    target = torch.tensor([[0, 1, IGNORE_INDEX, IGNORE_INDEX]])
    right = torch.tensor([[0, 1, 0, 0]])
    wrong_on_ignored = torch.tensor([[0, 1, 1, 1]])
    a, b = confusion_matrix(right, target, 2), confusion_matrix(wrong_on_ignored, target, 2)
    assert torch.equal(a, b) and int(a.sum()) == 2
    assert mean_iou(a) == 100.0


def test_segmentation_metrics_accumulate_over_batches_as_one_split():
    gen = torch.Generator().manual_seed(1)
    k = 5
    target = torch.randint(0, k, (6, 8, 8), generator=gen)
    target[:, 0] = IGNORE_INDEX
    logits = torch.randn(6, k, 8, 8, generator=gen)
    metrics = SegmentationMetrics(k, torch.device("cpu"))
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        metrics.update(logits[rows], target[rows])
    result = metrics.result(metrics.counts)
    pred = logits.argmax(1)
    assert math.isclose(result["miou"], direct_miou(pred, target, k), rel_tol=1e-9)
    keep = target != IGNORE_INDEX
    assert math.isclose(result["pixel_acc"],
                        100.0 * (pred[keep] == target[keep]).float().mean().item(), rel_tol=1e-6)


def test_classification_metrics_are_top1_and_top5():
    logits = torch.eye(6)[[0, 1, 2, 3]] * 10
    metrics = ClassificationMetrics(6, torch.device("cpu"))
    metrics.update(logits, torch.tensor([0, 1, 5, 3]))
    assert metrics.result(metrics.counts) == {"top1": 75.0, "top5": 100.0}
