"""Hinton KD through torchdistill (bench/peer_torchdistill.py): it trains, and its loss is ours.

Tiny conv nets on 32x32 random images, batch 8, CPU, no DataLoader workers.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

PEER_PY = Path(__file__).resolve().parents[2] / "bench" / "peer_torchdistill.py"
NUM_CLASSES = 10
BATCH = 8
CPU = torch.device("cpu")


def load_peer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kdflow_bench_peer_torchdistill", PEER_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_net(width: int, stride: int) -> nn.Sequential:
    """(B, 3, 32, 32) -> logits (B, NUM_CLASSES), with a BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, NUM_CLASSES))


def make_models() -> tuple[nn.Module, nn.Module]:
    teacher = tiny_net(8, 1)
    bn = teacher[1]
    assert isinstance(bn, nn.BatchNorm2d)
    # Running statistics far from any batch's, so a teacher left in train mode gives other logits.
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    return teacher, tiny_net(4, 2)


def make_data(n: int) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, NUM_CLASSES, (n,)))


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_three_steps_train_student_only() -> None:
    torch.manual_seed(0)
    peer = load_peer()
    teacher, student = make_models()
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    # 16 samples = 2 batches per epoch, so the third step comes from a restarted loader.
    box = peer.build_kd_box(teacher, student, make_data(16), batch_size=BATCH, num_workers=0,
                            device=CPU)
    epochs = []
    start_epoch = box.pre_epoch_process

    def recorded(epoch: int, **kwargs) -> None:
        epochs.append(epoch)
        start_epoch(epoch=epoch, **kwargs)

    box.pre_epoch_process = recorded
    images, loss = peer.run_steps(box, 3, CPU)

    assert images == 3 * BATCH
    assert isinstance(loss, float) and math.isfinite(loss)
    assert epochs == [0, 1]  # the first pass ended, the second began
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # parameters and BN running statistics
        torch.testing.assert_close(value, teacher_before[name], rtol=0, atol=0)
    student_params = dict(student.named_parameters())
    assert all(p.requires_grad for p in student_params.values())
    assert all(not torch.equal(student_params[name], student_before[name])
               for name in student_params), "every student parameter gets an SGD step"


@pytest.mark.parametrize("temperature,ce_weight,kd_weight",
                         [(4.0, 0.1, 0.9), (2.0, 0.0, 1.0)])
def test_loss_is_weighted_ce_plus_t2_kl(temperature: float, ce_weight: float,
                                        kd_weight: float) -> None:
    torch.manual_seed(1)
    peer = load_peer()
    teacher, student = make_models()
    data = make_data(BATCH)  # exactly one batch: the sampler's shuffle only reorders it
    x, y = data.tensors
    ref_teacher, ref_student = copy.deepcopy(teacher).eval(), copy.deepcopy(student).train()
    with torch.no_grad():
        t_logits, s_logits = ref_teacher(x), ref_student(x)
        ce = F.cross_entropy(s_logits, y)
        kl = F.kl_div(F.log_softmax(s_logits / temperature, dim=1),
                      F.softmax(t_logits / temperature, dim=1), reduction="batchmean")
        expected = ce_weight * ce + kd_weight * temperature ** 2 * kl

    box = peer.build_kd_box(teacher, student, data, batch_size=BATCH, num_workers=0, device=CPU,
                            temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)
    images, loss = peer.run_steps(box, 1, CPU)

    assert images == BATCH
    torch.testing.assert_close(torch.tensor(loss), expected)
