"""Search spaces: parsing and validation against the tuned job, and applying the settings."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from ray import tune

from kdflow.launch.compose import compose_config
from kdflow.launch.search_space import apply_settings, flat_settings, parse_space, run_overrides, tune_space
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.study import expand_study


@pytest.fixture
def kd_job(study):
    return next(j for j in expand_study(study).jobs if j.method == "kd")


def test_a_space_parses_into_params_of_every_type(kd_job):
    params = parse_space({
        "method": {"temperature": {"type": "loguniform", "low": 1, "high": 16},
                   "kd_weight": {"type": "choice", "values": [0.5, 0.9]},
                   "ce_weight": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "recipe": {"batch_size": {"type": "randint", "low": 16, "high": 33},
                   "lr": {"type": "grid", "values": [0.01, 0.1]}}}, kd_job)
    assert [p.path for p in params] == ["method.temperature", "method.kd_weight",
                                        "method.ce_weight", "recipe.batch_size", "recipe.lr"]
    space = tune_space(params, tune)
    assert isinstance(space["method"]["temperature"], tune.search.sample.Float)
    assert isinstance(space["recipe"]["batch_size"], tune.search.sample.Integer)
    assert space["recipe"]["lr"] == {"grid_search": [0.01, 0.1]}
    assert tune_space(params[1:2], tune, grid=True)["method"]["kd_weight"] == {"grid_search": [0.5, 0.9]}


@pytest.mark.parametrize("space, field, text", [
    ({"method": {"tempreature": {"type": "uniform", "low": 1, "high": 2}}},
     "search.space.method.tempreature", "temperature"),
    ({"model": {"width": {"type": "uniform", "low": 1, "high": 2}}}, "search.space.model.width",
     "method.<setting>"),
    ({"recipe": {"lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "search.space.recipe.lrr",
     "lr_milestones"),
    ({"method": {"kd_weight": {"type": "choice", "values": []}}},
     "search.space.method.kd_weight.values", "non-empty"),
    ({"method": {"temperature": {"type": "uniform", "low": 4, "high": 4}}},
     "search.space.method.temperature.low", "below high"),
    ({"method": {"temperature": {"type": "loguniform", "low": 0, "high": 4}}},
     "search.space.method.temperature.low", "log scale"),
    ({"method": {"temperature": {"type": "normal", "low": 0, "high": 4}}},
     "search.space.method.temperature.type", "loguniform"),
    ({"method": {"temperature": {"type": "uniform", "low": 1, "high": 4, "q": 1}}},
     "search.space.method.temperature.q", "high"),
    ({"method": {"kd_weight": {"type": "choice", "values": [0.5, 0]}}},
     "search.space.method.kd_weight", "positive"),
    ({"method": {"temperature": 2.0}}, "search.space.method.temperature", "must be a parameter"),
    ({}, "search.space", "is empty"),
])
def test_bad_spaces_name_the_field(kd_job, space, field, text):
    with pytest.raises(ConfigError) as err:
        parse_space(space, kd_job)
    assert err.value.field == field
    assert text in str(err.value)


def test_applied_settings_are_a_new_content_addressed_job(kd_job):
    same = apply_settings(kd_job, {"method.temperature": kd_job.method_cfg["temperature"]})
    assert same.job_id == kd_job.job_id
    other = apply_settings(kd_job, {"method.temperature": 2.5, "recipe.lr": 0.02})
    assert other.job_id != kd_job.job_id
    assert other.method_cfg["temperature"] == 2.5 and other.recipe["lr"] == 0.02
    assert "method.temperature=2.5" in other.title
    assert flat_settings({"method": {"temperature": 2.5}}) == {"method.temperature": 2.5}


def _kd_seed0(overrides):
    study = OmegaConf.to_container(compose_config(overrides).study, resolve=True)
    return next(j for j in expand_study(study).jobs if j.method == "kd" and j.seed == 0)


def test_run_overrides_compose_the_trial_job():
    job = _kd_seed0(["study=quick"])
    settings = {"method.temperature": 1.0468904936975654, "method.kd_weight": 0.7,
                "recipe.lr": 0.0123}
    again = _kd_seed0(["study=quick", *run_overrides("kd", settings)])
    assert again.job_id == apply_settings(job, settings).job_id
