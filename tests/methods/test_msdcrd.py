"""MSDCRD ([KDFLOW] reference design): loss oracles, decoupling (grid and sliding windows),
parameter-free width matching, gradient routing, zoo pairs, tap checks and config errors."""
from __future__ import annotations

import math
from typing import Any, List, Sequence

import pytest
import torch
import torch.nn.functional as F

import kdflow.methods.distillers.msdcrd  # noqa: F401  (registers "msdcrd")
from kdflow.methods.config import config_record, parse_config
from kdflow.methods.distillers.base import DISTILLERS, DataInfo, TeacherRequest
from kdflow.methods.distillers.kd import kd_loss
from kdflow.methods.distillers.msdcrd import (MSDCRD, MSDCRDConfig, common_size, decouple,
                                              feature_contrast, local_pairs, match_widths,
                                              msdcrd_terms, sample_contrast, slide)
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.models.base import build_model, probe_taps
from tiny_net import TinyNet

NUM_CLASSES = 4
INPUT_SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- float64 loop oracles ----------------------------------------------------------------------

def _normalise(vec: List[float]) -> List[float]:
    norm = math.sqrt(sum(a * a for a in vec))
    return [a / norm for a in vec]


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def oracle_pool(f: torch.Tensor, s: int) -> List[List[List[float]]]:
    """[image][location (row-major)][channel] means over PyTorch's adaptive pooling windows."""
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        locs = []
        for r in range(s):
            r0, r1 = (r * h) // s, -((-(r + 1) * h) // s)
            for k in range(s):
                c0, c1 = (k * w) // s, -((-(k + 1) * w) // s)
                cells = [(y, x) for y in range(r0, r1) for x in range(c0, c1)]
                locs.append([sum(f[i, ch, y, x].item() for y, x in cells) / len(cells)
                             for ch in range(c)])
        out.append(locs)
    return out


def oracle_sample(u: torch.Tensor, v: torch.Tensor, tau: float, labels: List[int] | None,
                  class_mask: str, negatives: str) -> float:
    b, p, _ = u.shape
    un = [[_normalise(u[i, q].tolist()) for q in range(p)] for i in range(b)]
    vn = [[_normalise(v[i, q].tolist()) for q in range(p)] for i in range(b)]

    def one_side(anchor, cand) -> float:
        total = 0.0
        for i in range(b):
            for loc in range(p):
                pos, den = [], []
                for j in range(b):
                    same_class = class_mask != "none" and labels[j] == labels[i]
                    for q in range(p):
                        if negatives == "same_location" and q != loc:
                            continue
                        score = _dot(anchor[i][loc], cand[j][q]) / tau
                        if j == i:
                            if q == loc:
                                pos.append(score)
                                den.append(score)
                        elif same_class:
                            if class_mask == "same_class_positive" and q == loc:
                                pos.append(score)
                                den.append(score)
                        else:
                            den.append(score)
                log_z = math.log(sum(math.exp(d) for d in den))
                total += -sum(s - log_z for s in pos) / len(pos)
        return total / (b * p)

    return 0.5 * (one_side(un, vn) + one_side(vn, un))


def oracle_feature(u: torch.Tensor, v: torch.Tensor, tau: float) -> float:
    b, p, c = u.shape

    def one_side(anchor, cand) -> float:
        total = 0.0
        for q in range(p):
            a_ch = [_normalise([anchor[i, q, ch].item() for i in range(b)]) for ch in range(c)]
            c_ch = [_normalise([cand[i, q, ch].item() for i in range(b)]) for ch in range(c)]
            for ch in range(c):
                scores = [_dot(a_ch[ch], c_ch[d]) / tau for d in range(c)]
                total += -(scores[ch] - math.log(sum(math.exp(s) for s in scores)))
        return total / (c * p)

    return 0.5 * (one_side(u, v) + one_side(v, u))


# ---- pure functions vs the oracles -------------------------------------------------------------

@pytest.mark.parametrize("shape,scales", [((2, 3, 8, 8), [1, 2, 4]), ((2, 3, 6, 5), [1, 3, 4])])
def test_decouple_matches_manual_pooling(shape, scales):
    f = torch.randn(*shape, dtype=torch.float64)
    out = decouple(f, scales)
    assert [t.shape for t in out] == [(shape[0], s * s, shape[1]) for s in scales]
    for t, s in zip(out, scales):
        expected = oracle_pool(f, s)
        for i in range(shape[0]):
            for q in range(s * s):
                assert t[i, q].tolist() == pytest.approx(expected[i][q], rel=1e-12, abs=1e-12)


