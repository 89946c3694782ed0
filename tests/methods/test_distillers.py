"""Baseline distillers: loss oracles, gradient routing, CRD memory and sampling, config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS, DataInfo
from kdflow.methods.distillers.crd import (NCE_EPS, CRDConfig, contrast_scores, crd_nce_loss,
                                           momentum_update, sample_other_class)
from kdflow.methods.distillers.fitnet import FitNet, FitNetConfig, HintRegressor, hint_loss
from kdflow.methods.distillers.kd import KDConfig, kd_loss
from kdflow.methods.distillers.vanilla import Vanilla
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from tiny_net import TinyNet

NUM_CLASSES = 4
NUM_SAMPLES = 40
INPUT_SHAPE = (3, 8, 8)


def teacher_net() -> TinyNet:
    return TinyNet((6, 8, 12), (1, 2, 2))      # stages 6@8x8, 8@4x4, 12@2x2


def student_net() -> TinyNet:
    return TinyNet((4, 6), (2, 1))              # stages 4@4x4, 6@4x4


def data_info() -> DataInfo:
    labels = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(0)) % NUM_CLASSES
    return DataInfo(NUM_SAMPLES, labels, NUM_CLASSES, INPUT_SHAPE)


def batch(b: int = 6):
    x = torch.randn(b, *INPUT_SHAPE)
    index = torch.randperm(NUM_SAMPLES)[:b]
    return x, data_info().labels[index], index


def build(name: str, **settings):
    cls = DISTILLERS.get(name)
    cfg = parse_config(cls.Config, settings, f"study.methods.{name}")
    teacher = teacher_net() if cls.teacher_request(cls.Config()) is not None else None
    return cls(student_net(), teacher, cfg, data_info())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- loss oracles ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_loss_matches_loop(temperature):
    zs, zt = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        es = [math.exp(v / temperature) for v in zs[i].tolist()]
        et = [math.exp(v / temperature) for v in zt[i].tolist()]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(5))
    expected = temperature ** 2 * total / 3
    assert kd_loss(zs, zt, temperature).item() == pytest.approx(expected, rel=1e-10)


def test_hint_loss_matches_loop():
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    sq = [(x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())]
    assert hint_loss(a, b).item() == pytest.approx(sum(sq) / len(sq), rel=1e-12)


def test_crd_scores_and_nce_match_loop():
    n, d, temp, z = 10, 4, 0.5, 7.5
    memory = torch.randn(n, d, dtype=torch.float64)
    v = torch.randn(2, d, dtype=torch.float64)
    idx = torch.tensor([[3, 0, 5, 9], [7, 1, 1, 2]])
    probs = contrast_scores(memory, idx, v, temp) / z
    loss = crd_nce_loss(probs, n)
    k_pn = 3 / n
    total = 0.0
    for i in range(2):
        for k in range(4):
            dot = sum(memory[idx[i, k], j].item() * v[i, j].item() for j in range(d))
            p = math.exp(dot / temp) / z
            assert probs[i, k].item() == pytest.approx(p, rel=1e-12)
            total += math.log(p / (p + k_pn + NCE_EPS)) if k == 0 else \
                math.log(k_pn / (p + k_pn + NCE_EPS))
    assert loss.item() == pytest.approx(-total / 2, rel=1e-12)


def test_momentum_update_matches_formula():
    memory = torch.randn(6, 3, dtype=torch.float64)
    before = memory.clone()
    v, index = torch.randn(2, 3, dtype=torch.float64), torch.tensor([4, 1])
    momentum_update(memory, index, v, 0.5)
    for row, i in enumerate(index.tolist()):
        mixed = [0.5 * a + 0.5 * b for a, b in zip(before[i].tolist(), v[row].tolist())]
        norm = math.sqrt(sum(m * m for m in mixed))
        assert memory[i].tolist() == pytest.approx([m / norm for m in mixed], rel=1e-12)
    untouched = [0, 2, 3, 5]
    assert torch.equal(memory[untouched], before[untouched])


# ---- FitNet regressor and taps ---------------------------------------------------------------

@pytest.mark.parametrize("student_hw", [(2, 2), (4, 4), (5, 5), (8, 8)])
def test_hint_regressor_maps_to_teacher_shape(student_hw):
    reg = HintRegressor((3, *student_hw), (5, 4, 4))
    assert reg(torch.randn(2, 3, *student_hw)).shape == (2, 5, 4, 4)


def test_fitnet_check_taps_names_stage_counts():
    t = TapShapes(NUM_CLASSES, ((6, 8, 8), (8, 4, 4), (12, 2, 2)), 12)
    s = TapShapes(NUM_CLASSES, ((4, 4, 4), (6, 4, 4)), 6)
    FitNet.check_taps(FitNetConfig(hint_stage=1), t, s)
    with pytest.raises(ConfigError) as err:
        FitNet.check_taps(FitNetConfig(hint_stage=2), t, s)
    assert err.value.field == "hint_stage"
    assert "teacher has 3" in str(err.value) and "student 2" in str(err.value)
    with pytest.raises(ConfigError, match="hint_stage"):
        build("fitnet", hint_stage=2)


# ---- gradient routing, teacher mode, terms ---------------------------------------------------

@pytest.mark.parametrize("name,settings,terms,own", [
    ("vanilla", {}, {"loss_ce"}, []),
    ("kd", {}, {"loss_ce", "loss_kd"}, []),
    ("kd", {"ce_weight": 0.0}, {"loss_kd"}, []),
    ("fitnet", {}, {"loss_ce", "loss_hint"}, ["regressor"]),
    ("fitnet", {"hint_stage": 0}, {"loss_ce", "loss_hint"}, ["regressor"]),
    ("crd", {"num_negatives": 8}, {"loss_ce", "loss_crd"}, ["embed_s", "embed_t"]),
    ("crd", {"num_negatives": 8, "kd_weight": 1.0}, {"loss_ce", "loss_crd", "loss_kd"},
     ["embed_s", "embed_t"]),
])
def test_gradients_reach_student_and_method_not_teacher(name, settings, terms, own):
    dist = build(name, **settings)
    dist.train()
    if dist.teacher is not None:
        assert not dist.teacher.training
    x, y, index = batch()
    logits, out = dist(x, y, index)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert set(out) == terms
    assert all(t.dim() == 0 and torch.isfinite(t) for t in out.values())
    sum(out.values()).backward()
    if dist.teacher is not None:
        assert all(p.grad is None for p in dist.teacher.parameters())
        teacher_ids = {id(p) for p in dist.teacher.parameters()}
        assert not teacher_ids & {id(p) for p in dist.learnable_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dist.student.parameters())
    for module in own:
        for p in getattr(dist, module).parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, module


def test_kd_term_is_weighted_kd_loss():
    dist = build("kd", temperature=2.0, kd_weight=0.7)
    x, y, index = batch()
    logits, out = dist(x, y, index)
    expected = 0.7 * kd_loss(logits, dist.teacher(x), 2.0)
    assert out["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss_ce"].item() == pytest.approx(0.1 * F.cross_entropy(logits, y).item(), rel=1e-6)


def test_teacher_required_except_vanilla():
    with pytest.raises(ConfigError, match="teacher"):
        DISTILLERS.get("kd")(student_net(), None, KDConfig(), data_info())
    dist = Vanilla(student_net(), None, Vanilla.Config(), data_info())
    x, y, index = batch()
    assert set(dist(x, y, index)[1]) == {"loss_ce"}


# ---- CRD sampling, memory and Z ---------------------------------------------------------------

def _class_index(labels: torch.Tensor, num_classes: int):
    count = torch.bincount(labels, minlength=num_classes)
    return torch.argsort(labels, stable=True), torch.cumsum(count, 0) - count, count


def test_negatives_avoid_anchor_class_and_cover_the_rest():
    labels = torch.tensor([0, 2, 1, 2, 0, 0, 3, 2, 1, 3, 2, 0])
    order, start, count = _class_index(labels, 4)
    anchors = torch.arange(4).repeat_interleave(50)
    neg = sample_other_class(anchors, 200, order, start, count)
    assert neg.shape == (200, 200)
    for c in range(4):
        drawn = set(neg[anchors == c].flatten().tolist())
        assert drawn == set((labels != c).nonzero().flatten().tolist())


def test_negatives_fall_back_when_one_class_holds_everything():
    labels = torch.zeros(5, dtype=torch.long)
    order, start, count = _class_index(labels, 2)
    neg = sample_other_class(torch.zeros(3, dtype=torch.long), 100, order, start, count)
    assert neg.min() >= 0 and neg.max() <= 4 and len(set(neg.flatten().tolist())) == 5


def test_crd_contrast_indices():
    dist = build("crd", num_negatives=30)
    labels = data_info().labels
    _, _, index = batch()
    idx = dist.contrast_indices(index)
    assert idx.shape == (index.shape[0], 31)
    assert torch.equal(idx[:, 0], index)
    assert (labels[idx[:, 1:]] != labels[index].unsqueeze(1)).all()


def test_crd_memory_and_z():
    dist = build("crd", num_negatives=8, momentum=0.5)
    assert dist.z_s.item() == -1 and dist.z_t.item() == -1
    x, y, index = batch()

    dist.eval()
    before_s, before_t = dist.memory_s.clone(), dist.memory_t.clone()
    dist(x, y, index)
    assert torch.equal(dist.memory_s, before_s) and torch.equal(dist.memory_t, before_t)
    assert dist.z_s.item() == -1 and dist.z_t.item() == -1

    dist.train()
    with torch.no_grad():
        v_s = dist.embed_s(dist.student.forward_features(x).embedding)
    dist(x, y, index)
    z_s, z_t = dist.z_s.item(), dist.z_t.item()
    assert z_s > 0 and z_t > 0
    expected = F.normalize(0.5 * before_s[index] + 0.5 * v_s, dim=1)
    assert torch.allclose(dist.memory_s[index], expected, atol=1e-6)
    assert not torch.equal(dist.memory_t[index], before_t[index])
    others = torch.ones(NUM_SAMPLES, dtype=torch.bool)
    others[index] = False
    assert torch.equal(dist.memory_s[others], before_s[others])

    x2, y2, index2 = batch()
    dist(x2, y2, index2)
    assert (dist.z_s.item(), dist.z_t.item()) == (z_s, z_t)
    state = dist.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(state)
    assert "order" not in state


def test_crd_memory_init_range():
    dist = build("crd", feat_dim=12, num_negatives=4)
    bound = 1 / math.sqrt(12 / 3)
    assert dist.memory_s.shape == (NUM_SAMPLES, 12)
    assert dist.memory_s.abs().max() <= bound and dist.memory_t.abs().max() <= bound


# ---- config validation ----------------------------------------------------------------------

def test_registry_names():
    assert {"vanilla", "kd", "fitnet", "crd"} <= set(DISTILLERS.names())


@pytest.mark.parametrize("cls,values,field", [
    (KDConfig, {"temprature": 4.0}, "temprature"),
    (KDConfig, {"temperature": 0.0}, "temperature"),
    (KDConfig, {"temperature": -1.0}, "temperature"),
    (KDConfig, {"ce_weight": -0.1}, "ce_weight"),
    (FitNetConfig, {"hint_stage": -1}, "hint_stage"),
    (FitNetConfig, {"hint_stage": 1.5}, "hint_stage"),
    (CRDConfig, {"num_negatives": 0}, "num_negatives"),
    (CRDConfig, {"nce_temperature": 0}, "nce_temperature"),
    (CRDConfig, {"momentum": 1.0}, "momentum"),
    (CRDConfig, {"kd_temperature": -2}, "kd_temperature"),
    (Vanilla.Config, {"ce_weight": 0}, "ce_weight"),
])
def test_config_errors_name_the_field(cls, values, field):
    with pytest.raises(ConfigError) as err:
        parse_config(cls, values, "study.methods.m")
    assert err.value.field == f"study.methods.m.{field}"
    assert f"study.methods.m.{field}" in str(err.value)


def test_kd_config_defaults_and_message():
    cfg = parse_config(KDConfig, None, "study.methods.kd")
    assert (cfg.temperature, cfg.ce_weight, cfg.kd_weight) == (4.0, 0.1, 0.9)
    with pytest.raises(ConfigError, match=r"study\.methods\.kd\.temperature"):
        parse_config(KDConfig, {"temperature": 0}, "study.methods.kd")
