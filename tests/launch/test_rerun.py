"""Stale jobs and `rerun`: the user's report end to end (edit kd_loss in a copy of kdflow, run
again: the KD jobs are stale, skipped, flagged, and `rerun=stale` re-runs exactly them), which
jobs each `rerun` value picks, setting old results aside safely, and bad values refused."""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdflow
from kdflow.launch.cli import main
from kdflow.launch.compose import compose_config
from kdflow.orchestrator.atomic import write_json
from kdflow.orchestrator.checkpoint import write_sealed
from kdflow.orchestrator.provenance import SOURCE_ROOT, code_digest, code_files, weights_fingerprint
from kdflow.orchestrator.rerun import RerunRequest, plan_rerun, prepare_rerun
from kdflow.orchestrator.store import SUPERSEDED, SUPERSEDING, JobState, JobStore
from kdflow.orchestrator.study import expand_study

#: The smoke study made smaller still: one epoch each, fewer images, jobs in one process.
FAST_SMOKE = ["study=smoke", "progress=false", "launcher.workers=1",
              "study.teacher_recipe.epochs=1", "study.student_recipe.epochs=1",
              "study.teacher_recipe.lr_milestones=[]", "study.student_recipe.lr_milestones=[]",
              "study.datasets.synthetic.num_train=64", "study.datasets.synthetic.num_val=32"]
#: Runs several `kdflow` commands (JSON lists of arguments) one after the other in one process,
#: as the console script does (``launch.cli:main``), to pay for the imports once.
COMMANDS = ("import json, sys\nfrom kdflow.launch.cli import main\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    print('=== kdflow', *argv[:2], flush=True)\n"
            "    if main(argv):\n        sys.exit(1)\n")


def _result_keys(job) -> dict:
    """The keys every finished job's result.json holds (JobStore.is_done checks them)."""
    return {"job_id": job.job_id, "stage": job.stage, "method": job.method,
            "teacher": job.teacher, "student": job.model, "dataset": job.dataset,
            "seed": job.seed, "epochs": 1, "wall_time_s": 1.0, "metrics": {"top1": 50.0}}


def _copy_of_kdflow(root: Path) -> Path:
    """A copy of kdflow laid out as installed (``root/kdflow/methods``...), importable with
    ``PYTHONPATH=root``; returns ``root/kdflow``, the copy's source root."""
    namespace = root / "kdflow"
    for package in ("methods", "orchestrator", "launch", "configs"):
        shutil.copytree(SOURCE_ROOT / package, namespace / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(kdflow.__file__), namespace / "__init__.py")
    return namespace