LABELS = [0, 1, 0, 2, 1]


@pytest.mark.parametrize("class_mask", ["none", "exclude_same_class", "same_class_positive"])
@pytest.mark.parametrize("negatives", ["same_location", "all_locations"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_sample_contrast_matches_loop(class_mask, negatives, tau):
    u = torch.randn(5, 4, 3, dtype=torch.float64)
    v = torch.randn(5, 4, 3, dtype=torch.float64)
    got = sample_contrast(u, v, tau, torch.tensor(LABELS), class_mask, negatives)
    assert got.dtype == torch.float64
    expected = oracle_sample(u, v, tau, LABELS, class_mask, negatives)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_sample_contrast_degenerate_batches_are_finite():
    u, v = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    assert sample_contrast(u, v, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.zeros(3, dtype=torch.long)
    u, v = torch.randn(3, 4, 3), torch.randn(3, 4, 3)
    out = sample_contrast(u, v, 0.1, same, "exclude_same_class")
    assert out.item() == pytest.approx(0.0, abs=1e-6)
    out = sample_contrast(u, v, 0.1, same, "same_class_positive", "all_locations")
    assert torch.isfinite(out)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_feature_contrast_matches_loop(tau):
    u = torch.randn(5, 4, 6, dtype=torch.float64)
    v = torch.randn(5, 4, 6, dtype=torch.float64)
    got = feature_contrast(u, v, tau)
    assert got.item() == pytest.approx(oracle_feature(u, v, tau), rel=1e-10)


def test_feature_contrast_refuses_width_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        feature_contrast(torch.randn(2, 1, 3), torch.randn(2, 1, 4), 0.1)


def test_terms_match_oracle_total():
    cfg = parse_config(MSDCRDConfig, {"scales": [1, 2], "scale_weights": [1.0, 0.5],
                                      "kd_weight": 0.7, "ce_weight": 0.3, "contrast_weight": 2.0,
                                      "feature_weight": 0.25, "temperature": 0.2,
                                      "class_mask": "same_class_positive"}, "m")
    b, c = 5, 3
    f_s = torch.randn(b, c, 4, 4, dtype=torch.float64)
    f_t = torch.randn(b, c, 2, 2, dtype=torch.float64)
    zs, zt = torch.randn(b, NUM_CLASSES, dtype=torch.float64), torch.randn(b, NUM_CLASSES,
                                                                            dtype=torch.float64)
    y = torch.tensor(LABELS)
    terms = msdcrd_terms(cfg, zs, zt, f_s, f_t, y)
    assert set(terms) == {"loss_ce", "loss_kd", "loss_sample", "loss_feature"}
    sample = feature = 0.0
    for s, w in zip([1, 2], [1.0, 0.5]):
        u = torch.tensor(oracle_pool(f_s, s), dtype=torch.float64)
        v = torch.tensor(oracle_pool(f_t, s), dtype=torch.float64)
        sample += w * oracle_sample(u, v, 0.2, LABELS, "same_class_positive", "same_location")
        feature += w * oracle_feature(u, v, 0.2)
    assert terms["loss_sample"].item() == pytest.approx(2.0 * sample / 2, rel=1e-10)
    assert terms["loss_feature"].item() == pytest.approx(2.0 * 0.25 * feature / 2, rel=1e-10)
    assert terms["loss_ce"].item() == pytest.approx(0.3 * F.cross_entropy(zs, y).item(), rel=1e-12)
    assert terms["loss_kd"].item() == pytest.approx(0.7 * kd_loss(zs, zt, 4.0).item(), rel=1e-12)


def test_losses_stay_float32_under_bf16_autocast():
    u, v = torch.randn(4, 4, 8), torch.randn(4, 4, 8)
    y = torch.tensor([0, 1, 0, 1])
    ref_s = sample_contrast(u, v, 0.1, y, "exclude_same_class")
    ref_f = feature_contrast(u, v, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_s = sample_contrast(u, v, 0.1, y, "exclude_same_class")
        got_f = feature_contrast(u, v, 0.1)
    assert got_s.dtype == got_f.dtype == torch.float32
    assert got_s.item() == pytest.approx(ref_s.item(), rel=1e-6)
    assert got_f.item() == pytest.approx(ref_f.item(), rel=1e-6)


# ---- the distiller on small nets ---------------------------------------------------------------

def data_info(input_shape=INPUT_SHAPE, num_classes: int = NUM_CLASSES) -> DataInfo:
    return DataInfo(20, torch.arange(20) % num_classes, num_classes, input_shape)


def build_tiny(**settings: Any) -> MSDCRD:
    cfg = parse_config(MSDCRDConfig, settings, "study.methods.msdcrd")
    teacher = TinyNet((8, 12), (1, 2))           # last stage 12@4x4
    student = TinyNet((4, 6), (1, 1))            # last stage 6@8x8: width and size differ
    return MSDCRD(student, teacher, cfg, data_info())


def test_registered_with_plain_teacher():
    cls = DISTILLERS.get("msdcrd")
    assert cls is MSDCRD and cls.display_name == "MSDCRD" and cls.Config is MSDCRDConfig
    assert cls.teacher_request(MSDCRDConfig()) == TeacherRequest()


@pytest.mark.parametrize("width_match", ["pool", "project"])
@pytest.mark.parametrize("settings,terms", [
    ({}, {"loss_ce", "loss_sample", "loss_feature"}),
    ({"kd_weight": 1.0}, {"loss_ce", "loss_kd", "loss_sample", "loss_feature"}),
    ({"feature_weight": 0.0, "ce_weight": 0.0}, {"loss_sample"}),
    ({"negatives": "all_locations", "class_mask": "same_class_positive"},
     {"loss_ce", "loss_sample", "loss_feature"}),
    ({"class_mask": "none", "scales": [2, 4]}, {"loss_ce", "loss_sample", "loss_feature"}),
    ({"pooling": "sliding", "windows": [[1, 1], [2, 1], [3, 2]]},
     {"loss_ce", "loss_sample", "loss_feature"}),
    ({"pooling": "sliding", "windows": [[2, 2]], "negatives": "all_locations",
      "feature_weight": 0.0}, {"loss_ce", "loss_sample"}),
])
def test_gradients_reach_student_and_align_not_teacher(settings, terms, width_match):
    dist = build_tiny(width_match=width_match, **settings)
    dist.train()
    assert dist.student.training and not dist.teacher.training
    x, y = torch.randn(6, *INPUT_SHAPE), torch.tensor([0, 1, 2, 3, 0, 1])
    logits, out = dist(x, y, torch.arange(6))
    assert logits.shape == (6, NUM_CLASSES) and set(out) == terms
    assert all(t.dim() == 0 and torch.isfinite(t) for t in out.values())
    sum(out.values()).backward()
    assert all(p.grad is None for p in dist.teacher.parameters())
    teacher_ids = {id(p) for p in dist.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in dist.learnable_parameters()}
    for p in dist.student.convs.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    if width_match == "pool":
        assert dist.align is None
        assert {id(p) for p in dist.learnable_parameters()} == \
            {id(p) for p in dist.student.parameters()}
    else:
        for p in dist.align.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert dist.exported_model() is dist.student


def test_contrast_terms_alone_train_the_align_conv():
    dist = build_tiny(ce_weight=0.0, width_match="project")
    x, y = torch.randn(4, *INPUT_SHAPE), torch.tensor([0, 1, 2, 3])
    _, out = dist(x, y, torch.arange(4))
    out["loss_sample"].backward(retain_graph=True)
    conv = dist.align[0].weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    conv.grad = None
    out["loss_feature"].backward()
    assert conv.grad is not None and conv.grad.abs().sum() > 0


def test_equal_widths_add_no_parameters():
    cfg = MSDCRDConfig(scales=[1, 2])
    dist = MSDCRD(TinyNet((4, 6), (1, 2)), TinyNet((8, 6), (2, 1)), cfg, data_info())
    assert dist.align is None
    assert {id(p) for p in dist.learnable_parameters()} == \
        {id(p) for p in dist.student.parameters()}


# ---- the zoo pairs of methods.md 1.4 / 1.6 -----------------------------------------------------

PAIRS = [
    ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
]


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_zoo_pair_trains_one_step(teacher_name, student_name):
    scales = [1, 2] if student_name == "MobileNetV2" else [1, 2, 4]
    info = data_info((3, 32, 32), 100)
    cfg = parse_config(MSDCRDConfig, {"scales": scales, "kd_weight": 1.0},
                       "study.methods.msdcrd")
    teacher, student = build_model(teacher_name, 100), build_model(student_name, 100)
    dist = MSDCRD(student, teacher, cfg, info)
    dist.train()
    assert not dist.teacher.training
    teacher_before = [p.detach().clone() for p in dist.teacher.parameters()]
    student_before = [p.detach().clone() for p in dist.student.parameters()]
    opt = torch.optim.SGD(dist.learnable_parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 2])
    _, terms = dist(x, y, torch.arange(4))
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in dist.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, dist.teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, dist.student.parameters()))
    assert dist.align is None  # parameter-free by default, whatever the widths
    assert {id(p) for p in dist.learnable_parameters()} == \
        {id(p) for p in dist.student.parameters()}


def test_mobilenetv2_refuses_scale_4():
    cfg = MSDCRDConfig(scales=[1, 2, 4])
    t_shapes = probe_taps(build_model("vgg13", 100), (3, 32, 32))
    s_shapes = probe_taps(build_model("MobileNetV2", 100), (3, 32, 32))
    with pytest.raises(ConfigError) as err:
        MSDCRD.check_taps(cfg, t_shapes, s_shapes)
    assert err.value.field == "scales"
    assert "scale 4 exceeds the 2x2 last-stage map of the student" in str(err.value)
    with pytest.raises(ConfigError, match="scales"):
        MSDCRD(build_model("MobileNetV2", 100), build_model("vgg13", 100), cfg,
               data_info((3, 32, 32), 100))


def test_check_taps_teacher_map_and_class_counts():
    student = TapShapes(10, ((8, 8, 8),), 8)
    small_teacher = TapShapes(10, ((8, 4, 2),), 8)
    with pytest.raises(ConfigError, match="scale 4 exceeds the 4x2 last-stage map of the teacher"):
        MSDCRD.check_taps(MSDCRDConfig(scales=[1, 4]), small_teacher, student)
    MSDCRD.check_taps(MSDCRDConfig(scales=[1, 2]), small_teacher, student)
    other_classes = TapShapes(100, ((8, 8, 8),), 8)
    MSDCRD.check_taps(MSDCRDConfig(), other_classes, student)
    with pytest.raises(ConfigError) as err:
        MSDCRD.check_taps(MSDCRDConfig(kd_weight=1.0), other_classes, student)
    assert err.value.field == "teacher"


# ---- config validation -------------------------------------------------------------------------

def test_defaults_match_the_reference_design():
    cfg = parse_config(MSDCRDConfig, None, "study.methods.msdcrd")
    assert cfg == MSDCRDConfig(scales=[1, 2, 4], scale_weights=None, temperature=0.1,
                               negatives="same_location", class_mask="exclude_same_class",
                               ce_weight=1.0, kd_weight=0.0, kd_temperature=4.0,
                               contrast_weight=1.0, feature_weight=1.0, pooling="grid",
                               windows=None, width_match="pool")
    # grid pooling leaves job records as they were; the width matching is recorded
    record = config_record(cfg)
    assert "pooling" not in record and "windows" not in record
    assert record["width_match"] == "pool"


@pytest.mark.parametrize("values,field", [
    ({"scales": []}, "scales"),
    ({"scales": [0, 1]}, "scales"),
    ({"scales": [1, 2.5]}, "scales"),
    ({"scales": [2, 2]}, "scales"),
    ({"scales": 2}, "scales"),
    ({"scale_weights": [1.0]}, "scale_weights"),
    ({"scale_weights": [1.0, -1.0, 1.0]}, "scale_weights"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"class_mask": "same_class"}, "class_mask"),
    ({"negatives": "everywhere"}, "negatives"),
    ({"ce_weight": -1.0}, "ce_weight"),
    ({"kd_weight": -1.0}, "kd_weight"),
    ({"kd_temperature": 0}, "kd_temperature"),
    ({"contrast_weight": 0}, "contrast_weight"),
    ({"feature_weight": -0.5}, "feature_weight"),
    ({"scalez": [1]}, "scalez"),
    ({"pooling": "windows"}, "pooling"),
    ({"pooling": "sliding"}, "windows"),
    ({"pooling": "sliding", "windows": []}, "windows"),
    ({"pooling": "sliding", "windows": [[2]]}, "windows"),
    ({"pooling": "sliding", "windows": [[2, 0]]}, "windows"),
    ({"pooling": "sliding", "windows": [[2, 1.5]]}, "windows"),
    ({"pooling": "sliding", "windows": [[2, 1], [2, 1]]}, "windows"),
    ({"pooling": "sliding", "windows": [[2, 1]], "scale_weights": [1.0, 1.0]}, "scale_weights"),
    ({"width_match": "gram"}, "width_match"),
])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError) as err:
        parse_config(MSDCRDConfig, values, "study.methods.msdcrd")
    assert err.value.field == f"study.methods.msdcrd.{field}"
    assert f"study.methods.msdcrd.{field}" in str(err.value)


