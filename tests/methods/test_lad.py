"""LAD (methods.md 5): the noised label input, its losses, and one training step for every
teacher/student segmentation pair of the spec's table (5.6)."""
import pytest
import torch

from kdflow.methods.distillers import DISTILLERS, DataInfo
from kdflow.methods.distillers.label_noise import (fixed_code_map, fixed_codes, random_code_map,
                                                   with_label_channel)
from kdflow.methods.distillers.segmentation_losses import cwd_loss, pixel_kd_loss
from kdflow.methods.config import parse_config
from kdflow.methods.models import build_model
from kdflow.methods.tasks import IGNORE_INDEX, SEGMENTATION

VOC_CLASSES = 21


def seg_info(num_classes: int = VOC_CLASSES, size: int = 64) -> DataInfo:
    return DataInfo(num_samples=8, labels=torch.full((8,), -1), num_classes=num_classes,
                    input_shape=(3, size, size), task=SEGMENTATION)


def label_maps(batch: int, size: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Random blocky label maps (8x8 cells) with an ignore border."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, num_classes, (batch, size // 8, size // 8), generator=gen)
    y = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
    y[:, :, :2] = IGNORE_INDEX
    return y


def test_teacher_training_codes_are_standard_normal_per_image_and_class_with_small_pixel_noise():
    torch.manual_seed(0)
    y = label_maps(400, 32, VOC_CLASSES)
    m = random_code_map(y, VOC_CLASSES, pixel_std=0.03)
    codes, residuals, ignore_codes = [], [], []
    for b in range(y.shape[0]):
        for k in torch.unique(y[b]).tolist():
            region = m[b][y[b] == k]
            code = region.mean()
            residuals.append(region - code)
            (ignore_codes if k == IGNORE_INDEX else codes).append(code)
    codes = torch.stack(codes)
    assert abs(codes.mean()) < 0.03 and abs(codes.std() - 1) < 0.03  # ~8,000 codes ~ N(0, 1)
    assert abs(torch.stack(ignore_codes).std() - 1) < 0.15  # the ignore index is a class too
    assert abs(torch.cat(residuals).std() - 0.03) < 0.002
    second = random_code_map(y, VOC_CLASSES, pixel_std=0.03)
    assert abs(torch.corrcoef(torch.stack([m.flatten(), second.flatten()]))[0, 1]) < 0.05


def test_distillation_codes_are_the_fixed_ones_with_their_noise():
    assert torch.allclose(fixed_codes(VOC_CLASSES), (torch.arange(22) - 11) / 10)
    # other class counts keep the released range, evenly spaced (ignore = the top code)
    for classes in (5, 19):
        codes = fixed_codes(classes)
        assert codes.shape == (classes + 1,)
        assert torch.allclose(codes[[0, -1]], torch.tensor([-1.1, 1.0]))
        assert torch.allclose(codes.diff(), torch.full((classes,), 2.1 / classes))
    torch.manual_seed(1)
    y = label_maps(64, 32, VOC_CLASSES)
    clean = fixed_code_map(y, VOC_CLASSES, pixel_std=0.0)
    index = torch.where(y == IGNORE_INDEX, torch.tensor(VOC_CLASSES), y)
    assert torch.allclose(clean, (index.float() - 11) / 10)
    assert torch.all(clean[y == IGNORE_INDEX] == 1.0)
    noisy = fixed_code_map(y, VOC_CLASSES, pixel_std=0.02)
    assert abs((noisy - clean).std() - 0.02) < 0.001 and abs((noisy - clean).mean()) < 0.001


def test_label_channel_is_appended_scaled():
    x = torch.randn(2, 3, 8, 8)
    m = torch.randn(2, 8, 8)
    out = with_label_channel(x, m, 1.5)
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out[:, :3], x) and torch.allclose(out[:, 3], 1.5 * m)


def test_cwd_is_a_spatial_softmax_kl_per_channel_and_zero_for_equal_maps():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    tau = 4.0
    expected = 0.0
    for n in range(2):
        for c in range(3):
            p = torch.softmax(t[n, c].flatten() / tau, 0)
            q = torch.softmax(s[n, c].flatten() / tau, 0)
            expected += (p * (p.log() - q.log())).sum()
    assert torch.allclose(cwd_loss(s, t, tau), tau ** 2 * expected / 6, rtol=1e-5)
    assert cwd_loss(t, t, tau).abs() < 1e-6 and pixel_kd_loss(t, t, tau).abs() < 1e-6
    p = torch.softmax(t / tau, 1)
    q = torch.log_softmax(s / tau, 1)
    direct = (p * (p.log() - q)).sum(1).mean() * tau ** 2
    assert torch.allclose(pixel_kd_loss(s, t, tau), direct, rtol=1e-5)


