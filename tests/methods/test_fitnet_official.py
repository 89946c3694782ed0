"""FitNet against the official code: RepDistiller ``train_student.py`` (--hint_layer 2),
``models/util.py::ConvReg`` and the official model files; mdistiller ``distillers/FitNet.py``.

Facts used, read from those files (never from kdflow's output):
* feats[k] shapes at 32 px of ``model(x, is_feat=True)`` per family (``models/*.py``);
* ConvReg's layers: 3x3/s2/p1 conv when H_s = 2 H_t, 4x4/s2/p1 transposed conv when
  2 H_s = H_t, a (1 + H_s - H_t) conv otherwise; PyTorch's default bias; BN(C_t); ReLU;
* the regressor sizes of the five CIFAR-100 pairs (conv weight + bias + BN weight + bias).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdflow.methods.config import config_record, parse_config
from kdflow.methods.distillers.base import DataInfo
from kdflow.methods.distillers.fitnet import (FitNet, FitNetConfig, HintRegressor, hint_index,
                                              select_hint)
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.models.base import build_model, count_parameters, probe_taps
from tiny_net import TinyNet

CIFAR = DataInfo(8, torch.arange(8) % 100, 100, (3, 32, 32))
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "method"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fitnet(teacher: nn.Module, student: nn.Module, data: DataInfo = CIFAR, **settings) -> FitNet:
    return FitNet(student, teacher, parse_config(FitNetConfig, settings, "study.methods.fitnet"),
                  data)


# ---- the hint layer: RepDistiller's feats[k] per family -----------------------------------------

# model -> {k: (C, H, W) of feats[k] at 32 px}, from RepDistiller's model files; relu: whether
# that file's feats are post-ReLU (ResNet, VGG, ShuffleNet) or block outputs without one
# (WRN's pre-activation blocks, MobileNetV2's linear bottlenecks).
OFFICIAL_FEATS = {
    "resnet8x4": ({0: (32, 32, 32), 1: (64, 32, 32), 2: (128, 16, 16), 3: (256, 8, 8)}, True),
    "resnet20": ({0: (16, 32, 32), 1: (16, 32, 32), 2: (32, 16, 16), 3: (64, 8, 8)}, True),
    "wrn_16_2": ({0: (16, 32, 32), 1: (32, 32, 32), 2: (64, 16, 16), 3: (128, 8, 8)}, False),
    "vgg8": ({0: (64, 32, 32), 1: (128, 16, 16), 2: (256, 8, 8), 3: (512, 4, 4),
              4: (512, 4, 4)}, True),
    "vgg13": ({1: (128, 16, 16), 2: (256, 8, 8), 4: (512, 4, 4)}, True),
    "MobileNetV2": ({0: (16, 16, 16), 1: (12, 16, 16), 2: (16, 8, 8), 3: (48, 4, 4),
                     4: (160, 2, 2)}, False),
    "ShuffleV1": ({0: (24, 32, 32), 1: (240, 16, 16), 2: (480, 8, 8), 3: (960, 4, 4)}, True),
    "ShuffleV2": ({0: (24, 32, 32), 1: (116, 16, 16), 2: (232, 8, 8), 3: (464, 4, 4)}, True),
    "ResNet50": ({0: (64, 32, 32), 1: (256, 32, 32), 2: (512, 16, 16), 4: (2048, 4, 4)}, True),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_FEATS))
def test_hint_layer_selects_repdistillers_feature(name):
    feats_k, post_relu = OFFICIAL_FEATS[name]
    model = build_model(name, 100).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    for k, shape in feats_k.items():
        index = hint_index(probe_taps(model, (3, 32, 32)), k)
        hint = select_hint(feats, index)
        assert tuple(hint.shape[1:]) == shape, (name, k)
        if index is not None and post_relu:
            assert torch.equal(hint, F.relu(feats.preact[index])), (name, k)
        elif index is not None:
            assert torch.equal(hint, feats.preact[index]), (name, k)


# ---- ConvReg: layers and parameter counts of the official pairs ----------------------------------

def conv_reg_size(c_s: int, c_t: int, kernel: int) -> int:
    """ConvReg's parameters: conv weight C_s*C_t*k*k + bias C_t, BN weight and bias 2*C_t."""
    return c_s * c_t * kernel * kernel + c_t + 2 * c_t