def test_unknown_choices_list_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config(MSDCRDConfig, {"class_mask": "x"}, "study.methods.msdcrd")
    assert err.value.allowed == ["none", "exclude_same_class", "same_class_positive"]
    with pytest.raises(ConfigError) as err:
        parse_config(MSDCRDConfig, {"negatives": "x"}, "study.methods.msdcrd")
    assert err.value.allowed == ["same_location", "all_locations"]
    with pytest.raises(ConfigError) as err:
        parse_config(MSDCRDConfig, {"pooling": "x"}, "study.methods.msdcrd")
    assert err.value.allowed == ["grid", "sliding"]
    with pytest.raises(ConfigError) as err:
        parse_config(MSDCRDConfig, {"width_match": "x"}, "study.methods.msdcrd")
    assert err.value.allowed == ["pool", "project"]


# ---- sliding windows and parameter-free width matching (issue 17, section 3) -------------------

def unfold_pool(f: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """Sliding-window means computed apart from avg_pool2d: (B, C, H, W) -> (B, L, C) in float64,
    L the k x k windows at stride r in row-major order, each the mean of its k*k cells."""
    b, c = f.shape[:2]
    cols = F.unfold(f.double(), kernel_size=k, stride=r)           # (B, C*k*k, L)
    return cols.view(b, c, k * k, -1).mean(dim=2).transpose(1, 2)


def channel_groups(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, P, C_in) -> (B, P, c): output i is the mean of the input channels from
    floor(i * C_in / c) to ceil((i + 1) * C_in / c) - 1 (adaptive average pooling's groups)."""
    c_in = x.shape[2]
    return torch.stack([x[:, :, (i * c_in) // c:-((-(i + 1) * c_in) // c)].mean(dim=2)
                        for i in range(c)], dim=2)


@pytest.mark.parametrize("shape,windows", [
    ((2, 3, 7, 6), [[1, 1], [3, 1], [2, 2], [3, 2]]),
    ((3, 4, 8, 8), [[4, 4], [8, 1], [5, 3]]),
])
def test_slide_matches_unfold(shape, windows):
    f = torch.randn(*shape, dtype=torch.float64)
    out = slide(f, windows)
    b, c, h, w = shape
    for t, (k, r) in zip(out, windows):
        assert t.shape == (b, ((h - k) // r + 1) * ((w - k) // r + 1), c)
        assert torch.allclose(t, unfold_pool(f, k, r), rtol=1e-12, atol=1e-12)


def test_match_widths_averages_the_wider_side_in_adaptive_groups():
    u = torch.randn(2, 3, 10, dtype=torch.float64)
    v = torch.randn(2, 3, 4, dtype=torch.float64)
    pu, pv = match_widths(u, v)
    assert pv is v and torch.allclose(pu, channel_groups(u, 4), rtol=1e-12, atol=1e-12)
    # groups of 10 -> 4: [0, 3), [2, 5), [5, 8), [7, 10)
    assert torch.allclose(pu[..., 1], u[..., 2:5].mean(dim=2), rtol=1e-12, atol=1e-12)
    qv, qu = match_widths(v, u)
    assert qv is v and torch.allclose(qu, pu)
    same = match_widths(v, v.clone())
    assert same[0] is v


def test_sliding_windows_run_on_the_common_size_of_unequal_maps():
    """A 8x8 student map against a 4x4 teacher map: the student's 2x2 blocks are averaged first,
    so a (k, r) window over the common 4x4 grid is a (2k, 2r) window over the student's map."""
    f_s = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    f_t = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    small_s, same_t = common_size(f_s, f_t)
    assert small_s.shape == (2, 3, 4, 4) and same_t is f_t
    cfg = MSDCRDConfig(pooling="sliding", windows=[[2, 1], [3, 1], [4, 4]])
    for (u, v), (k, r) in zip(local_pairs(cfg, f_s, f_t), cfg.windows):
        assert u.shape == v.shape == (2, ((4 - k) // r + 1) ** 2, 3)
        assert torch.allclose(u, unfold_pool(f_s, 2 * k, 2 * r), rtol=1e-12, atol=1e-12)
        assert torch.allclose(v, channel_groups(unfold_pool(f_t, k, r), 3),
                              rtol=1e-12, atol=1e-12)


def test_sliding_terms_match_oracle_total():
    cfg = parse_config(MSDCRDConfig, {"pooling": "sliding", "windows": [[2, 1], [4, 2]],
                                      "scale_weights": [1.0, 0.5], "feature_weight": 0.5,
                                      "temperature": 0.2, "contrast_weight": 2.0}, "m")
    b = 5
    f_s = torch.randn(b, 6, 8, 8, dtype=torch.float64)       # wider and larger than the teacher
    f_t = torch.randn(b, 4, 4, 4, dtype=torch.float64)
    zs = torch.randn(b, NUM_CLASSES, dtype=torch.float64)
    zt = torch.randn(b, NUM_CLASSES, dtype=torch.float64)
    y = torch.tensor(LABELS)
    terms = msdcrd_terms(cfg, zs, zt, f_s, f_t, y)
    assert set(terms) == {"loss_ce", "loss_sample", "loss_feature"}
    sample = feature = 0.0
    for (k, r), w in zip([(2, 1), (4, 2)], [1.0, 0.5]):
        u = channel_groups(unfold_pool(f_s, 2 * k, 2 * r), 4)
        v = unfold_pool(f_t, k, r)
        sample += w * oracle_sample(u, v, 0.2, LABELS, "exclude_same_class", "same_location")
        feature += w * oracle_feature(u, v, 0.2)
    assert terms["loss_sample"].item() == pytest.approx(2.0 * sample / 2, rel=1e-10)
    assert terms["loss_feature"].item() == pytest.approx(2.0 * 0.5 * feature / 2, rel=1e-10)


@pytest.mark.parametrize("teacher_name,student_name", [
    ("wrn_40_2", "wrn_40_1"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
])
def test_parameter_free_width_matching_adds_no_parameters(teacher_name, student_name):
    info = data_info((3, 32, 32), 100)
    c_t = probe_taps(build_model(teacher_name, 100), info.input_shape).stages[-1][0]
    c_s = probe_taps(build_model(student_name, 100), info.input_shape).stages[-1][0]
    assert c_t != c_s
    extra = {}
    for mode in ("pool", "project"):
        student = build_model(student_name, 100)
        dist = MSDCRD(student, build_model(teacher_name, 100), MSDCRDConfig(width_match=mode),
                      info)
        extra[mode] = sum(p.numel() for p in dist.learnable_parameters()) \
            - sum(p.numel() for p in student.parameters())
    # project: a bias-free 1x1 conv C_s -> C_t and a BatchNorm's weight and bias
    assert extra == {"pool": 0, "project": c_s * c_t + 2 * c_t}


def test_check_taps_windows_against_the_common_map():
    student = TapShapes(10, ((8, 8, 8),), 8)
    teacher = TapShapes(10, ((8, 4, 2),), 8)
    MSDCRD.check_taps(MSDCRDConfig(pooling="sliding", windows=[[2, 1]]), teacher, student)
    with pytest.raises(ConfigError) as err:
        MSDCRD.check_taps(MSDCRDConfig(pooling="sliding", windows=[[2, 1], [3, 1]]), teacher,
                          student)
    assert err.value.field == "windows" and "window kernel 3 exceeds 4x2" in str(err.value)
    # sliding pooling reads windows, not scales: MobileNetV2's 2x2 map takes the default scales
    t_shapes = probe_taps(build_model("vgg13", 100), (3, 32, 32))
    s_shapes = probe_taps(build_model("MobileNetV2", 100), (3, 32, 32))
    MSDCRD.check_taps(MSDCRDConfig(pooling="sliding", windows=[[1, 1], [2, 1]]), t_shapes,
                      s_shapes)
