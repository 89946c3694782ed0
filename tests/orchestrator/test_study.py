"""Study expansion: content-addressed ids, shared teachers, validation before any job."""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from kdflow.launch.compose import compose_config
from kdflow.methods.config import config_record, parse_config
from kdflow.methods.errors import ConfigError
from kdflow.methods.models import MODELS
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.study import expand_study


def test_expansion_shares_teachers_and_orders_stages(study):
    study["pairs"].append({"teacher": "resnet14", "student": "resnet14"})
    study["seeds"] = [0, 1]
    graph = expand_study(study)
    teachers = [j for j in graph.jobs if j.stage == "teacher"]
    distill = [j for j in graph.jobs if j.stage == "distill"]
    assert len(teachers) == 1  # one teacher shared by both pairs
    # kd: 2 pairs x 2 seeds; vanilla: one per student and seed
    assert sum(j.method == "kd" for j in distill) == 4
    assert sum(j.method == "vanilla" for j in distill) == 4
    assert all(j.teacher_job == teachers[0].job_id for j in distill if j.method == "kd")
    assert all(j.teacher_job is None for j in distill if j.method == "vanilla")
    positions = {j.job_id: i for i, j in enumerate(graph.jobs)}
    assert all(positions[j.teacher_job] < positions[j.job_id] for j in distill if j.teacher_job)


def test_job_ids_hash_the_resolved_config(study):
    first = {j.title: j.job_id for j in expand_study(study).jobs}
    assert first == {j.title: j.job_id for j in expand_study(study).jobs}
    study["methods"]["kd"]["temperature"] = 2.0
    second = {j.title: j.job_id for j in expand_study(study).jobs}
    changed = [t for t in first if first[t] != second[t]]
    assert changed == [t for t in first if t.startswith("kd ")]
    study["student_recipe"] = {**study["student_recipe"], "lr": None}
    resolved = [j for j in expand_study(study).jobs if j.stage == "distill"]
    assert all(j.recipe["lr"] == 0.05 for j in resolved)  # the model's default


@pytest.mark.parametrize("change, field", [
    (lambda s: s["methods"].update(nomethod={}), "study.methods.nomethod"),
    (lambda s: s["pairs"][0].update(student="resnet7"), "study.pairs[0].student"),
    (lambda s: s["datasets"].update(mnist={}), "study.datasets.mnist"),
    (lambda s: s["methods"]["kd"].update(temperature=0), "study.methods.kd.temperature"),
    (lambda s: s["methods"]["kd"].update(temprature=4), "study.methods.kd.temprature"),
    (lambda s: s["student_recipe"].update(lr=-0.1), "study.student_recipe.lr"),
    (lambda s: s["methods"].update(fitnet={"hint_stage": 7}), "study.methods.fitnet.hint_stage"),
    (lambda s: s.update(seeds=[]), "study.seeds"),
])
def test_bad_input_names_the_field(study, change, field):
    change(study)
    with pytest.raises(ConfigError) as err:
        expand_study(study)
    assert err.value.field == field
    assert field in str(err.value)


def test_ablation_axis_adds_variants_and_reuses_the_study_setting(study):
    study["ablations"] = {"kd": {"temperature": [2.0, 4.0, 8.0]}}
    graph = expand_study(study)
    kd = [j for j in graph.jobs if j.method == "kd"]
    assert sorted(j.method_cfg["temperature"] for j in kd) == [2.0, 4.0, 8.0]
    # T=4 is the study's own setting: that job is the distill job, not a second copy
    assert {j.method_cfg["temperature"]: j.stage for j in kd} == {
        2.0: "ablation", 4.0: "distill", 8.0: "ablation"}
    assert all(j.labels["variant"] == f"temperature={j.method_cfg['temperature']}" for j in kd)
    assert len({j.teacher_job for j in kd}) == 1


@pytest.mark.parametrize("ablations, field", [
    ({"crd": {"momentum": [0.5]}}, "study.ablations.crd"),
    ({"kd": {"temperature": []}}, "study.ablations.kd.temperature"),
    ({"kd": {"temperature": [4.0, -1.0]}}, "study.ablations.kd.temperature"),
    ({"kd": {"temp": [1.0]}}, "study.ablations.kd.temp"),
])
def test_bad_ablation_names_the_field(study, ablations, field):
    study["ablations"] = ablations
    with pytest.raises(ConfigError) as err:
        expand_study(study)
    assert err.value.field == field