# teacher, student, feats[2] of each (official shapes), ConvReg conv (type, kernel, stride,
# padding), parameters: the first five are the published CIFAR-100 FitNet pairs.
PAIRS = [
    ("resnet32x4", "resnet8x4", (128, 16, 16), (128, 16, 16), (nn.Conv2d, 1, 1, 0), 16_768),
    ("wrn_40_2", "wrn_16_2", (64, 16, 16), (64, 16, 16), (nn.Conv2d, 1, 1, 0), 4_288),
    ("resnet56", "resnet20", (32, 16, 16), (32, 16, 16), (nn.Conv2d, 1, 1, 0), 1_120),
    ("resnet32x4", "ShuffleV1", (128, 16, 16), (480, 8, 8), (nn.ConvTranspose2d, 4, 2, 1),
     983_424),
    ("vgg13", "vgg8", (256, 8, 8), (256, 8, 8), (nn.Conv2d, 1, 1, 0), 66_304),
    ("vgg13", "MobileNetV2", (256, 8, 8), (16, 8, 8), (nn.Conv2d, 1, 1, 0),
     conv_reg_size(16, 256, 1)),
    ("resnet32x4", "ShuffleV2", (128, 16, 16), (232, 8, 8), (nn.ConvTranspose2d, 4, 2, 1),
     conv_reg_size(232, 128, 4)),
    ("wrn_40_2", "ShuffleV1", (64, 16, 16), (480, 8, 8), (nn.ConvTranspose2d, 4, 2, 1),
     conv_reg_size(480, 64, 4)),
    ("ResNet50", "MobileNetV2", (512, 16, 16), (16, 8, 8), (nn.ConvTranspose2d, 4, 2, 1),
     conv_reg_size(16, 512, 4)),
    ("ResNet50", "vgg8", (512, 16, 16), (256, 8, 8), (nn.ConvTranspose2d, 4, 2, 1),
     conv_reg_size(256, 512, 4)),
]


def test_published_sizes_follow_from_the_official_shapes():
    for _, _, t_shape, s_shape, (_, kernel, _, _), size in PAIRS[:5]:
        assert conv_reg_size(s_shape[0], t_shape[0], kernel) == size


@pytest.mark.parametrize("teacher_name,student_name,t_shape,s_shape,conv,size", PAIRS)
def test_regressor_is_official_convreg_on_official_maps(teacher_name, student_name, t_shape,
                                                        s_shape, conv, size):
    teacher, student = build_model(teacher_name, 100), build_model(student_name, 100)
    dist = fitnet(teacher, student)
    layer, kernel, stride, padding = conv
    reg = dist.regressor
    assert type(reg.conv) is layer
    assert (reg.conv.kernel_size, reg.conv.stride, reg.conv.padding) == \
        ((kernel, kernel), (stride, stride), (padding, padding))
    assert reg.conv.bias is not None
    assert isinstance(reg.bn, nn.BatchNorm2d) and reg.bn.num_features == t_shape[0]
    assert count_parameters(reg) == size

    seen: List[torch.Tensor] = []
    reg.register_forward_hook(lambda m, inp, out: seen.extend([inp[0], out]))
    dist.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))
    _, terms = dist(x, y, torch.arange(2))
    assert tuple(seen[0].shape[1:]) == s_shape and tuple(seen[1].shape[1:]) == t_shape
    assert (seen[1] >= 0).all()                                       # ConvReg ends in a ReLU
    target = [t for t in teacher.forward_features(x).stages if tuple(t.shape[1:]) == t_shape]
    assert len(target) == 1
    expected = 100.0 * F.mse_loss(seen[1], target[0].detach())
    assert terms["loss_hint"].item() == pytest.approx(expected.item(), rel=1e-6)


# ---- ConvReg in float64 loops ------------------------------------------------------------------

