"""Provenance: the code digest (its module closure, what changes it and what does not), the
teacher-weights fingerprint, git state, and the staleness rule over a store."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from kdflow.orchestrator import provenance
from kdflow.orchestrator.atomic import write_json
from kdflow.orchestrator.checkpoint import SEAL_LENGTH, write_sealed
from kdflow.orchestrator.provenance import (SOURCE_ROOT, closure_files, code_digest, code_files,
                                            git_state, job_provenance, provenance_tags,
                                            weights_fingerprint)
from kdflow.orchestrator.staleness import CODE, NO_PROVENANCE, TEACHER, assess
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study


@pytest.fixture
def jobs(study):
    """The small study's jobs with fitnet and crd added, by method (teacher: ``teacher``)."""
    study["methods"] = {"vanilla": {}, "kd": {}, "fitnet": {}, "crd": {"num_negatives": 16}}
    graph = expand_study(study)
    return graph, {("teacher" if j.stage == "teacher" else j.method): j for j in graph.jobs}


@pytest.fixture
def source(tmp_path):
    """A copy of kdflow's ``methods`` and ``orchestrator`` packages that tests may edit."""
    root = tmp_path / "src"
    for package in ("methods", "orchestrator"):
        shutil.copytree(SOURCE_ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    yield root
    provenance.forget_cached_digests()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    provenance.forget_cached_digests()


def test_kd_closure_holds_its_method_models_data_and_training_step(jobs):
    _, by_method = jobs
    files = code_files(by_method["kd"])
    expected = {"methods/distillers/kd.py", "methods/distillers/base.py", "methods/config.py",
                "methods/models/base.py", "methods/models/cifar_resnet.py",
                "methods/models/layers.py", "orchestrator/data/synthetic.py",
                "orchestrator/data/tensor_loaders.py", "orchestrator/data/loaders.py",
                "orchestrator/runner.py", "orchestrator/recipe.py", "orchestrator/fast_path.py",
                "orchestrator/loss_guard.py", "orchestrator/distributed.py",
                "orchestrator/metrics.py"}
    assert expected <= set(files)
    # packages' __init__ (which import every method or dataset), other methods, bookkeeping
    for absent in ("methods/distillers/__init__.py", "methods/__init__.py",
                   "methods/distillers/fitnet.py", "orchestrator/data/__init__.py",
                   "orchestrator/report.py", "orchestrator/checkpoint.py",
                   "orchestrator/store.py", "orchestrator/tracking.py"):
        assert absent not in files
    assert "methods/distillers/kd.py" in code_files(by_method["crd"])  # crd imports kd_loss
    assert all(files[p] == hashlib.sha256((SOURCE_ROOT / p).read_bytes()).hexdigest()
               for p in files)


def test_relative_and_function_level_imports_are_followed(tmp_path):
    package = tmp_path / "methods" / "pkg"
    package.mkdir(parents=True)
    (tmp_path / "methods" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from kdflow.methods.pkg import c  # noqa\n")
    (package / "a.py").write_text("from .b import x\nfrom . import c\n\n"
                                  "def f():\n    from ..other import y\n")
    (package / "b.py").write_text("import torch\nx = 1\n")
    (package / "c.py").write_text("import kdflow.methods.pkg.d\n")
    (package / "d.py").write_text("")
    (package / "unused.py").write_text("")
    (tmp_path / "methods" / "other.py").write_text("y = 2\n")
    files = dict(closure_files(tmp_path, ("kdflow.methods.pkg.a",)))
    assert set(files) == {"methods/pkg/a.py", "methods/pkg/b.py", "methods/pkg/c.py",
                          "methods/pkg/d.py", "methods/other.py"}


def test_editing_kd_changes_only_the_digests_of_jobs_that_use_it(jobs, source):
    _, by_method = jobs
    before = {m: code_digest(job, source) for m, job in by_method.items()}
    assert before == {m: code_digest(job) for m, job in by_method.items()}  # machine independent
    assert len({before["kd"], before["fitnet"], before["crd"], before["vanilla"]}) == 4
    assert before["teacher"] == before["vanilla"]  # the same method, model module and data

    _edit(source / "orchestrator" / "report.py", "def ", "def _unused():\n    pass\n\n\ndef ")
    assert {m: code_digest(job, source) for m, job in by_method.items()} == before

    _edit(source / "methods" / "distillers" / "kd.py", "return kl * temperature ** 2",
          "return logits_s.sum() * 0")
    after = {m: code_digest(job, source) for m, job in by_method.items()}
    assert {m for m in after if after[m] != before[m]} == {"kd", "crd"}

    _edit(source / "orchestrator" / "training.py", "SIGNAL_CHECK_EVERY = 8", "SIGNAL_CHECK_EVERY = 9")
    changed = {m: code_digest(job, source) for m, job in by_method.items()}
    assert all(changed[m] != after[m] for m in after)


def test_weights_fingerprint_is_the_sealed_sha256(tmp_path):
    path = tmp_path / "model.pt"
    assert weights_fingerprint(path) is None
    write_sealed(path, {"w": torch.ones(3)})
    data = path.read_bytes()
    assert weights_fingerprint(path) == hashlib.sha256(data[:-SEAL_LENGTH]).hexdigest()
    unsealed = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, unsealed)
    assert weights_fingerprint(unsealed) == hashlib.sha256(unsealed.read_bytes()).hexdigest()


def test_git_state_outside_a_checkout_is_unknown_and_inside_names_the_commit(source):
    assert git_state(source) == (None, None)
    commit, dirty = git_state(SOURCE_ROOT)
    if (SOURCE_ROOT / ".git").exists():
        assert len(commit) == 40 and isinstance(dirty, bool)


def test_provenance_record_and_its_tags(jobs):
    _, by_method = jobs
    record = job_provenance(by_method["kd"], torch.device("cpu"), "ab" * 32)
    assert record["code_digest"] == code_digest(by_method["kd"])
    assert record["torch"] == torch.__version__ and record["device"].startswith("cpu")
    assert record["kdflow_version"] == "0.1.0"
    tags = provenance_tags(record)
    assert tags["kdflow.code_digest"] == record["code_digest"]
    assert tags["kdflow.teacher_weights"] == "ab" * 32
    assert tags.get("mlflow.source.git.commit") == record["git_commit"]
    assert all(isinstance(v, str) and v != "None" for v in tags.values())


def _finish(store: JobStore, job, teacher_weights=None, digest=None, weights=0.0):
    """Record ``job`` as finished with a provenance for the current code (or ``digest``)."""
    store.add(job)
    record = {"code_digest": digest or code_digest(job), "code_files": code_files(job),
              "teacher_weights": teacher_weights}
    write_sealed(store.weights_path(job.job_id), {"w": torch.full((2,), weights)})
    write_json(store.job_dir(job.job_id) / "result.json",
               {**_result_keys(job), "provenance": record})


def _result_keys(job) -> dict:
    """The keys every finished job's result.json holds (JobStore.is_done checks them)."""
    return {"job_id": job.job_id, "stage": job.stage, "method": job.method,
            "teacher": job.teacher, "student": job.model, "dataset": job.dataset,
            "seed": job.seed, "epochs": 1, "wall_time_s": 1.0, "metrics": {"top1": 50.0}}


def test_stale_jobs_code_no_provenance_and_teacher_rerun(jobs, tmp_path):
    graph, by_method = jobs
    store = JobStore(tmp_path)
    teacher = by_method["teacher"]
    _finish(store, teacher)
    fingerprint = weights_fingerprint(store.weights_path(teacher.job_id))
    _finish(store, by_method["kd"], fingerprint)
    _finish(store, by_method["fitnet"], fingerprint, digest="0" * 64)
    store.add(by_method["vanilla"])
    write_sealed(store.weights_path(by_method["vanilla"].job_id), {"w": torch.zeros(2)})
    write_json(store.job_dir(by_method["vanilla"].job_id) / "result.json",
               _result_keys(by_method["vanilla"]))
    found = assess(graph, store)
    assert found.finished == 4
    assert {j: s.kind for j, s in found.stale.items()} == {
        by_method["fitnet"].job_id: CODE, by_method["vanilla"].job_id: NO_PROVENANCE}
    assert "2 of 4 finished jobs are stale" in found.summary()

    _finish(store, teacher, weights=1.0)  # the teacher was trained again: other weights
    found = assess(graph, store)
    assert found.stale[by_method["kd"].job_id].kind == TEACHER
    assert "re-run after it" in found.stale[by_method["kd"].job_id].why

    _finish(store, teacher, digest="1" * 64)  # a stale teacher makes its students stale
    found = assess(graph, store)
    assert found.stale[teacher.job_id].kind == CODE
    assert "is stale" in found.stale[by_method["kd"].job_id].why