def test_teacher_variants_are_distinct_jobs(study):
    study["methods"] = {"kd": {}, "hsakd": {"teacher_mode": "frozen"},
                        "inverted_projection": {"teacher_init": "random"}, "spectral_reg": {}}
    graph = expand_study(study)
    teachers = {(j.method, j.recipe["epochs"]): j for j in graph.jobs if j.stage == "teacher"}
    plain = teachers[("vanilla", 2)]
    random_init = teachers[("vanilla", 0)]
    heads = teachers[("hsakd_teacher", 2)]
    assert len(teachers) == 3
    assert heads.teacher_job == plain.job_id  # frozen heads start from the plain teacher
    job = {j.method: j for j in graph.jobs if j.stage == "distill"}
    assert job["kd"].teacher_job == plain.job_id
    assert job["hsakd"].teacher_job == heads.job_id
    assert job["inverted_projection"].teacher_job == random_init.job_id
    assert job["spectral_reg"].teacher_job is None and job["spectral_reg"].needs == ()
    positions = {j.job_id: i for i, j in enumerate(graph.jobs)}
    assert all(positions[n] < positions[j.job_id] for j in graph.jobs for n in j.needs)
    study["methods"]["hsakd"]["teacher_mode"] = "joint"
    joint = next(j for j in expand_study(study).jobs if j.method == "hsakd_teacher")
    assert joint.teacher_job is None and joint.job_id != heads.job_id


def test_train_fractions_axis_varies_students_only(study):
    study["train_fractions"] = [1.0, 0.4]
    graph = expand_study(study)
    teachers = [j for j in graph.jobs if j.stage == "teacher"]
    students = [j for j in graph.jobs if j.stage == "distill"]
    assert len(teachers) == 1 and teachers[0].dataset_cfg["train_fraction"] == 1.0
    assert sorted(j.dataset_cfg["train_fraction"] for j in students) == [0.4, 0.4, 1.0, 1.0]
    assert {j.labels["fraction"] for j in students} == {"1.0", "0.4"}
    study["train_fractions"] = [0.0]
    with pytest.raises(ConfigError, match="study.datasets.synthetic.train_fraction"):
        expand_study(study)


def test_ablation_grids_are_expanded_separately(study):
    study["ablations"] = {"kd": [{"temperature": [2.0, 4.0]}, {"kd_weight": [0.5, 0.9]}]}
    kd = [j for j in expand_study(study).jobs if j.method == "kd"]
    pairs = sorted((j.method_cfg["temperature"], j.method_cfg["kd_weight"]) for j in kd)
    assert pairs == [(2.0, 0.9), (4.0, 0.5), (4.0, 0.9)]  # not crossed; the base once


# ---- per-method recipe settings (issue 17, row 3) ----------------------------------------------

HSAKD_TRAINERS = ("hsakd", "hsakd_teacher")


def test_method_recipes_apply_to_the_jobs_those_methods_train(study):
    study["methods"] = {"kd": {}, "hsakd": {"teacher_mode": "frozen"}}
    plain = {j.job_id: j for j in expand_study(study).jobs}
    plain_job = {(j.stage, j.method): j for j in plain.values()}
    study["method_recipes"] = {"hsakd": {"nesterov": True},
                               "hsakd_teacher": {"epochs": 5, "lr_milestones": [3]}}
    graph = expand_study(study)
    job = {(j.stage, j.method): j for j in graph.jobs}
    heads, student = job[("teacher", "hsakd_teacher")], job[("distill", "hsakd")]
    # laid over the study's own teacher_recipe / student_recipe (batch 32, 2 epochs)
    assert heads.recipe == {**plain_job[("teacher", "hsakd_teacher")].recipe,
                            "epochs": 5, "lr_milestones": [3]}
    assert student.recipe == {**plain_job[("distill", "hsakd")].recipe, "nesterov": True}
    assert heads.recipe["batch_size"] == 32 and student.recipe["epochs"] == 2
    assert student.teacher_job == heads.job_id
    # the plain teacher the frozen heads start from, and kd, are the jobs they were
    others = [j for j in graph.jobs if j.method not in HSAKD_TRAINERS]
    assert len(others) == 2 and all(j.job_id in plain for j in others)
    assert heads.teacher_job == job[("teacher", "vanilla")].job_id


