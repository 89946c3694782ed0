"""Every distiller runs its teacher once per batch, under ``torch.inference_mode``: the
teacher's output feeds all of the method's losses without a second forward pass."""
from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS, DataInfo
from kdflow.methods.tasks import CLASSIFICATION

#: 16 px images (the CIFAR zoo takes them): the pass count does not depend on the size, and
#: HSAKD's four rotations of each image make its step 5x slower at 32 px.
INFO = DataInfo(num_samples=64, labels=torch.randint(0, 100, (64,)), num_classes=100,
                input_shape=(3, 16, 16))
WITH_TEACHER = sorted(name for name in DISTILLERS.names()
                      if CLASSIFICATION in DISTILLERS.get(name).tasks
                      and DISTILLERS.get(name).teacher_request(
                          parse_config(DISTILLERS.get(name).Config, {}, name)) is not None)


def test_the_methods_with_a_teacher_are_all_checked() -> None:
    assert set(WITH_TEACHER) == {"kd", "fitnet", "crd", "msdcrd", "hsakd", "stablekd",
                                 "inverted_projection"}


@pytest.mark.parametrize("method", WITH_TEACHER)
def test_one_teacher_pass_per_batch_in_inference_mode(method: str) -> None:
    cls = DISTILLERS.get(method)
    cfg = parse_config(cls.Config, {"num_negatives": 16} if method == "crd" else {}, method)
    teacher = cls.build_teacher(cfg, "resnet32x4", INFO.num_classes)
    student = cls.build_student(cfg, "resnet8x4", INFO.num_classes)
    distiller = cls(student, teacher, cfg, INFO).train()
    stem = next(m for m in teacher.modules() if isinstance(m, nn.Conv2d))
    passes: List[bool] = []
    stem.register_forward_hook(lambda *_: passes.append(torch.is_inference_mode_enabled()))
    index = torch.arange(8)
    for phase_epoch in ([0, 500, 999] if method == "stablekd" else [None]):
        if phase_epoch is not None:
            distiller.start_epoch(phase_epoch, 1000)
        passes.clear()
        _, terms = distiller(torch.randn(8, *INFO.input_shape), INFO.labels[index], index)
        sum(terms.values()).backward()
        assert passes == [True], (method, phase_epoch)