def conv_loop(x: List, w: torch.Tensor, bias: torch.Tensor, stride: int, pad: int) -> List:
    """Cross-correlation of nested-list (B, C_in, H, W) input with (C_out, C_in, kh, kw) weights."""
    b_n, c_in, h_in, w_in = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    c_out, _, kh, kw = w.shape
    h_out, w_out = (h_in + 2 * pad - kh) // stride + 1, (w_in + 2 * pad - kw) // stride + 1
    out = [[[[bias[o].item() for _ in range(w_out)] for _ in range(h_out)] for o in range(c_out)]
           for _ in range(b_n)]
    for b in range(b_n):
        for o in range(c_out):
            for i in range(h_out):
                for j in range(w_out):
                    for c in range(c_in):
                        for p in range(kh):
                            for q in range(kw):
                                r, s = i * stride - pad + p, j * stride - pad + q
                                if 0 <= r < h_in and 0 <= s < w_in:
                                    out[b][o][i][j] += w[o, c, p, q].item() * x[b][c][r][s]
    return out


def conv_transpose_loop(x: List, w: torch.Tensor, bias: torch.Tensor, stride: int,
                        pad: int) -> List:
    """Transposed convolution: every input pixel scatters ``w[c_in, c_out]`` at stride s."""
    b_n, c_in, h_in, w_in = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    _, c_out, kh, kw = w.shape
    h_out, w_out = (h_in - 1) * stride - 2 * pad + kh, (w_in - 1) * stride - 2 * pad + kw
    out = [[[[bias[o].item() for _ in range(w_out)] for _ in range(h_out)] for o in range(c_out)]
           for _ in range(b_n)]
    for b in range(b_n):
        for c in range(c_in):
            for i in range(h_in):
                for j in range(w_in):
                    for o in range(c_out):
                        for p in range(kh):
                            for q in range(kw):
                                r, s = i * stride - pad + p, j * stride - pad + q
                                if 0 <= r < h_out and 0 <= s < w_out:
                                    out[b][o][r][s] += w[c, o, p, q].item() * x[b][c][i][j]
    return out


def bn_relu_loop(z: List, bn: nn.BatchNorm2d) -> List:
    """Training-mode BatchNorm (batch mean, biased variance over B*H*W) and ReLU, per channel."""
    out = [[[row[:] for row in chan] for chan in sample] for sample in z]
    for c in range(len(z[0])):
        values = [v for sample in z for row in sample[c] for v in row]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        scale = bn.weight[c].item() / (var + bn.eps) ** 0.5
        for b, sample in enumerate(z):
            for i, row in enumerate(sample[c]):
                for j, v in enumerate(row):
                    out[b][c][i][j] = max(0.0, (v - mean) * scale + bn.bias[c].item())
    return out