@pytest.mark.parametrize("method_recipes, field", [
    ({"nomethod": {"nesterov": True}}, "study.method_recipes.nomethod"),
    ({"hsakd": {"nesterv": True}}, "study.method_recipes.hsakd.nesterv"),
    ({"hsakd": {"lr": -0.1}}, "study.method_recipes.hsakd.lr"),
    ({"hsakd": True}, "study.method_recipes.hsakd"),
    ([{"hsakd": {}}], "study.method_recipes"),
])
def test_bad_method_recipes_name_the_field(study, method_recipes, field):
    study["methods"] = {"kd": {}, "hsakd": {}}
    study["method_recipes"] = method_recipes
    with pytest.raises(ConfigError) as err:
        expand_study(study)
    assert err.value.field == field


def test_cifar100_benchmark_trains_hsakd_with_nesterov_and_keeps_other_ids():
    """HSAKD's train_teacher_cifar.py and train_student_cifar.py build SGD with nesterov=True
    (winycg/HSAKD 28c8dc2). Every other job's spec holds the study's shared recipe exactly as
    Recipe resolves it (no new field), so its id is the one it had before method_recipes."""
    study = OmegaConf.to_container(compose_config(["study=cifar100_benchmark"]).study,
                                   resolve=True)
    graph = expand_study(study, require_data=False)
    hsakd = [j for j in graph.jobs if j.method in HSAKD_TRAINERS]
    pairs, seeds = len(study["pairs"]), len(study["seeds"])
    teachers = {p["teacher"] for p in study["pairs"]}
    assert sum(j.method == "hsakd" for j in hsakd) == pairs * seeds
    assert sum(j.method == "hsakd_teacher" for j in hsakd) == len(teachers)
    assert all(j.recipe["nesterov"] is True for j in hsakd)
    for j in graph.jobs:
        if j.method in HSAKD_TRAINERS:
            continue
        shared = study["teacher_recipe" if j.stage == "teacher" else "student_recipe"]
        expected = config_record(parse_config(Recipe, shared, "recipe"))
        assert j.recipe == {**expected, "lr": MODELS.get(j.model).default_lr}, j.title
        assert j.recipe["nesterov"] is False
    del study["method_recipes"]
    before = {j.job_id: j for j in expand_study(study, require_data=False).jobs}
    assert {j.job_id for j in graph.jobs if j.method not in HSAKD_TRAINERS} == \
        {i for i, j in before.items() if j.method not in HSAKD_TRAINERS}
    # the HSAKD jobs differ from their former selves in nesterov alone
    renamed: dict = {}
    for j in graph.jobs:
        if j.method in HSAKD_TRAINERS:
            old = dataclasses.replace(j, recipe={**j.recipe, "nesterov": False},
                                      teacher_job=renamed.get(j.teacher_job, j.teacher_job))
            assert old.job_id in before, j.title
            renamed[j.job_id] = old.job_id
    assert len(renamed) == len(hsakd)


def test_job_id_is_the_hash_of_the_spec_and_kept_once_computed(study):
    """The id is sha256 of the spec's canonical JSON without labels (and without init_from when
    unset): the ids of finished studies stay the same however it is computed."""
    import hashlib
    import json

    for job in expand_study(study).jobs:
        content = dataclasses.asdict(job)
        del content["labels"], content["init_from"]
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        assert job.job_id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
        assert job.job_id is job.job_id  # computed once
        donor = dataclasses.replace(job, init_from=f"{job.job_id}@7")
        assert donor.job_id not in (job.job_id, dataclasses.replace(job).job_id)


def test_status_expansion_skips_probing_and_keeps_the_ids(study, monkeypatch):
    from kdflow.orchestrator import study as study_module

    study["methods"]["fitnet"] = {"hint_layer": 9}  # resnet8 has no tap 9: probing refuses it
    with pytest.raises(ConfigError, match="hint_layer"):
        expand_study(study)
    probed = {j.job_id for j in expand_study({**study, "methods": {"kd": {}}}).jobs}

    def no_probe(*args):
        raise AssertionError("probe=False must build no model")

    monkeypatch.setattr(study_module, "_model_taps", no_probe)
    graph = expand_study(study, probe=False)
    assert any(j.method == "fitnet" for j in graph.jobs)
    assert {j.job_id for j in expand_study({**study, "methods": {"kd": {}}}, probe=False).jobs} \
        == probed


def test_probing_runs_on_one_thread_and_restores_the_count(study, monkeypatch):
    import torch

    from kdflow.orchestrator import study as study_module

    seen = []

    def probe(model, shape):
        seen.append(torch.get_num_threads())
        return real_probe(model, shape)

    real_probe = study_module.probe_taps
    monkeypatch.setattr(study_module, "probe_taps", probe)
    study_module._model_taps.cache_clear()
    torch.set_num_threads(2)
    expand_study(study)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
