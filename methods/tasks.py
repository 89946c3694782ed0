"""The learning tasks kdflow knows, and the conventions they share across layers."""
from __future__ import annotations

#: Image classification: logits (B, num_classes), labels (B,).
CLASSIFICATION = "classification"
#: Semantic segmentation: logits (B, num_classes, H, W), label maps (B, H, W).
SEGMENTATION = "segmentation"
TASKS = (CLASSIFICATION, SEGMENTATION)

#: Label of pixels that count in no class (boundaries, padding, void): excluded from losses
#: and from mIoU, as in Pascal VOC's files.
IGNORE_INDEX = 255