@pytest.mark.slow
def test_edited_kd_loss_makes_kd_jobs_stale_and_rerun_stale_reruns_exactly_them(tmp_path):
    source = _copy_of_kdflow(tmp_path / "src")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(source.parent), "OMP_NUM_THREADS": "1"}

    def kdflow(*commands: tuple) -> list:
        """The output of each of ``commands`` (argument tuples), run in one process."""
        argv = [[*command, *FAST_SMOKE, f"output_dir={out}"] for command in commands]
        done = subprocess.run([sys.executable, "-c", COMMANDS, json.dumps(argv)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.split("=== kdflow ")[1:]

    assert "5 run, 0 skipped" in kdflow(("run",))[0]
    jobs = JobStore(out / "jobs")
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("jobs/*/result.json")}
    assert all(r["provenance"]["code_digest"] for r in results.values())
    kd_loss = source / "methods" / "distillers" / "kd.py"
    kd_loss.write_text(kd_loss.read_text().replace("return kl * temperature ** 2",
                                                   "return logits_s.sum() * 0"))
    # crd imports kd_loss
    stale = sorted(j for j, r in results.items() if r["method"] in ("kd", "crd"))

    again, status = kdflow(("run",), ("status",))
    assert "warning: 2 of 5 finished jobs are stale: their code changed since they ran" in again
    assert "`kdflow run rerun=stale` re-runs them" in again and "0 run, 5 skipped" in again
    assert sorted(re.findall(r"^  (\w{16})  .*: its code changed since it ran: "
                             r"methods/distillers/kd.py$", again, re.M)) == stale

    flagged = sorted(line.split()[0] for line in status.splitlines() if line.endswith(" yes"))
    assert flagged == stale and "2 of 5 finished jobs are stale" in status

    rerun, last = kdflow(("run", "rerun=stale"), ("run",))
    assert "re-running 2 jobs (2 stale); old results kept in" in rerun
    assert "2 run, 3 skipped" in rerun
    for job_id in stale:
        (old,) = (jobs.job_dir(job_id) / SUPERSEDED).iterdir()
        assert json.loads((old / "result.json").read_text()) == results[job_id]
        assert (old / "model.pt").exists() and (old / "state.json").exists()
        assert jobs.result(job_id)["provenance"]["code_digest"] != \
            results[job_id]["provenance"]["code_digest"]
        assert jobs.state(job_id).attempts == 1  # a fresh state, one new run
    runs = sqlite3.connect(out / "mlflow.db").execute(
        "select r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'kdflow.job_id'").fetchall()
    assert sorted(job for _, job in runs) == sorted([*results, *stale])  # a new run per re-run
    assert {state for state, _ in runs} == {"FINISHED"}  # the old runs stay as they were
    untouched = set(results) - set(stale)
    assert all(jobs.result(j) == results[j] for j in untouched)
    assert not any((jobs.job_dir(j) / SUPERSEDED).exists() for j in untouched)

    assert "stale" not in last and "0 run, 5 skipped" in last


@pytest.fixture
def finished(study, tmp_path):
    """The small study with fitnet added, every job finished with the current code's
    provenance (no training): (graph, store, job by method; ``teacher`` for the teacher)."""
    study["methods"] = {"vanilla": {}, "kd": {}, "fitnet": {}}
    graph = expand_study(study)
    store = JobStore(tmp_path / "jobs")
    by_method = {}
    for job in graph.jobs:
        by_method["teacher" if job.stage == "teacher" else job.method] = job
        store.add(job)
        write_sealed(store.weights_path(job.job_id), {"w": torch.zeros(2)})
        teacher = (weights_fingerprint(store.weights_path(job.teacher_job))
                   if job.teacher_job else None)
        write_json(store.job_dir(job.job_id) / "result.json", {**_result_keys(job), "provenance": {
            "code_digest": code_digest(job), "code_files": code_files(job),
            "teacher_weights": teacher}})
        store.update_state(job.job_id, status="done", attempts=1, mlflow_run_id="old-run")
    return graph, store, by_method


@pytest.mark.parametrize("value, picked", [
    (None, set()),
    ("method:fitnet", {"fitnet"}),
    (["method:fitnet", "method:vanilla"], {"fitnet", "vanilla"}),
    ("stage:teacher", {"teacher", "kd", "fitnet"}),  # and the jobs that read the teacher
    ("all", {"teacher", "vanilla", "kd", "fitnet"}),
    ("stale", {"fitnet"}),
    ("failed", {"kd"}),
    ("job:", None),  # the prefix of the vanilla job's id
])
def test_rerun_values_pick_jobs_and_their_dependents(finished, value, picked):
    graph, store, by_method = finished
    kd, fitnet = by_method["kd"].job_id, by_method["fitnet"].job_id
    (store.job_dir(kd) / "result.json").unlink()  # kd failed; it has run (attempts 1)
    store.update_state(kd, status="failed")
    stale = store.result(fitnet)
    write_json(store.job_dir(fitnet) / "result.json",
               {**stale, "provenance": {**stale["provenance"], "code_digest": "0" * 64}})
    if value == "job:":
        value, picked = f"job:{by_method['vanilla'].job_id[:6]}", {"vanilla"}
    plan = plan_rerun(RerunRequest.parse(value, graph), graph, store)
    assert {m for m, job in by_method.items() if job.job_id in plan.reasons} == picked


def test_rerun_sets_old_files_aside_and_resets_the_state(finished):
    graph, store, by_method = finished
    fitnet = by_method["fitnet"].job_id
    (store.checkpoint_dir(fitnet)).mkdir()
    write_sealed(store.checkpoint_dir(fitnet) / "step-000000004.pt", {"w": torch.ones(1)})
    outbox = store.job_dir(fitnet) / "tracking-outbox.jsonl"
    outbox.write_text('{"ack": 0, "run_id": "old-run"}\n')
    text = prepare_rerun(RerunRequest.parse("method:fitnet", graph), graph, store)
    assert re.match(r"re-running 1 job \(1 selected\); old results kept in .*/jobs/<job>/"
                    r"superseded/\d{8}T\d{6}Z/$", text)
    (old,) = (store.job_dir(fitnet) / SUPERSEDED).iterdir()
    assert sorted(p.name for p in old.iterdir()) == [
        "checkpoints", "model.pt", "result.json", "state.json", "tracking-outbox.jsonl"]
    assert sorted(p.name for p in store.job_dir(fitnet).iterdir()) == [
        ".lock", "spec.json", "state.json", "superseded"]
    assert store.state(fitnet).mlflow_run_id is None and not store.is_done(fitnet)
    assert all(store.is_done(j.job_id) for j in graph.jobs if j.job_id != fitnet)


def _tree(folder: Path) -> dict:
    """Relative path -> bytes of every file under ``folder``, wherever it is below it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def test_a_crash_at_any_step_of_setting_aside_loses_nothing_and_completes_later(finished,
                                                                               monkeypatch):
    graph, store, by_method = finished
    teacher = by_method["teacher"].job_id
    folder = store.job_dir(teacher)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step-000000002.pt").write_bytes(b"ckpt")
    (folder / "tracking-outbox.jsonl").write_bytes(b"{}\n")
    before = {name: data for name, data in _tree(folder).items() if name != ".lock"}
    real = {"rename": os.rename, "replace": os.replace}
    calls = 0

    def crash_before(limit, name):
        def move(*args, **kwargs):
            nonlocal calls
            if calls >= limit:
                raise KeyboardInterrupt(f"killed before file operation {limit}")
            calls += 1
            return real[name](*args, **kwargs)
        return move

    # the marker, result.json, checkpoints/, model.pt, state.json, the outbox, the fresh state
    for step in range(7):
        calls = 0
        for name in real:
            monkeypatch.setattr(os, name, crash_before(step, name))
        with pytest.raises(KeyboardInterrupt):
            store.supersede(teacher, f"t{step}")
        for name, function in real.items():
            monkeypatch.setattr(os, name, function)
        old = folder / SUPERSEDED / f"t{step}"
        kept = {**_tree(old), **{n: d for n, d in _tree(folder).items()
                                if not n.startswith(SUPERSEDED) and n in before}}
        assert kept == before, f"a file was lost when killed before file operation {step}"
        if store.is_done(teacher):  # still finished: then it still has its weights
            assert store.weights_path(teacher).exists()
        if step == 0:  # killed before the marker: nothing was moved, nothing to complete
            assert store.complete_supersede(teacher) is None and store.is_done(teacher)
        else:
            assert store.complete_supersede(teacher) == old  # what the next run does first
            assert _tree(old) == {n: d for n, d in before.items() if n != "spec.json"}
            assert (folder / "spec.json").exists() and not (folder / SUPERSEDING).exists()
            assert store.state(teacher) == JobState(updated=store.state(teacher).updated)
        for name, data in before.items():  # put the job back for the next cut point
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        shutil.rmtree(old)


@pytest.mark.parametrize("value, field, words", [
    ("rerun=sometimes", "rerun", "Allowed values: stale, failed, all, method:<name>"),
    ("rerun=[stale,method:nomethod]", "rerun[1]", "Allowed values: method:crd"),
    ("rerun=stage:student", "rerun", "stage:teacher"),
    ("rerun=job:zz", "rerun", "not the start of a job id"),
    ("rerun=job:ffffffffff", "rerun", "no job of study smoke"),
    ("rerun=3", "rerun", "must be a term or a list"),
])
def test_bad_rerun_values_exit_2_and_run_nothing(tmp_path, capsys, value, field, words):
    code = main(["run", "study=smoke", value, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"`{field}`" in err and words in err, err
    assert "No job was started" in err and not (tmp_path / "jobs").exists()


def test_shell_forms_of_rerun_compose_to_valid_requests(finished):
    graph = finished[0]
    for override, terms in (("rerun=stale", ("stale",)), ("rerun=failed", ("failed",)),
                            ("rerun=[method:fitnet,method:kd]", ("method:fitnet", "method:kd"))):
        value = compose_config([override]).rerun
        value = list(value) if not isinstance(value, str) else value
        assert RerunRequest.parse(value, graph).terms == terms
