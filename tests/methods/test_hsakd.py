"""HSAKD: rotation layout, loss oracles, auxiliary branches, gradient routing, teacher stages."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS, DataInfo, TeacherRequest
from kdflow.methods.distillers.hsakd import (  # importing it registers hsakd and hsakd_teacher
    HSAKD, HSAKDConfig, HSAKDTeacher, HSAKDTeacherConfig, hsakd_student_loss, hsakd_teacher_loss,
    joint_labels, rotate_batch)
from kdflow.methods.errors import ConfigError
from kdflow.methods.models import build_model, probe_taps
from kdflow.methods.models.aux_heads import AuxiliaryHeads, HSAKDNet, hsakd_tap_indices

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "method" / "hsakd.yaml"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def data_info(num_classes: int, side: int = 32) -> DataInfo:
    return DataInfo(8, torch.arange(8) % num_classes, num_classes, (3, side, side))


def teacher_trainer(model: str, num_classes: int, freeze: bool) -> HSAKDTeacher:
    """An HSAKDTeacher as the runner builds it (plain teacher only for the frozen variant)."""
    plain = build_model(model, num_classes) if freeze else None
    return HSAKDTeacher(build_model(model, num_classes), plain,
                        HSAKDTeacherConfig(freeze_backbone=freeze), data_info(num_classes))


def distiller(teacher: str, student: str, num_classes: int, **settings) -> HSAKD:
    cfg = parse_config(HSAKDConfig, settings, "study.methods.hsakd")
    return HSAKD(build_model(student, num_classes),
                 HSAKD.build_teacher(cfg, teacher, num_classes), cfg, data_info(num_classes))


def _sgd_step(params: List[torch.nn.Parameter], loss: torch.Tensor) -> None:
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---- rotations and joint labels ------------------------------------------------------------

def test_rotate_batch_interleaves_rotations_per_image():
    x = torch.randn(3, 2, 5, 5)
    r = rotate_batch(x)
    assert r.shape == (12, 2, 5, 5)
    assert torch.equal(r[0::4], x)
    for b in range(3):
        for j in range(4):
            assert torch.equal(r[4 * b + j], torch.rot90(x[b], j, dims=(1, 2)))
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert rotate_batch(img)[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # 90 deg counter-clockwise
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.randn(1, 3, 4, 6))


def test_joint_labels_are_class_major():
    assert joint_labels(torch.tensor([3, 0])).tolist() == [12, 13, 14, 15, 0, 1, 2, 3]


# ---- loss oracles (float64 loops) ----------------------------------------------------------

def _log_softmax(row: List[float], t: float = 1.0) -> List[float]:
    z = [v / t for v in row]
    m = max(z)
    log_sum = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - log_sum for v in z]


def _kl(t_row: List[float], s_row: List[float], temp: float) -> float:
    lt, ls = _log_softmax(t_row, temp), _log_softmax(s_row, temp)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


B, N, L = 3, 5, 2


def test_teacher_loss_matches_loop():
    y = torch.tensor([4, 0, 2])
    logits = torch.randn(4 * B, N, dtype=torch.float64)
    aux = [torch.randn(4 * B, 4 * N, dtype=torch.float64) for _ in range(L)]
    terms = hsakd_teacher_loss(logits, aux, y)
    ce = -sum(_log_softmax(logits[4 * b].tolist())[y[b]] for b in range(B)) / B
    aux_ce = 0.0
    for a in aux:  # (1/M) sum_j of the batch-mean CE on rotation j
        aux_ce += sum(-sum(_log_softmax(a[4 * b + j].tolist())[4 * y[b] + j] for b in range(B)) / B
                      for j in range(4)) / 4
    assert set(terms) == {"loss_ce", "loss_aux"}
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=1e-10)
    assert terms["loss_aux"].item() == pytest.approx(aux_ce, rel=1e-10)


@pytest.mark.parametrize("temp", [3.0, 1.5])
def test_student_loss_matches_loop(temp):
    y = torch.tensor([1, 3, 3])
    logits_s, logits_t = (torch.randn(4 * B, N, dtype=torch.float64) for _ in range(2))
    aux_s = [torch.randn(4 * B, 4 * N, dtype=torch.float64) for _ in range(L)]
    aux_t = [torch.randn(4 * B, 4 * N, dtype=torch.float64) for _ in range(L)]
    terms = hsakd_student_loss(logits_s, aux_s, logits_t, aux_t, y, temp)

    def rotation_average(s: torch.Tensor, t: torch.Tensor) -> float:
        per_rotation = [sum(_kl(t[4 * b + j].tolist(), s[4 * b + j].tolist(), temp)
                            for b in range(B)) / B for j in range(4)]
        return temp ** 2 * sum(per_rotation) / 4

    ce = -sum(_log_softmax(logits_s[4 * b].tolist())[y[b]] for b in range(B)) / B
    assert set(terms) == {"loss_ce", "loss_kl_aux", "loss_kl_main"}
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=1e-10)
    assert terms["loss_kl_aux"].item() == pytest.approx(
        sum(rotation_average(s, t) for s, t in zip(aux_s, aux_t)), rel=1e-10)
    assert terms["loss_kl_main"].item() == pytest.approx(rotation_average(logits_s, logits_t),
                                                         rel=1e-10)
    with pytest.raises(ValueError, match="auxiliary heads"):
        hsakd_student_loss(logits_s, aux_s, logits_t, aux_t[:1], y, temp)


# ---- auxiliary branches --------------------------------------------------------------------

FAMILY_MODELS = ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "MobileNetV2_hsakd", "ShuffleV1",
                 "ShuffleV2", "ResNet50", "resnet18", "mobilenet_v2"]
EXPECTED_L = {"resnet8": 3, "wrn_16_1": 3, "vgg8": 4, "MobileNetV2": 4, "MobileNetV2_hsakd": 4,
              "ShuffleV1": 3, "ShuffleV2": 3, "ResNet50": 4, "resnet18": 4, "mobilenet_v2": 4}


def _body_output(branch: torch.nn.Module, x: torch.Tensor, skip_last: int) -> torch.Tensor:
    for module in list(branch.body)[:len(branch.body) - skip_last]:
        x = module(x)
        x = x[0] if isinstance(x, tuple) else x
    return x


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_branches_shapes_structure_and_independence(name):
    model = build_model(name, 10).eval()
    heads = AuxiliaryHeads(model, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = heads(feats.stages)
        taps = [feats.stages[i] for i in model.hsakd_taps]
        # Every branch body (before its pre-pool module) ends at the last tap's shape, and the
        # stride-1 last stage keeps the resolution of the last tap.
        for branch, tap in zip(heads.branches, taps):
            assert _body_output(branch, tap, skip_last=1).shape == taps[-1].shape
    assert len(logits) == EXPECTED_L[name] == len(heads.branches)
    assert all(t.shape == (2, 40) and torch.isfinite(t).all() for t in logits)
    assert hsakd_tap_indices([s.shape[1] for s in feats.stages]) == model.hsakd_taps
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in heads.parameters()}
    # The copies are re-initialised, not the backbone's weights.
    first_copy = next(m for m in heads.branches[0].body[0].modules()
                      if isinstance(m, torch.nn.Conv2d))
    assert all(not torch.equal(first_copy.weight, p) for p in model.parameters()
               if p.shape == first_copy.weight.shape)


def test_vgg_branch_follows_the_64px_pool():
    model = build_model("vgg8", 10).eval()
    heads = AuxiliaryHeads(model, 10).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
        assert feats.stages[4].shape[2:] == (4, 4)
        assert _body_output(heads.branches[2], feats.stages[2], 1).shape == feats.stages[4].shape


def test_tap_indices_merge_runs_of_equal_width():
    assert hsakd_tap_indices([64, 128, 256, 512, 512]) == (0, 1, 2, 4)
    assert hsakd_tap_indices([16, 32, 64]) == (0, 1, 2)


def test_detached_heads_do_not_reach_the_backbone():
    model = build_model("resnet8", 10)
    heads = AuxiliaryHeads(model, 10, detach=True)
    sum(t.sum() for t in heads(model.forward_features(torch.randn(2, 3, 16, 16)).stages)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in heads.parameters())


# ---- the student distiller -----------------------------------------------------------------

def test_gradients_reach_student_and_heads_not_teacher():
    dist = distiller("resnet14", "resnet8", 10)
    dist.train()
    assert not dist.teacher.training and not dist.teacher.heads.training
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    logits, terms = dist(x, y, torch.arange(2))
    assert logits.shape == (2, 10)
    assert set(terms) == {"loss_ce", "loss_kl_aux", "loss_kl_main"}
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    terms["loss_kl_aux"].backward(retain_graph=True)  # aux KL alone reaches the student backbone
    assert dist.student.layer1[0].conv1.weight.grad.abs().sum() > 0
    sum(terms.values()).backward()
    assert all(p.grad is None for p in dist.teacher.parameters())
    assert all(p.grad is not None for p in dist.student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dist.heads.parameters())
    learnable = {id(p) for p in dist.learnable_parameters()}
    assert not learnable & {id(p) for p in dist.teacher.parameters()}
    assert {id(p) for p in dist.heads.parameters()} <= learnable
    assert dist.exported_model() is dist.student
    assert not dist.teacher.training


def test_teacher_request_and_round_trip_of_the_teacher_job_weights():
    assert HSAKD.teacher_request(HSAKDConfig()) == TeacherRequest("hsakd_teacher",
                                                                  {"freeze_backbone": False})
    assert HSAKD.teacher_request(HSAKDConfig(teacher_mode="frozen")).settings == {
        "freeze_backbone": True}
    for freeze in (False, True):
        trainer = teacher_trainer("resnet8", 10, freeze)
        saved = trainer.exported_model().state_dict()
        assert any(k.startswith("heads.") for k in saved)
        teacher = HSAKD.build_teacher(HSAKDConfig(), "resnet8", 10)
        assert isinstance(teacher, HSAKDNet)
        teacher.load_state_dict(saved, strict=True)
        x = torch.randn(2, 3, 16, 16)
        exported = trainer.exported_model().eval()
        teacher.eval()
        with torch.no_grad():
            (fa, aa), (fb, ab) = exported.forward_with_aux(x), teacher.forward_with_aux(x)
        assert torch.equal(fa.logits, fb.logits) and all(map(torch.equal, aa, ab))


# ---- the teacher trainer -------------------------------------------------------------------

def test_frozen_teacher_trainer_trains_heads_only():
    frozen = HSAKDTeacherConfig(freeze_backbone=True)
    assert HSAKDTeacher.teacher_request(frozen) == TeacherRequest()
    assert HSAKDTeacher.teacher_request(HSAKDTeacherConfig()) is None
    plain = build_model("resnet8", 10)
    trainer = HSAKDTeacher(build_model("resnet8", 10), plain, frozen, data_info(10))
    assert trainer.teacher is None
    backbone_before = _state(trainer.student)
    assert all(torch.equal(backbone_before[k], v) for k, v in plain.state_dict().items())
    heads_before = _state(trainer.heads)
    trainer.train()
    assert not trainer.student.training and trainer.heads.training
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 9])
    logits, terms = trainer(x, y, torch.arange(2))
    assert logits.shape == (2, 10) and set(terms) == {"loss_ce", "loss_aux"}
    params = trainer.learnable_parameters()
    assert {id(p) for p in params} == {id(p) for p in trainer.heads.parameters()}
    _sgd_step(params, sum(terms.values()))
    assert all(torch.equal(backbone_before[k], v) for k, v in trainer.student.state_dict().items())
    assert any(not torch.equal(heads_before[k], v) for k, v in trainer.heads.state_dict().items())


def test_joint_teacher_trainer_trains_backbone_and_heads():
    trainer = teacher_trainer("resnet8", 10, freeze=False)
    trainer.train()
    assert trainer.student.training
    backbone_before, heads_before = _state(trainer.student), _state(trainer.heads)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 9])
    _, terms = trainer(x, y, torch.arange(2))
    _sgd_step(trainer.learnable_parameters(), sum(terms.values()))
    assert not torch.equal(backbone_before["layer1.0.conv1.weight"],
                           trainer.student.layer1[0].conv1.weight)
    assert any(not torch.equal(heads_before[k], v) for k, v in trainer.heads.state_dict().items())


# ---- paper pairs and refused pairs ---------------------------------------------------------

# HSAKD's Table 1; its MobileNetV2 is HSAKD's own stride-1-stem variant.
PAPER_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet32x4", "resnet8x4"), ("wrn_40_2", "ShuffleV1"),
               ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2_hsakd"),
               ("ResNet50", "MobileNetV2_hsakd")]


@pytest.mark.parametrize("teacher,student", PAPER_PAIRS)
def test_paper_pairs_take_a_training_step(teacher, student):
    dist = distiller(teacher, student, 100)
    HSAKD.check_taps(dist.cfg, probe_taps(dist.teacher, (3, 32, 32)),
                     probe_taps(dist.student, (3, 32, 32)))
    dist.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 99])
    logits, terms = dist(x, y, torch.arange(2))
    loss = sum(terms.values())
    assert logits.shape == (2, 100) and torch.isfinite(loss)
    _sgd_step(dist.learnable_parameters(), loss)


def test_mismatched_aux_counts_are_refused():
    t = probe_taps(build_model("vgg13", 100), (3, 32, 32))
    s = probe_taps(build_model("resnet8x4", 100), (3, 32, 32))
    with pytest.raises(ConfigError) as err:
        HSAKD.check_taps(HSAKDConfig(), t, s)
    assert err.value.field == "teacher"
    assert "teacher has 4" in str(err.value) and "student 3" in str(err.value)
    with pytest.raises(ConfigError, match="teacher"):
        distiller("vgg8", "resnet8", 10)


# ---- configuration -------------------------------------------------------------------------

def test_registry_and_shipped_config():
    assert {"hsakd", "hsakd_teacher"} <= set(DISTILLERS.names())
    cfg = parse_config(HSAKDConfig, yaml.safe_load(CONFIG.read_text()), "study.methods.hsakd")
    assert (cfg.temperature, cfg.teacher_mode) == (3.0, "joint")
    assert HSAKD.display_name == "HSAKD" and HSAKDTeacher.display_name == "HSAKD teacher"


@pytest.mark.parametrize("cls,values,field", [
    (HSAKDConfig, {"temperature": 0.0}, "temperature"),
    (HSAKDConfig, {"temperature": -3}, "temperature"),
    (HSAKDConfig, {"teacher_mode": "other"}, "teacher_mode"),
    (HSAKDConfig, {"temprature": 3.0}, "temprature"),
    (HSAKDTeacherConfig, {"freeze_backbone": "yes"}, "freeze_backbone"),
])
def test_config_errors_name_the_field(cls, values, field):
    with pytest.raises(ConfigError) as err:
        parse_config(cls, values, "study.methods.hsakd")
    assert err.value.field == f"study.methods.hsakd.{field}"
    assert f"study.methods.hsakd.{field}" in str(err.value)