@pytest.mark.parametrize("s_hw,t_hw,transpose,kernel", [
    (4, 4, False, 1), (8, 4, False, 3), (2, 4, True, 4), (6, 4, False, 3),
])
def test_convreg_and_hint_loss_match_loops(s_hw, t_hw, transpose, kernel):
    reg = HintRegressor((3, s_hw, s_hw), (4, t_hw, t_hw)).double().train()
    assert isinstance(reg.conv, nn.ConvTranspose2d) == transpose
    assert reg.conv.kernel_size == (kernel, kernel)
    with torch.no_grad():
        reg.bn.weight.uniform_(0.5, 1.5)
        reg.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, s_hw, s_hw, dtype=torch.float64)
    target = torch.rand(2, 4, t_hw, t_hw, dtype=torch.float64)
    if transpose:
        z = conv_transpose_loop(x.tolist(), reg.conv.weight, reg.conv.bias, 2, 1)
    elif s_hw == 2 * t_hw:
        z = conv_loop(x.tolist(), reg.conv.weight, reg.conv.bias, 2, 1)
    else:
        z = conv_loop(x.tolist(), reg.conv.weight, reg.conv.bias, 1, 0)
    out = bn_relu_loop(z, reg.bn)
    flat_out = [v for s in out for c in s for r in c for v in r]
    flat_target = target.flatten().tolist()
    expected = sum((a - b) ** 2 for a, b in zip(flat_out, flat_target)) / len(flat_target)
    got = F.mse_loss(reg(x), target)
    assert len(flat_out) == len(flat_target)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_fitnet_hint_term_matches_loops_through_the_distiller():
    teacher = TinyNet((6, 5, 7), (1, 2, 2))            # stages 6@8, 5@4, 7@2 on 8x8 inputs
    student = TinyNet((3, 4), (2, 2))                  # stages 3@4, 4@2: transposed ConvReg
    data = DataInfo(4, torch.arange(4) % 4, 4, (3, 8, 8))
    dist = fitnet(teacher, student, data, hint_weight=3.0, ce_weight=0.0).double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _, terms = dist(x, torch.zeros(2, dtype=torch.long), torch.arange(2))
    reg = dist.regressor
    hint_s = student.forward_features(x).stages[1].tolist()       # feats[2] = stage 1
    hint_t = teacher.forward_features(x).stages[1].flatten().tolist()
    out = bn_relu_loop(conv_transpose_loop(hint_s, reg.conv.weight, reg.conv.bias, 2, 1), reg.bn)
    flat = [v for s in out for c in s for r in c for v in r]
    expected = 3.0 * sum((a - b) ** 2 for a, b in zip(flat, hint_t)) / len(hint_t)
    assert set(terms) == {"loss_hint"}
    assert terms["loss_hint"].item() == pytest.approx(expected, rel=1e-10)


# ---- the inverted (teacher -> student) projector option -----------------------------------------

def test_inverted_projector_maps_teacher_hint_into_student_space():
    teacher = TinyNet((6, 5, 7), (1, 2, 2))            # hint 5@4x4
    student = TinyNet((3, 4), (2, 2))                  # hint 4@2x2
    data = DataInfo(4, torch.arange(4) % 4, 4, (3, 8, 8))
    dist = fitnet(teacher, student, data, direction="inverted", hint_weight=2.0).double()
    proj = dist.regressor
    assert type(proj) is nn.Conv2d and tuple(proj.weight.shape) == (4, 5, 1, 1)
    assert proj.bias is not None
    dist.train()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    _, terms = dist(x, y, torch.arange(3))
    z_s = student.forward_features(x).stages[1]
    z_t = teacher.forward_features(x).stages[1]
    total, count = 0.0, 0
    for b in range(3):
        for i in range(2):
            for j in range(2):
                # bilinear (align_corners=False) halving samples the middle of each 2x2 block
                t = [sum(z_t[b, c, 2 * i + p, 2 * j + q].item() for p in (0, 1) for q in (0, 1))
                     / 4 for c in range(5)]
                for o in range(4):
                    p_o = proj.bias[o].item() + sum(proj.weight[o, c, 0, 0].item() * t[c]
                                                    for c in range(5))
                    total += (z_s[b, o, i, j].item() - p_o) ** 2
                    count += 1
    assert terms["loss_hint"].item() == pytest.approx(2.0 * total / count, rel=1e-10)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert student.convs[0].weight.grad.abs().sum() > 0
    assert not {id(p) for p in teacher.parameters()} & \
        {id(p) for p in dist.learnable_parameters()}


def test_inverted_projector_accepts_sizes_convreg_refuses():
    t = TapShapes(4, ((6, 8, 8), (8, 8, 8)), 8)
    s = TapShapes(4, ((4, 2, 2), (6, 2, 2)), 6)
    with pytest.raises(ConfigError) as err:
        FitNet.check_taps(FitNetConfig(hint_stage=1), t, s)
    assert err.value.field == "hint_stage" and "direction: inverted" in str(err.value)
    FitNet.check_taps(FitNetConfig(hint_stage=1, direction="inverted"), t, s)


# ---- settings, plan-time checks, job records ---------------------------------------------------