def make_distiller(method: str, teacher: str | None, student: str, settings: dict | None = None,
                   size: int = 64):
    cls = DISTILLERS.get(method)
    cfg = parse_config(cls.Config, settings or {}, method)
    info = seg_info(size=size)
    teacher_net = cls.build_teacher(cfg, teacher, VOC_CLASSES) if teacher else None
    return cls(cls.build_student(cfg, student, VOC_CLASSES), teacher_net, cfg, info)


# The pairs of methods.md 5.6: CIRKD's baselines (DeepLabV3-R101 teacher), LAD's rows (the
# label-assisted DeepLabV3-R18 teacher) and CIRKD's MobileNetV2 student; plus LAD's stage A.
SPEC_PAIRS = [
    ("seg_kd", "deeplabv3_resnet101", "deeplabv3_resnet18"),
    ("seg_kd", "deeplabv3_resnet101", "pspnet_resnet18"),
    ("seg_kd", "deeplabv3_resnet101", "deeplabv3_mobilenetv2"),
    ("lad", "deeplabv3_resnet18", "deeplabv3_resnet18"),
    ("lad", "deeplabv3_resnet18", "pspnet_resnet18"),
    ("lad_teacher", None, "deeplabv3_resnet18"),
]


@pytest.mark.parametrize("method,teacher,student", SPEC_PAIRS)
def test_one_training_step_of_each_spec_pair(method, teacher, student):
    torch.manual_seed(3)
    distiller = make_distiller(method, teacher, student)
    distiller.train()
    x, y = torch.randn(2, 3, 64, 64), label_maps(2, 64, VOC_CLASSES)
    teacher_before = ({k: v.clone() for k, v in distiller.teacher.state_dict().items()}
                      if distiller.teacher is not None else {})
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.learnable_parameters(), lr=0.01, momentum=0.9)
    logits, terms = distiller(x, y, torch.arange(2))
    assert logits.shape == (2, VOC_CLASSES, 64, 64)
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    if distiller.teacher is not None:
        assert all(p.grad is None for p in distiller.teacher.parameters())
        assert all(torch.equal(v, teacher_before[k])
                   for k, v in distiller.teacher.state_dict().items())
    changed = [k for k, v in distiller.student.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, student_before[k])]
    assert len(changed) > len(student_before) // 2


@pytest.mark.parametrize("method,settings", [
    ("lad", {}), ("lad", {"distill_loss": "pixel"}), ("seg_kd", {"loss": "cwd"}),
    ("inverted_projection", {}), ("inverted_projection", {"direction": "standard"})])
def test_the_students_loss_never_sends_gradient_to_the_teacher(method, settings):
    torch.manual_seed(4)
    teacher = "deeplabv3_resnet20" if method != "inverted_projection" else "deeplabv3_resnet8x4"
    distiller = make_distiller(method, teacher, "deeplabv3_resnet8", settings, size=32)
    distiller.train()
    x, y = torch.randn(4, 3, 32, 32), label_maps(4, 32, VOC_CLASSES)
    _, terms = distiller(x, y, torch.arange(4))
    distilled = next(v for k, v in terms.items() if k in ("loss_kd", "loss_proj"))
    distilled.backward()
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in distiller.student.parameters())


def test_lad_teacher_reads_four_channels_and_is_evaluated_with_the_labels():
    distiller = make_distiller("lad_teacher", None, "deeplabv3_resnet8", size=32)
    distiller.eval()
    first = next(m for m in distiller.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 4
    x, y = torch.randn(2, 3, 32, 32), label_maps(2, 32, VOC_CLASSES)
    with torch.no_grad():
        a, b = distiller.predict(x, y), distiller.predict(x, torch.zeros_like(y))
    assert a.shape == (2, VOC_CLASSES, 32, 32) and not torch.allclose(a, b)
    # the teacher the LAD student reads is the same network, with 4 input channels
    lad = DISTILLERS.get("lad")
    teacher = lad.build_teacher(parse_config(lad.Config, {}, "lad"), "deeplabv3_resnet8",
                                VOC_CLASSES)
    teacher.load_state_dict(distiller.exported_model().state_dict())


def test_lad_refuses_a_classifier():
    from kdflow.methods.errors import ConfigError
    from kdflow.methods.models import probe_taps
    taps = probe_taps(build_model("resnet8", 10), (3, 32, 32))
    with pytest.raises(ConfigError, match="segmentation"):
        DISTILLERS.get("lad").check_taps(None, taps, taps)
