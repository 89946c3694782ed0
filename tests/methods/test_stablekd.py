"""StableKD: block split of every zoo family, recomposition schedule, gradient isolation,
adapters, phases in the state_dict, one SGD step per phase, settings validation."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS, DataInfo, TeacherRequest
from kdflow.methods.distillers.stablekd import (  # importing it registers stablekd
    RecompositionSchedule, StableKD, StableKDConfig, boundary_shapes, default_partitions)
from kdflow.methods.errors import ConfigError
from kdflow.methods.models import MODELS, build_model, probe_taps
from kdflow.methods.tasks import CLASSIFICATION
from kdflow.methods.models.blocks import block_ranges, default_num_blocks, split_blocks

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "method" / "stablekd.yaml"
NUM_CLASSES = 100
FIELD = "study.methods.stablekd"

# methods.md 6.2 defaults, one model per family.
FAMILY_DEFAULTS = {"resnet": 3, "wrn": 3, "vgg": 5, "mobilenetv2": 4, "shufflenet": 3,
                   "imagenet_resnet": 4, "imagenet_mobilenetv2": 4, "resnet_bottleneck": 4}


def data_info(side: int = 32) -> DataInfo:
    return DataInfo(8, torch.arange(8) % NUM_CLASSES, NUM_CLASSES, (3, side, side))


def distiller(teacher: str, student: str, side: int = 32, **settings) -> StableKD:
    cfg = parse_config(StableKDConfig, settings, FIELD)
    return StableKD(build_model(student, NUM_CLASSES), build_model(teacher, NUM_CLASSES), cfg,
                    data_info(side))


def batch(side: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, side, side), torch.tensor([3, 97])


def block_params(d: StableKD) -> List[List[nn.Parameter]]:
    return [list(b.parameters()) for b in d.student_blocks]


def has_grad(params: List[nn.Parameter]) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---- block split ---------------------------------------------------------------------------

def _side(name: str) -> int:
    """Native side for the CIFAR zoo; 64 px keeps the torchvision models fast."""
    return 32 if MODELS.get(name).input_size == 32 else 64


@pytest.mark.parametrize("name", sorted(n for n in MODELS if MODELS.get(n).task == CLASSIFICATION))
def test_blocks_compose_to_the_model_at_every_block_count(name: str) -> None:
    model = build_model(name, 10).eval()
    k = default_num_blocks(model)
    assert k == FAMILY_DEFAULTS[MODELS.get(name).family]
    x = torch.randn(2, 3, _side(name), _side(name))
    with torch.no_grad():
        feats = model.forward_features(x)
        assert len(feats.stages) == k
        for n in range(1, k + 1):
            blocks = split_blocks(model, n)
            assert len(blocks) == n
            h, outs = x, []
            for block in blocks:
                h = block(h)
                outs.append(h)
            assert torch.allclose(h, feats.logits, atol=1e-5), (name, n)
            ends = [r[-1] for r in block_ranges(k, n)]
            for out, end in zip(outs[:-1], ends):
                assert torch.allclose(out, feats.stages[end], atol=1e-6), (name, n, end)
    with pytest.raises(ValueError):
        split_blocks(model, k + 1)
    with pytest.raises(ValueError):
        split_blocks(model, 0)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2"])
def test_blocks_are_views_onto_the_model(name: str) -> None:
    model = build_model(name, 10)
    blocks = split_blocks(model, default_num_blocks(model))
    block_ids = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(block_ids) == sorted(id(p) for p in model.parameters())  # each param once
    with torch.no_grad():
        next(blocks[0].parameters()).add_(1.0)
    assert torch.equal(next(blocks[0].parameters()), next(model.parameters()))


def test_vgg_at_64px_pools_before_block4() -> None:
    model = build_model("vgg8", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for block in split_blocks(model, 5):
            h = block(h)
        assert torch.allclose(h, model(x), atol=1e-5)


def test_block_grouping_rule() -> None:
    assert [list(r) for r in block_ranges(5, 3)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in block_ranges(5, 4)] == [[0, 1], [2], [3], [4]]
    assert [list(r) for r in block_ranges(4, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in block_ranges(3, 1)] == [[0, 1, 2]]


# ---- schedule ------------------------------------------------------------------------------

def test_default_partitions() -> None:
    assert default_partitions(1) == [[[1]]]
    assert default_partitions(2) == [[[1], [2]], [[1, 2]]]
    assert default_partitions(3) == [[[1], [2], [3]], [[1, 2], [3]], [[1, 2, 3]]]
    assert default_partitions(4) == [[[1], [2], [3], [4]], [[1, 2], [3, 4]], [[1, 2, 3, 4]]]
    assert default_partitions(5) == [[[1], [2], [3], [4], [5]], [[1, 2], [3, 4], [5]],
                                     [[1, 2, 3, 4], [5]], [[1, 2, 3, 4, 5]]]


def test_schedule_defaults_and_phase_at() -> None:
    s = RecompositionSchedule(3)
    assert s.num_phases == 3
    assert s.boundaries == pytest.approx((1 / 3, 2 / 3))
    phases = [s.phase_at(e, 240) for e in range(240)]
    assert phases == [0] * 80 + [1] * 80 + [2] * 80  # methods.md 6.2: 0-79, 80-159, 160-239
    assert s.groups_at(80, 240) == ((1, 2), (3,))
    assert s.groups_at(239, 240) == ((1, 2, 3),)
    assert s.phase_at(300, 240) == 2
    assert s.phase_labels() == ["decomposed", "partial", "end-to-end"]
    assert [s.first_epoch(p, 240) for p in range(3)] == [0, 80, 160]
    with pytest.raises(ValueError):
        s.phase_at(-1, 240)

    custom = RecompositionSchedule(4, [[[1], [2], [3], [4]], [[1, 2], [3], [4]],
                                       [[1, 2, 3], [4]], [[1, 2, 3, 4]]], [0.25, 0.5, 0.9])
    assert [custom.phase_at(e, 100) for e in (0, 24, 25, 49, 50, 89, 90, 99)] == \
        [0, 0, 1, 1, 2, 2, 3, 3]
    assert custom.phase_labels() == ["decomposed", "partial1", "partial2", "end-to-end"]
    assert RecompositionSchedule(1).partitions == (((1,),),)
    assert RecompositionSchedule(1).phase_at(5, 10) == 0


@pytest.mark.parametrize("num_blocks,partitions,boundaries,field", [
    (0, None, None, "num_blocks"),
    (True, None, None, "num_blocks"),
    (3, [], None, "partitions"),
    (3, "1,2,3", None, "partitions"),
    (3, [[1, 2, 3]], None, "partitions"),                      # a phase must hold groups
    (3, [[[1], []], [[1, 2, 3]]], None, "partitions"),          # empty group
    (3, [[[1], [2.0], [3]], [[1, 2, 3]]], None, "partitions"),  # not an integer
    (3, [[[1], [2]], [[1, 2]]], None, "partitions"),            # does not cover block 3
    (3, [[[2], [1], [3]], [[1, 2, 3]]], None, "partitions"),    # out of order
    (3, [[[1, 3], [2]], [[1, 2, 3]]], None, "partitions"),      # non-contiguous group
    (3, [[[1], [2], [3]], [[1], [2], [3]], [[1, 2, 3]]], None, "partitions"),  # no merge
    (3, [[[1, 2], [3]], [[1], [2, 3]], [[1, 2, 3]]], None, "partitions"),      # a split
    (3, [[[1], [2], [3]], [[1, 2], [3]]], None, "partitions"),  # never end-to-end
    (3, None, [0.5], "boundaries"),                             # 3 phases need 2
    (3, None, [0.6, 0.3], "boundaries"),                        # decreasing
    (3, None, [0.5, 0.5], "boundaries"),                        # not strictly increasing
    (3, None, [0.0, 0.5], "boundaries"),                        # outside (0, 1)
    (3, None, [0.5, 1.0], "boundaries"),
    (3, None, ["a", 0.5], "boundaries"),
    (2, None, [True], "boundaries"),
    (3, None, 0.5, "boundaries"),
])
def test_schedule_validation(num_blocks, partitions, boundaries, field) -> None:
    with pytest.raises(ConfigError) as err:
        RecompositionSchedule(num_blocks, partitions, boundaries)
    assert err.value.field == field


# ---- settings ------------------------------------------------------------------------------

def test_yaml_defaults_registry_and_teacher() -> None:
    cfg = parse_config(StableKDConfig, yaml.safe_load(CONFIG.read_text()), FIELD)
    assert cfg == StableKDConfig()
    assert "[KDFLOW] reference scheduler, not the paper's" in CONFIG.read_text()
    import kdflow.methods.distillers.stablekd as module
    assert "[KDFLOW] reference scheduler, not the paper's" in module.__doc__
    assert DISTILLERS.get("stablekd") is StableKD and StableKD.display_name == "StableKD"
    assert StableKD.teacher_request(cfg) == TeacherRequest()


@pytest.mark.parametrize("values,field", [
    ({"num_blocks": 0}, "num_blocks"),
    ({"num_blocks": 2.0}, "num_blocks"),
    ({"partitions": [[[1], [2]], [[2, 1]]]}, "partitions"),
    ({"num_blocks": 4, "partitions": [[[1], [2], [3]], [[1, 2, 3]]]}, "partitions"),
    ({"partitions": [[[1], [2]], [[1, 2]]], "boundaries": [0.2, 0.4]}, "boundaries"),
    ({"num_blocks": 3, "boundaries": [0.5]}, "boundaries"),
    ({"boundaries": [0.7, 0.2]}, "boundaries"),
    ({"feature_weight": 0.0}, "feature_weight"),
    ({"ce_weight": -0.1}, "ce_weight"),
    ({"kd_weight": 0}, "kd_weight"),
    ({"kd_temperature": -4}, "kd_temperature"),
    ({"blocks": 3}, "blocks"),
])
def test_bad_settings_name_the_field(values: Dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(StableKDConfig, values, FIELD)
    assert err.value.field == f"{FIELD}.{field}"


def test_valid_custom_settings_parse() -> None:
    cfg = parse_config(StableKDConfig, {"partitions": [[[1], [2]], [[1, 2]]],
                                        "boundaries": [0.3]}, FIELD)
    assert cfg.partitions == [[[1], [2]], [[1, 2]]]
    parse_config(StableKDConfig, {"num_blocks": 4, "boundaries": [0.2, 0.6]}, FIELD)


@pytest.mark.parametrize("teacher,student,settings,field", [
    ("resnet32x4", "resnet8x4", {"num_blocks": 4}, "num_blocks"),       # 3 stages each
    ("resnet32x4", "resnet8x4", {"partitions": [[[1], [2], [3], [4]], [[1, 2, 3, 4]]]},
     "partitions"),                                                     # N = 3 here
    ("resnet32x4", "resnet8x4", {"boundaries": [0.5]}, "boundaries"),   # 3 phases
    ("resnet32x4", "vgg8", {"num_blocks": 5}, "num_blocks"),            # teacher has 3
])
def test_pair_dependent_settings_are_refused(teacher, student, settings, field) -> None:
    cfg = parse_config(StableKDConfig, settings, FIELD)
    t_taps = probe_taps(build_model(teacher, NUM_CLASSES), (3, 32, 32))
    s_taps = probe_taps(build_model(student, NUM_CLASSES), (3, 32, 32))
    with pytest.raises(ConfigError) as err:
        StableKD.check_taps(cfg, t_taps, s_taps)
    assert err.value.field == field
    with pytest.raises(ConfigError) as err:
        distiller(teacher, student, **settings)
    assert err.value.field == field


def test_block_count_defaults_to_student_capped_by_teacher() -> None:
    assert distiller("vgg13", "MobileNetV2").schedule.num_blocks == 4
    assert distiller("resnet32x4", "MobileNetV2").schedule.num_blocks == 3
    assert distiller("vgg13", "vgg8").schedule.num_blocks == 5
    assert distiller("vgg13", "vgg8", num_blocks=2).schedule.partitions == (((1,), (2,)),
                                                                            ((1, 2),))


# ---- adapters ------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher,student,side", [
    ("resnet32x4", "resnet8x4", 32), ("resnet56", "resnet20", 32), ("wrn_40_2", "wrn_16_2", 32),
    ("vgg13", "vgg8", 32), ("resnet34", "resnet18", 64),
])
def test_matching_pairs_have_no_adapters(teacher: str, student: str, side: int) -> None:
    d = distiller(teacher, student, side)
    assert len(d.in_adapters) == 0 and len(d.out_adapters) == 0


@pytest.mark.parametrize("teacher,student", [
    ("wrn_40_2", "wrn_40_1"), ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2"),
    ("resnet32x4", "MobileNetV2"),
])
def test_adapters_exist_exactly_where_shapes_differ(teacher: str, student: str) -> None:
    d = distiller(teacher, student)
    t_shapes = boundary_shapes(d.teacher, d.teacher_blocks, (3, 32, 32))
    s_shapes = boundary_shapes(d.student, d.student_blocks, (3, 32, 32))
    differ = [b for b, (t, s) in enumerate(zip(t_shapes, s_shapes), start=1) if t != s]
    assert differ
    assert sorted(map(int, d.in_adapters)) == [b + 1 for b in differ]
    assert sorted(map(int, d.out_adapters)) == differ
    for b in differ:
        t, s = t_shapes[b - 1], s_shapes[b - 1]
        a_in, a_out = d.in_adapters[str(b + 1)], d.out_adapters[str(b)]
        assert (a_in.conv.in_channels, a_in.conv.out_channels) == (t[0], s[0])
        assert (a_out.conv.in_channels, a_out.conv.out_channels) == (s[0], t[0])
        with torch.no_grad():
            assert a_in(torch.zeros(2, *t)).shape[1:] == s
            assert a_out(torch.zeros(2, *s)).shape[1:] == t


def test_wrn_channel_adapters() -> None:
    d = distiller("wrn_40_2", "wrn_40_1")
    assert {k: (m.conv.in_channels, m.conv.out_channels) for k, m in d.in_adapters.items()} \
        == {"2": (32, 16), "3": (64, 32)}
    assert {k: (m.conv.in_channels, m.conv.out_channels) for k, m in d.out_adapters.items()} \
        == {"1": (16, 32), "2": (32, 64)}


# ---- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("teacher,student", [("resnet32x4", "resnet8x4"),
                                             ("wrn_40_2", "wrn_40_1")])
def test_gradients_stay_inside_their_group(teacher: str, student: str) -> None:
    d = distiller(teacher, student).train()
    x, y = batch()
    params = block_params(d)
    for phase, expected in enumerate([((1,), (2,), (3,)), ((1, 2), (3,)), ((1, 2, 3),)]):
        d.set_phase(phase)
        _, groups = d.group_losses(x, y)
        assert tuple(g.blocks for g in groups) == expected
        for group in groups:
            d.zero_grad(set_to_none=True)
            sum(group.terms.values()).backward(retain_graph=True)
            for b, block in enumerate(params, start=1):
                assert has_grad(block) == (b in group.blocks), (phase, group.blocks, b)
            assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())


def test_merged_group_passes_gradients_across_the_boundary() -> None:
    d = distiller("resnet32x4", "resnet8x4").train()
    x, y = batch()
    d.start_epoch(80, 240)
    _, groups = d.group_losses(x, y)
    assert groups[0].blocks == (1, 2) and set(groups[0].terms) == {"loss_feat"}
    groups[0].terms["loss_feat"].backward()
    first, second, last = block_params(d)
    assert has_grad(first) and has_grad(second) and not has_grad(last)


# ---- training steps, phases, state ---------------------------------------------------------

@pytest.mark.parametrize("teacher,student", [
    ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "MobileNetV2"),
    ("resnet32x4", "ShuffleV2"),
])
def test_one_sgd_step_in_each_phase(teacher: str, student: str) -> None:
    d = distiller(teacher, student)
    opt = torch.optim.SGD(d.learnable_parameters(), lr=0.01, momentum=0.9)
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    assert all(id(p) not in teacher_ids for p in d.learnable_parameters())
    teacher_state = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    x, y = batch()
    total = 30
    for phase in range(d.schedule.num_phases):
        d.start_epoch(d.schedule.first_epoch(phase, total), total)
        assert int(d.phase) == phase
        d.train()
        before = [p.detach().clone() for p in d.student.parameters()]
        logits, terms = d(x, y, torch.arange(2))
        assert logits.shape == (2, NUM_CLASSES)
        if phase == d.schedule.num_phases - 1:
            assert list(terms) == ["loss_ce", "loss_kd"]  # no intermediate group
            assert torch.allclose(logits, d.student(x), atol=1e-5)  # end-to-end: own logits
        else:
            assert list(terms) == ["loss_feat", "loss_ce", "loss_kd"]
            assert terms["loss_feat"].item() > 0
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, d.student.parameters()))
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert d.exported_model() is d.student


def test_phase_is_in_the_state_dict() -> None:
    d = distiller("resnet32x4", "resnet8x4")
    assert int(d.state_dict()["phase"]) == 0
    d.start_epoch(170, 240)
    state = d.state_dict()
    assert int(state["phase"]) == 2
    fresh = distiller("resnet32x4", "resnet8x4")
    fresh.load_state_dict(state)
    assert int(fresh.phase) == 2
    _, terms = fresh(*batch(), torch.arange(2))
    assert "loss_feat" not in terms  # resumed in the end-to-end phase
    fresh.start_epoch(100, 240)
    assert int(fresh.phase) == 1
    with pytest.raises(ValueError):
        fresh.set_phase(3)


def test_evaluation_uses_the_plain_student() -> None:
    d = distiller("wrn_40_2", "wrn_40_1")
    d.start_epoch(0, 240)
    d.eval()
    x, _ = batch()
    with torch.no_grad():
        h = x
        for block in d.student_blocks:
            h = block(h)
        assert torch.allclose(d.exported_model()(x), h, atol=1e-6)
    student_keys: Set[str] = {k for k in d.state_dict() if k.startswith("student.")}
    assert len(student_keys) == len(d.student.state_dict())  # blocks are not stored twice


# ---- loss values ---------------------------------------------------------------------------

def _cifar_resnet_stage(model: nn.Module, k: int, h: torch.Tensor) -> torch.Tensor:
    """Stage k (1..3) of a CIFAR ResNet written out from its modules: stage 1 includes the
    stem, stage 3 the pooling and the classifier."""
    if k == 1:
        h = F.relu(model.bn1(model.conv1(h)))
    for block in getattr(model, f"layer{k}"):
        h, _ = block(h)
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)) if k == 3 else h


def _reference_terms(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     phase: int, cfg: StableKDConfig) -> Dict[str, torch.Tensor]:
    """methods.md 6.2 for a 3-block pair with equal boundary shapes (no adapters): with the
    teacher's stage outputs t1, t2 and logits z_t, phase 0 trains S1(x) -> t1, S2(t1) -> t2 and
    S3(t2) on CE + KD, phase 1 S2(S1(x)) -> t2 and S3(t2), phase 2 the whole student; each
    feature term is feature_weight * MSE, and KD is T^2 * mean_i KL(p_t,i || p_s,i) at T.
    Returns the terms in float64."""
    t = teacher.forward_features(x)
    t1, t2 = t.stages[0], t.stages[1]

    def stage(k: int, h: torch.Tensor) -> torch.Tensor:
        return _cifar_resnet_stage(student, k, h)

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b) ** 2).mean()

    if phase == 0:
        feat, logits = mse(stage(1, x), t1) + mse(stage(2, t1), t2), stage(3, t2)
    elif phase == 1:
        feat, logits = mse(stage(2, stage(1, x)), t2), stage(3, t2)
    else:
        feat, logits = None, student(x)
    temp, logits = cfg.kd_temperature, logits.double()  # float64: KL is a small difference
    p_t = torch.softmax(t.logits.double() / temp, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits / temp, dim=1))).sum(1).mean()
    terms = {} if feat is None else {"loss_feat": cfg.feature_weight * feat.double()}
    if cfg.ce_weight > 0:
        terms["loss_ce"] = cfg.ce_weight * -torch.log_softmax(logits, 1)[range(len(y)), y].mean()
    terms["loss_kd"] = cfg.kd_weight * temp ** 2 * kl
    return terms


LOSS_SETTINGS = [{}, {"kd_temperature": 1.0}, {"kd_temperature": 8.0, "feature_weight": 3.0},
                 {"feature_weight": 0.25, "ce_weight": 0.0, "kd_weight": 2.0}]


def test_loss_terms_match_the_formula_in_every_phase() -> None:
    """Every term of every phase equals the formula computed here from the models' own
    modules, for several temperatures and weights; the temperature and the feature weight
    change the loss as the formula says (loss_feat scales with feature_weight)."""
    student, teacher = build_model("resnet8", NUM_CLASSES), build_model("resnet14", NUM_CLASSES)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([3, 97, 0, 42])
    got: Dict[Tuple[int, int], Dict[str, float]] = {}
    for s, settings in enumerate(LOSS_SETTINGS):
        cfg = parse_config(StableKDConfig, settings, FIELD)
        d = StableKD(student, teacher, cfg, data_info()).train()
        assert not d.in_adapters and not d.out_adapters
        for phase in range(3):
            d.set_phase(phase)
            with torch.no_grad():
                _, terms = d(x, y, torch.arange(4))
                expected = _reference_terms(student, teacher, x, y, phase, cfg)
            assert list(terms) == list(expected), (settings, phase)
            for name in expected:
                torch.testing.assert_close(terms[name].double(), expected[name], rtol=1e-4, atol=0,
                                           msg=f"{settings} phase {phase} {name}")
            got[s, phase] = {k: v.item() for k, v in terms.items()}
    for phase in range(3):
        kd = [got[s, phase]["loss_kd"] for s in range(3)]
        assert len(set(kd)) == 3, (phase, kd)  # T = 4, 1 and 8 give three different losses
    for phase in range(2):
        assert got[2, phase]["loss_feat"] == pytest.approx(3 * got[0, phase]["loss_feat"])
        assert got[3, phase]["loss_feat"] == pytest.approx(0.25 * got[0, phase]["loss_feat"])
