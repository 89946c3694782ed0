"""Projection KD (standard / inverted) and the teacher-free spectral regulariser.

Loss oracles in float64 loops, the 4.2 decomposition identity, gradient routing, teacher
requests, the methods.md 1.6 zoo pairs and config errors.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from kdflow.methods.config import parse_config
from kdflow.methods.distillers.base import DISTILLERS, DataInfo, TeacherRequest
from kdflow.methods.distillers.projection import (ProjectionConfig, ProjectionKD, check_stage,
                                                  linear_projection_decomposition, projection_loss)
from kdflow.methods.distillers.spectral import SpectralConfig, SpectralReg, spectral_penalty
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.models.base import build_model
from tiny_net import TinyNet

NUM_CLASSES = 4
INPUT_SHAPE = (3, 8, 8)


def teacher_net() -> TinyNet:
    return TinyNet((6, 8, 12), (1, 2, 2))      # stages 6@8x8, 8@4x4, 12@2x2; embedding 12


def student_net() -> TinyNet:
    return TinyNet((4, 6), (2, 1))              # stages 4@4x4, 6@4x4; embedding 6


def data_info(num_classes: int = NUM_CLASSES, input_shape=INPUT_SHAPE) -> DataInfo:
    labels = torch.arange(20) % num_classes
    return DataInfo(20, labels, num_classes, input_shape)


def build(name: str, teacher: bool = True, **settings):
    cls = DISTILLERS.get(name)
    cfg = parse_config(cls.Config, settings, f"study.methods.{name}")
    return cls(student_net(), teacher_net() if teacher else None, cfg, data_info())


def batch(b: int = 5):
    return torch.randn(b, *INPUT_SHAPE), torch.randint(0, NUM_CLASSES, (b,)), torch.arange(b)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- float64 loop oracles ---------------------------------------------------------------------

def bilinear_loop(z: torch.Tensor, out_h: int, out_w: int) -> List[List[List[List[float]]]]:
    """Bilinear resize (align_corners=False, no antialias) of a (B, C, H, W) map, as lists."""
    b_n, c_n, in_h, in_w = z.shape

    def taps(dst: int, n_in: int, n_out: int):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    out = []
    for b in range(b_n):
        chans = []
        for c in range(c_n):
            rows = []
            for h in range(out_h):
                h0, h1, lh = taps(h, in_h, out_h)
                row = []
                for w in range(out_w):
                    w0, w1, lw = taps(w, in_w, out_w)
                    top = (1 - lw) * z[b, c, h0, w0].item() + lw * z[b, c, h0, w1].item()
                    bottom = (1 - lw) * z[b, c, h1, w0].item() + lw * z[b, c, h1, w1].item()
                    row.append((1 - lh) * top + lh * bottom)
                rows.append(row)
            chans.append(rows)
        out.append(chans)
    return out


def project_vec(weight: torch.Tensor, bias: torch.Tensor, v: Sequence[float]) -> List[float]:
    return [bias[o].item() + sum(weight[o, i].item() * v[i] for i in range(len(v)))
            for o in range(weight.shape[0])]


def err(a: Sequence[float], b: Sequence[float], distance: str) -> float:
    """The error of one feature vector, averaged over its channels."""
    return sum((x - y) ** 2 if distance == "mse" else abs(x - y) for x, y in zip(a, b)) / len(a)


def standardise_loop(rows: Sequence[Sequence[float]], eps: float = 1e-4) -> List[List[float]]:
    """Each channel of n feature vectors centred and divided by sqrt(biased variance + eps)."""
    n, c_n = len(rows), len(rows[0])
    out = [list(r) for r in rows]
    for c in range(c_n):
        mean = sum(r[c] for r in rows) / n
        var = sum((r[c] - mean) ** 2 for r in rows) / n
        for i in range(n):
            out[i][c] = (rows[i][c] - mean) / math.sqrt(var + eps)
    return out


def oracle(pairs: Sequence[Tuple[Sequence[float], Sequence[float]]], distance: str) -> float:
    """d over n (a, b) feature-vector pairs: mse / l1 averaged over the n vectors and their
    channels; log_bn_l4 = log sum |BN(a) - BN(b)|^4 (Simple-Recipe, methods.md 4.4)."""
    if distance == "log_bn_l4":
        a = standardise_loop([p[0] for p in pairs])
        b = standardise_loop([p[1] for p in pairs])
        return math.log(sum((x - y) ** 4 for ra, rb in zip(a, b) for x, y in zip(ra, rb)))
    return sum(err(a, b, distance) for a, b in pairs) / len(pairs)


def dense_oracle(z_s, z_t, conv: nn.Conv2d, direction: str, distance: str) -> float:
    w, bias = conv.weight[:, :, 0, 0], conv.bias
    b_n = z_s.shape[0]
    pairs = []
    if direction == "inverted":
        _, c_s, h_s, w_s = z_s.shape
        t = bilinear_loop(z_t, h_s, w_s)
        for b in range(b_n):
            for h in range(h_s):
                for x in range(w_s):
                    target = project_vec(w, bias, [t[b][c][h][x] for c in range(z_t.shape[1])])
                    pairs.append(([z_s[b, c, h, x].item() for c in range(c_s)], target))
        return oracle(pairs, distance)
    _, c_t, h_t, w_t = z_t.shape
    _, c_s, h_s, w_s = z_s.shape
    proj = torch.zeros(b_n, c_t, h_s, w_s, dtype=torch.float64)
    for b in range(b_n):
        for h in range(h_s):
            for x in range(w_s):
                proj[b, :, h, x] = torch.tensor(
                    project_vec(w, bias, [z_s[b, c, h, x].item() for c in range(c_s)]),
                    dtype=torch.float64)
    p = bilinear_loop(proj, h_t, w_t)
    for b in range(b_n):
        for h in range(h_t):
            for x in range(w_t):
                pairs.append(([p[b][c][h][x] for c in range(c_t)],
                              [z_t[b, c, h, x].item() for c in range(c_t)]))
    return oracle(pairs, distance)


@pytest.mark.parametrize("direction", ["inverted", "standard"])
@pytest.mark.parametrize("distance", ["mse", "l1", "log_bn_l4"])
@pytest.mark.parametrize("hw_s,hw_t", [((4, 4), (2, 2)), ((2, 3), (4, 4)), ((3, 3), (3, 3))])
def test_dense_projection_loss_matches_loop(direction, distance, hw_s, hw_t):
    c_s, c_t = 3, 5
    z_s = torch.randn(2, c_s, *hw_s, dtype=torch.float64)
    z_t = torch.randn(2, c_t, *hw_t, dtype=torch.float64)
    conv = (nn.Conv2d(c_t, c_s, 1) if direction == "inverted" else nn.Conv2d(c_s, c_t, 1)).double()
    loss = projection_loss(z_s, z_t, conv, direction, distance)
    expected = dense_oracle(z_s, z_t, conv, direction, distance)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("direction", ["inverted", "standard"])
@pytest.mark.parametrize("distance", ["mse", "l1", "log_bn_l4"])
def test_vector_projection_loss_matches_loop(direction, distance):
    d_s, d_t, n = 4, 7, 6
    z_s = torch.randn(n, d_s, dtype=torch.float64)
    z_t = torch.randn(n, d_t, dtype=torch.float64)
    lin = (nn.Linear(d_t, d_s) if direction == "inverted" else nn.Linear(d_s, d_t)).double()
    loss = projection_loss(z_s, z_t, lin, direction, distance)
    pairs = []
    for i in range(n):
        s, t = z_s[i].tolist(), z_t[i].tolist()
        if direction == "inverted":
            pairs.append((s, project_vec(lin.weight, lin.bias, t)))
        else:
            pairs.append((project_vec(lin.weight, lin.bias, s), t))
    assert loss.item() == pytest.approx(oracle(pairs, distance), rel=1e-10)


def test_mse_is_the_channel_summed_distance_of_4_2_divided_by_the_width():
    z_s = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    z_t = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    conv = nn.Conv2d(8, 5, 1).double()
    summed = 0.0                                   # (1/n) sum_vectors ||z_s - P(z_t)||^2
    for b in range(3):
        for h in range(2):
            for x in range(2):
                target = project_vec(conv.weight[:, :, 0, 0], conv.bias,
                                     [z_t[b, c, h, x].item() for c in range(8)])
                summed += sum((z_s[b, c, h, x].item() - target[c]) ** 2 for c in range(5))
    summed /= 3 * 2 * 2
    assert projection_loss(z_s, z_t, conv, "inverted", "mse").item() == \
        pytest.approx(summed / 5, rel=1e-10)


def numpy_penalty(rows: np.ndarray, keep: int, mode: str) -> float:
    centred = rows - rows.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    d = rows.shape[1]
    w = np.array([(0.0 if i <= keep else (1.0 if mode == "tail" else i / d))
                  for i in range(1, len(s) + 1)])
    return float((w * s ** 2).sum() / (s ** 2).sum())


@pytest.mark.parametrize("mode", ["tail", "soft"])
@pytest.mark.parametrize("keep", [1, 3, 10])
def test_spectral_penalty_matches_numpy_vectors(mode, keep):
    z = torch.randn(12, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    expected = numpy_penalty(z.numpy(), keep, mode)
    assert spectral_penalty(z, keep, mode).item() == pytest.approx(expected, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("mode", ["tail", "soft"])
def test_spectral_penalty_matches_numpy_pixel_vectors(mode):
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    rows = np.array([[z[b, c, h, w].item() for c in range(5)]
                     for b in range(2) for h in range(3) for w in range(4)])
    assert spectral_penalty(z, 2, mode).item() == pytest.approx(numpy_penalty(rows, 2, mode),
                                                                rel=1e-10)


def test_spectral_penalty_in_float32_under_autocast_and_wide_features():
    x = torch.randn(6, 10)
    lin = nn.Linear(10, 16)                          # n = 6 < d = 16: at most 5 nonzero values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        value = spectral_penalty(z, 2, "tail")
    assert value.dtype == torch.float32
    expected = numpy_penalty(z.float().detach().double().numpy(), 2, "tail")
    assert value.item() == pytest.approx(expected, rel=1e-4)
    value.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ---- the 4.2 decomposition ----------------------------------------------------------------------

@pytest.mark.parametrize("ridge", [0.0, 0.3, 5.0])
@pytest.mark.parametrize("n,d_t,rank_deficient", [(10, 4, False), (10, 6, True), (5, 8, False)])
def test_linear_projection_decomposition_identity(ridge, n, d_t, rank_deficient):
    d_s = 6
    z_s = torch.randn(n, d_s, dtype=torch.float64)
    z_t = torch.randn(n, d_t, dtype=torch.float64)
    if rank_deficient:
        z_t[:, -2:] = z_t[:, :2] * 2.0
    dec = linear_projection_decomposition(z_s, z_t, ridge)
    direct = (z_s - z_t @ dec.weight).square().sum() / n
    assert direct.item() == pytest.approx((dec.transfer + dec.spectral).item(), rel=1e-10)
    assert dec.transfer.item() >= 0 and dec.spectral.item() >= 0
    if ridge > 0:
        gram = z_t.T @ z_t + ridge * torch.eye(d_t, dtype=torch.float64)
        assert torch.allclose(dec.weight, torch.linalg.solve(gram, z_t.T @ z_s), atol=1e-10)
    else:
        assert torch.allclose(dec.weight, torch.linalg.pinv(z_t) @ z_s, atol=1e-9)
        assert dec.transfer.item() == 0.0
    # W* minimises the ridge objective: its gradient vanishes there
    w = dec.weight.clone().requires_grad_(True)
    (((z_s - z_t @ w).square().sum() + ridge * w.square().sum()) / n).backward()
    assert w.grad.abs().max().item() < 1e-10
    # and the inverted projection loss with that linear projector is the same number
    lin = nn.Linear(d_t, d_s, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(dec.weight.T)
    loss = projection_loss(z_s, z_t, lin, "inverted", "mse")
    assert loss.item() == pytest.approx(direct.item() / d_s, rel=1e-10)  # per element


# ---- distillers: shapes, gradients, teacher requests --------------------------------------------

@pytest.mark.parametrize("feature,inverted_shape,standard_shape", [
    ("stage", (6, 12, 1, 1), (12, 6, 1, 1)),       # student 6@4x4, teacher 12@2x2
    ("embedding", (6, 12), (12, 6)),
])
def test_projector_maps_the_configured_direction(feature, inverted_shape, standard_shape):
    inv = build("inverted_projection", feature=feature)
    std = build("inverted_projection", feature=feature, direction="standard")
    assert tuple(inv.projector.weight.shape) == inverted_shape
    assert tuple(std.projector.weight.shape) == standard_shape


@pytest.mark.parametrize("direction", ["inverted", "standard"])
@pytest.mark.parametrize("feature,stage", [("stage", -1), ("stage", 0), ("embedding", -1)])
@pytest.mark.parametrize("distance", ["mse", "l1", "log_bn_l4"])
def test_projection_gradients_reach_student_and_projector_not_teacher(direction, feature, stage,
                                                                      distance):
    dist = build("inverted_projection", direction=direction, feature=feature, stage=stage,
                 distance=distance)
    dist.train()
    assert not dist.teacher.training
    x, y, index = batch()
    logits, terms = dist(x, y, index)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert set(terms) == {"loss_ce", "loss_proj"}
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    terms["loss_proj"].backward()
    assert all(p.grad is None for p in dist.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dist.projector.parameters())
    assert dist.student.convs[0].weight.grad.abs().sum() > 0
    assert not {id(p) for p in dist.teacher.parameters()} & \
        {id(p) for p in dist.learnable_parameters()}
    assert not dist.teacher.training


def test_projection_term_is_weighted_loss():
    dist = build("inverted_projection", weight=0.25, ce_weight=0.0)
    x, y, index = batch()
    _, terms = dist(x, y, index)
    assert set(terms) == {"loss_proj"}
    expected = projection_loss(dist.student.forward_features(x).stages[-1],
                               dist.teacher.forward_features(x).stages[-1], dist.projector,
                               "inverted", "mse")
    assert terms["loss_proj"].item() == pytest.approx(0.25 * expected.item(), rel=1e-6)


def test_teacher_requests():
    assert ProjectionKD.teacher_request(ProjectionConfig()) == TeacherRequest()
    assert ProjectionKD.teacher_request(ProjectionConfig(teacher_init="random")) == \
        TeacherRequest(trained=False)
    assert SpectralReg.teacher_request(SpectralConfig()) is None
    with pytest.raises(ConfigError, match="teacher"):
        build("inverted_projection", teacher=False)


@pytest.mark.parametrize("settings", [
    {"keep": 2}, {"keep": 2, "mode": "soft"}, {"feature": "stage", "stage": 0, "keep": 1},
    {"feature": "stage", "keep": 3, "ce_weight": 0.0},
])
def test_spectral_reg_is_teacher_free_and_trains_the_student(settings):
    dist = build("spectral_reg", teacher=False, **settings)
    assert dist.teacher is None
    dist.train()
    x, y, index = batch(8)
    logits, terms = dist(x, y, index)
    assert logits.shape == (8, NUM_CLASSES)
    expected_terms = {"loss_spectral"} | ({"loss_ce"} if settings.get("ce_weight", 1) else set())
    assert set(terms) == expected_terms
    feats = dist.student.forward_features(x)
    z = feats.stages[dist.cfg.stage] if dist.cfg.feature == "stage" else feats.embedding
    assert terms["loss_spectral"].item() == pytest.approx(
        0.1 * spectral_penalty(z, dist.cfg.keep, dist.cfg.mode).item(), rel=1e-5)
    terms["loss_spectral"].backward()
    assert dist.student.convs[0].weight.grad.abs().sum() > 0


def test_registry_and_labels():
    assert DISTILLERS.get("inverted_projection") is ProjectionKD
    assert DISTILLERS.get("spectral_reg") is SpectralReg
    assert ProjectionKD.display_name == "Projection KD"
    assert SpectralReg.display_name == "Spectral reg."


# ---- the methods.md 1.6 pairs -------------------------------------------------------------------

PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"),
         ("resnet56", "resnet20"), ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
         ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1")]


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_zoo_pairs_train_one_step_both_directions(teacher_name, student_name):
    teacher, student = build_model(teacher_name, 100), build_model(student_name, 100)
    data = data_info(100, (3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    for direction in ("inverted", "standard"):
        cfg = parse_config(ProjectionConfig, {"direction": direction},
                           "study.methods.inverted_projection")
        dist = ProjectionKD(student, teacher, cfg, data)
        dist.train()
        opt = torch.optim.SGD(dist.learnable_parameters(), lr=0.01, momentum=0.9)
        before = dist.projector.weight.detach().clone()
        _, terms = dist(x, y, torch.arange(4))
        loss = sum(terms.values())
        assert torch.isfinite(loss), (direction, terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(p.grad is None for p in teacher.parameters())
        assert not torch.equal(dist.projector.weight, before)


# ---- config and tap errors ----------------------------------------------------------------------

@pytest.mark.parametrize("cls,values,field", [
    (ProjectionConfig, {"direction": "sideways"}, "direction"),
    (ProjectionConfig, {"distance": "cos"}, "distance"),
    (ProjectionConfig, {"feature": "logits"}, "feature"),
    (ProjectionConfig, {"stage": 1.5}, "stage"),
    (ProjectionConfig, {"weight": -1}, "weight"),
    (ProjectionConfig, {"weight": 0}, "weight"),
    (ProjectionConfig, {"ce_weight": -0.1}, "ce_weight"),
    (ProjectionConfig, {"teacher_init": "pretrained"}, "teacher_init"),
    (ProjectionConfig, {"projector": "mlp"}, "projector"),
    (SpectralConfig, {"keep": 0}, "keep"),
    (SpectralConfig, {"keep": 2.5}, "keep"),
    (SpectralConfig, {"mode": "hard"}, "mode"),
    (SpectralConfig, {"weight": -1}, "weight"),
    (SpectralConfig, {"feature": "logits"}, "feature"),
])
def test_config_errors_name_the_field(cls, values, field):
    prefix = "study.methods.inverted_projection" if cls is ProjectionConfig \
        else "study.methods.spectral_reg"
    with pytest.raises(ConfigError) as err:
        parse_config(cls, values, prefix)
    assert err.value.field == f"{prefix}.{field}"
    assert f"{prefix}.{field}" in str(err.value)


def test_config_defaults():
    cfg = parse_config(ProjectionConfig, None, "study.methods.inverted_projection")
    assert (cfg.direction, cfg.feature, cfg.stage, cfg.distance, cfg.weight, cfg.ce_weight,
            cfg.teacher_init) == ("inverted", "stage", -1, "mse", 1.0, 1.0, "trained")
    cfg = parse_config(SpectralConfig, None, "study.methods.spectral_reg")
    assert (cfg.feature, cfg.stage, cfg.keep, cfg.mode, cfg.weight, cfg.ce_weight) == \
        ("embedding", -1, 8, "tail", 0.1, 1.0)


def test_stage_must_exist_in_both_models():
    t = TapShapes(NUM_CLASSES, ((6, 8, 8), (8, 4, 4), (12, 2, 2)), 12)
    s = TapShapes(NUM_CLASSES, ((4, 4, 4), (6, 4, 4)), 6)
    for stage in (-2, -1, 0, 1):
        ProjectionKD.check_taps(ProjectionConfig(stage=stage), t, s)
    ProjectionKD.check_taps(ProjectionConfig(feature="embedding", stage=5), t, s)
    for stage in (2, -3):
        with pytest.raises(ConfigError) as err:
            ProjectionKD.check_taps(ProjectionConfig(stage=stage), t, s)
        assert err.value.field == "stage"
        assert "teacher has 3 stages" in str(err.value) and "student has 2 stages" in str(err.value)
    with pytest.raises(ConfigError, match="stage"):
        build("inverted_projection", stage=2)
    with pytest.raises(ConfigError, match="student has 2"):
        check_stage(2, {"student": 2})


def test_spectral_taps_checked():
    s = TapShapes(NUM_CLASSES, ((4, 4, 4), (6, 4, 4)), 6)
    SpectralReg.check_taps(SpectralConfig(keep=5), None, s)
    with pytest.raises(ConfigError) as err:
        SpectralReg.check_taps(SpectralConfig(keep=6), None, s)
    assert err.value.field == "keep"
    with pytest.raises(ConfigError) as err:
        SpectralReg.check_taps(SpectralConfig(feature="stage", stage=2, keep=1), None, s)
    assert err.value.field == "stage" and "student has 2 stages" in str(err.value)
    with pytest.raises(ConfigError, match="keep"):
        build("spectral_reg", teacher=False)             # default keep 8 >= embedding dim 6
