"""Numeric settings, top-level keys and plan-time checks against the data and the machine
(issue 18, items 1 and 7): NaN and infinity are refused in every number of every Config, a
setting of the wrong kind is a ConfigError naming it, a misspelt top-level key suggests the
right one, and CRD's K, a model's native input size and ``device: cuda`` are checked before
anything starts."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, List, Tuple

import pytest
import torch

from kdflow.launch.compose import compose_config
from kdflow.methods.config import check_value, parse_config, require_non_negative, require_positive
from kdflow.methods.distillers import DISTILLERS
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.registry import DATASETS
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.study import expand_study

NON_FINITE = (math.nan, math.inf, -math.inf)


def _configs() -> List[Tuple[str, type]]:
    """Every Config a study parses: the recipe, each method's, each dataset's."""
    return ([("recipe", Recipe)]
            + [(f"method {name}", DISTILLERS.get(name).Config) for name in DISTILLERS.names()]
            + [(f"dataset {name}", DATASETS.get(name).Config) for name in DATASETS.names()])


def _numeric_fields() -> List[Tuple[str, type, str, Any]]:
    """(label, Config, field, NaN shaped as the field's type) for every number field."""
    out = []
    for label, cls in _configs():
        kinds = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = str(kinds[f.name])
            if "float" in text or "int" in text:
                nan: Any = math.nan
                for _ in range(text.count("List[")):
                    nan = [nan]
                out.append((label, cls, f.name, nan))
    return out


NUMERIC = _numeric_fields()


def test_every_config_has_number_fields_to_check():
    assert len(NUMERIC) > 100 and {"lr", "weight_decay", "temperature", "kd_weight"} <= {
        name for _, _, name, _ in NUMERIC}


@pytest.mark.parametrize("label, cls, name, nan", NUMERIC,
                         ids=[f"{label}.{name}" for label, _, name, _ in NUMERIC])
def test_nan_in_any_number_field_of_any_config_is_refused(label, cls, name, nan):
    with pytest.raises(ConfigError) as err:
        parse_config(cls, {name: nan}, "study.x")
    assert err.value.field.startswith(f"study.x.{name}"), err.value
    assert err.value.fix


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("setting", ["lr", "weight_decay", "momentum", "lr_decay", "lr_power"])
def test_recipe_refuses_non_finite_numbers(setting, value):
    with pytest.raises(ConfigError, match=rf"study\.student_recipe\.{setting}`"):
        parse_config(Recipe, {setting: value}, "study.student_recipe")


@pytest.mark.parametrize("setting", ["temperature", "kd_weight", "ce_weight"])
def test_method_weights_and_temperatures_refuse_infinity(setting):
    with pytest.raises(ConfigError, match=rf"study\.methods\.kd\.{setting}`.*finite"):
        parse_config(DISTILLERS.get("kd").Config, {setting: math.inf}, "study.methods.kd")


@pytest.mark.parametrize("value", [*NON_FINITE, True, "2", None])
def test_range_helpers_refuse_what_is_not_a_finite_number(value):
    for check in (require_positive, require_non_negative):
        with pytest.raises(ConfigError, match="`temperature`"):
            check("temperature", value)


@pytest.mark.parametrize("setting, value", [
    ("weight_decay", "abc"), ("momentum", "abc"), ("lr", "fast"), ("lr_milestones", "abc"),
    ("lr_milestones", 150), ("lr_milestones", [1.5]), ("lr_milestones", [0, 5]),
    ("lr_milestones", [5, 3]), ("lr_milestones", [3, 3]), ("epochs", 2.0), ("lr", True),
])
def test_recipe_settings_of_the_wrong_kind_name_the_field(setting, value):
    with pytest.raises(ConfigError, match=rf"study\.teacher_recipe\.{setting}"):
        parse_config(Recipe, {setting: value}, "study.teacher_recipe")


def test_milestones_past_the_last_epoch_are_kept_for_shortened_runs():
    recipe = parse_config(Recipe, {"epochs": 5, "lr_milestones": (150, 180, 210)}, "r")
    assert list(recipe.lr_milestones) == [150, 180, 210]


def test_numpy_numbers_and_ints_in_float_fields_are_accepted():
    import numpy as np

    recipe = parse_config(Recipe, {"lr": np.float32(0.1), "weight_decay": 0,
                                   "lr_milestones": [np.int64(2)]}, "r")
    assert recipe.weight_decay == 0 and recipe.lr_milestones == [2]


def test_untyped_settings_must_hold_finite_numbers_too():
    check_value("s", {"a": [1, {"b": 2.0}], "c": "text"}, Any)
    with pytest.raises(ConfigError, match=r"`s\.a\[1\]\.b`"):
        check_value("s", {"a": [1, {"b": math.nan}]}, Dict[str, Any])


# --- top-level keys --------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["+outptu_dir=/tmp/x", "outptu_dir=/tmp/x"])
def test_misspelt_top_level_key_suggests_the_right_one(override):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.field == "outptu_dir"
    assert "did you mean output_dir?" in err.value.fix and "+outptu_dir" not in err.value.fix


def test_misspelt_nested_key_suggests_its_sibling():
    with pytest.raises(ConfigError) as err:
        compose_config(["study.methods.kd.temprature=2"])
    assert "did you mean temperature?" in err.value.fix


@pytest.mark.parametrize("overrides", [
    ["+search=kd"],
    ["study=smoke", "+method@study.methods.inverted_projection=inverted_projection"],
    ["+study.datasets.digits.train_fraction=0.4"],
    ["+study.method_recipes={kd: {nesterov: true}}"],
])
def test_legitimate_additions_with_plus_still_compose(overrides):
    compose_config(overrides)


# --- checks against the data -----------------------------------------------------------------

def _smoke(**changes: Any) -> Dict[str, Any]:
    study = {"name": "smoke", "seeds": [0], "teacher_seed": 0,
             "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
             "datasets": {"synthetic": {"num_train": 256}},
             "methods": {"crd": {"num_negatives": 64}},
             "teacher_recipe": {"epochs": 1, "lr_milestones": []},
             "student_recipe": {"epochs": 1, "lr_milestones": []}}
    study.update(changes)
    return study


def test_crd_negatives_may_not_outnumber_the_training_split():
    expand_study(_smoke(methods={"crd": {"num_negatives": 256}}))
    with pytest.raises(ConfigError, match=r"`study\.methods\.crd\.num_negatives`.*256 samples"):
        expand_study(_smoke(methods={"crd": {"num_negatives": 257}}))


def test_crd_negatives_are_checked_in_ablations_too():
    study = _smoke(ablations={"crd": {"num_negatives": [64, 100000]}})
    with pytest.raises(ConfigError, match="num_negatives"):
        expand_study(study)


@pytest.mark.parametrize("role, pair", [
    ("student", {"teacher": "resnet14", "student": "resnet18"}),
    ("teacher", {"teacher": "resnet34", "student": "resnet8"}),
])
def test_imagenet_models_are_refused_on_tiny_images(role, pair):
    study = _smoke(pairs=[pair], methods={"kd": {}},
                   datasets={"synthetic": {"image_size": 27}})
    with pytest.raises(ConfigError, match=rf"`study\.pairs\[0\]\.{role}`.*224-pixel"):
        expand_study(study, require_data=False)
    study["datasets"]["synthetic"]["image_size"] = 28  # a 224-pixel model on >= 1/8 the side
    expand_study(study, require_data=False)


# --- device: cuda on a machine without a GPU -------------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("override, field", [
    ("study.student_recipe.device=cuda", "study.student_recipe.device"),
    ("study.teacher_recipe.device=cuda", "study.teacher_recipe.device"),
    ("+study.method_recipes={kd: {device: cuda}}", "study.method_recipes.kd.device"),
])
def test_cuda_without_a_gpu_is_refused_for_the_local_launcher(no_gpu, override, field):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.field == field and "device=auto" in err.value.fix


@pytest.mark.parametrize("launcher", ["slurm", "ray"])
def test_cuda_is_not_checked_for_launchers_that_run_jobs_elsewhere(no_gpu, launcher):
    # a tracking server, as a cluster launch needs (the SQLite store is refused there)
    compose_config([f"launcher={launcher}", "study.student_recipe.device=cuda",
                    "tracking_uri=http://127.0.0.1:5000"])


def test_cuda_with_a_gpu_is_accepted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    compose_config(["study.student_recipe.device=cuda"])