def test_yaml_defaults_are_repdistillers_and_change_the_job_record():
    values = yaml.safe_load((CONFIG_DIR / "fitnet.yaml").read_text())
    cfg = parse_config(FitNetConfig, values, "study.methods.fitnet")
    assert (cfg.hint_layer, cfg.hint_stage, cfg.direction) == (2, None, "standard")
    assert config_record(cfg) == {"hint_layer": 2, "ce_weight": 1.0, "hint_weight": 100.0}
    inverted = parse_config(FitNetConfig, {**values, "direction": "inverted"}, "f")
    assert config_record(inverted)["direction"] == "inverted"


@pytest.mark.parametrize("values,field", [
    ({"hint_layer": -1}, "hint_layer"),
    ({"hint_layer": 1.5}, "hint_layer"),
    ({"hint_layer": True}, "hint_layer"),
    ({"hint_stage": -1}, "hint_stage"),
    ({"hint_stage": 1, "hint_layer": 3}, "hint_stage"),
    ({"direction": "sideways"}, "direction"),
])
def test_bad_settings_name_the_field(values, field):
    with pytest.raises(ConfigError) as err:
        parse_config(FitNetConfig, values, "study.methods.fitnet")
    assert err.value.field == f"study.methods.fitnet.{field}"


def test_hint_layer_is_checked_per_family_at_plan_time():
    t = TapShapes(4, ((6, 8, 8), (8, 4, 4), (12, 2, 2)), 12, stem=(6, 8, 8))
    s = TapShapes(4, ((4, 4, 4), (6, 4, 4)), 6, stem=(4, 4, 4))
    FitNet.check_taps(FitNetConfig(hint_layer=2), t, s)
    with pytest.raises(ConfigError) as err:
        FitNet.check_taps(FitNetConfig(hint_layer=3), t, s)
    assert err.value.field == "hint_layer" and "the student" in str(err.value)
    vgg = probe_taps(build_model("vgg13", 100), (3, 32, 32))
    assert vgg.stem_is_first_stage and len(vgg.stages) == 5
    FitNet.check_taps(FitNetConfig(hint_layer=4), vgg, vgg)
    with pytest.raises(ConfigError) as err:                   # VGG's feats[5] is the pooled vector
        FitNet.check_taps(FitNetConfig(hint_layer=5), vgg, vgg)
    assert err.value.field == "hint_layer" and "between 0 and 4" in str(err.value)
    resnet = probe_taps(build_model("resnet8x4", 100), (3, 32, 32))
    FitNet.check_taps(FitNetConfig(hint_layer=3), resnet, resnet)  # stem + 3 stages
    with pytest.raises(ConfigError, match="between 0 and 3"):
        FitNet.check_taps(FitNetConfig(hint_layer=4), resnet, resnet)


def test_convreg_size_ratio_is_refused_at_plan_time():
    teacher = probe_taps(build_model("resnet32x4", 100), (3, 32, 32))
    student = TapShapes(100, ((64, 8, 8), (128, 5, 5), (256, 2, 2)), 256, stem=(32, 8, 8))
    with pytest.raises(ConfigError, match="ConvReg") as err:
        FitNet.check_taps(FitNetConfig(), teacher, student)     # 5x5 against the teacher's 16x16
    assert err.value.field == "hint_layer"
    FitNet.check_taps(FitNetConfig(direction="inverted"), teacher, student)


def test_hint_layer_zero_is_the_stem_and_needs_one():
    dist = fitnet(build_model("resnet32x4", 100), build_model("resnet8x4", 100), hint_layer=0)
    assert (dist.teacher_index, dist.student_index) == (None, None)
    assert type(dist.regressor.conv) is nn.Conv2d and dist.regressor.conv.kernel_size == (1, 1)
    assert count_parameters(dist.regressor) == conv_reg_size(32, 32, 1)   # stems 32@32x32
    data = DataInfo(4, torch.arange(4) % 4, 4, (3, 8, 8))
    with pytest.raises(ConfigError, match="no stem"):
        fitnet(TinyNet((6, 5, 7), (1, 2, 2)), TinyNet((3, 4), (2, 2)), data, hint_layer=0)
