"""Held-out metrics per task, accumulated batch by batch and summed over ranks.

A :class:`TaskMetrics` keeps integer counts (so sums over batches and ranks are exact) and turns
them into the percentages papers report: top-1 / top-5 accuracy for classification; mean IoU
and pixel accuracy for segmentation, computed from one confusion matrix over the whole split
(not averaged per image), ``IGNORE_INDEX`` pixels excluded.
"""
from __future__ import annotations

from typing import Dict

import torch

from kdflow.methods.registry import Registry
from kdflow.methods.tasks import CLASSIFICATION, IGNORE_INDEX, SEGMENTATION


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts: entry [i, j] = pixels of true class i predicted as j.

    pred, target: int tensors of one shape (e.g. (B, H, W)); pixels whose target is
    ``ignore_index`` are left out.
    """
    keep = target != ignore_index
    pairs = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """(K,) float64 IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both the
    targets and the predictions (it counts in no mean)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU in percent over the classes that occur (in targets or predictions)."""
    return 100.0 * float(iou_per_class(confusion).nanmean())


class TaskMetrics:
    """Counts for one evaluation pass; ``primary`` names the metric a job is ranked by."""

    primary: str = ""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.counts = self.zeros(num_classes, device)

    @staticmethod
    def zeros(num_classes: int, device: torch.device) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:  # pragma: no cover
        """Add one batch: logits as the model returns them, y the batch's labels."""
        raise NotImplementedError

    def result(self, counts: torch.Tensor) -> Dict[str, float]:  # pragma: no cover
        """The metrics (percent) of ``counts`` (this pass's, or their sum over ranks)."""
        raise NotImplementedError


TASK_METRICS: Registry[type] = Registry("task", "task")


@TASK_METRICS.register(CLASSIFICATION)
class ClassificationMetrics(TaskMetrics):
    """top1, top5: accuracy in percent."""

    primary = "top1"

    @staticmethod
    def zeros(num_classes: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, samples

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.counts[0] += (top[:, 0] == y).sum()
        self.counts[1] += (top == y[:, None]).any(dim=1).sum()
        self.counts[2] += y.numel()

    def result(self, counts: torch.Tensor) -> Dict[str, float]:
        correct1, correct5, total = counts.tolist()
        return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


@TASK_METRICS.register(SEGMENTATION)
class SegmentationMetrics(TaskMetrics):
    """miou: mean IoU in percent over the split's confusion matrix; pixel_acc: the percentage of
    labelled pixels predicted right."""

    primary = "miou"

    @staticmethod
    def zeros(num_classes: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.counts += confusion_matrix(logits.argmax(dim=1), y, self.num_classes)

    def result(self, counts: torch.Tensor) -> Dict[str, float]:
        counts = counts.cpu()
        return {"miou": mean_iou(counts),
                "pixel_acc": 100.0 * float(counts.diag().sum()) / max(int(counts.sum()), 1)}


def primary_metric(task: str) -> str:
    """The metric jobs of ``task`` are compared by: ``top1`` or ``miou``."""
    return TASK_METRICS.get(task).primary


def headline(result: Dict) -> float:
    """The primary metric of a finished job's ``result.json`` (top1, or miou for segmentation)."""
    return result["metrics"][primary_metric(result.get("task", CLASSIFICATION))]
