"""The report: cells (mean ± std over seeds), rows per method variant, convergence epochs."""
from __future__ import annotations

import csv

import torch

from kdflow.orchestrator.atomic import write_json
from kdflow.orchestrator.checkpoint import write_sealed
from kdflow.orchestrator.provenance import code_digest, code_files, weights_fingerprint
from kdflow.orchestrator.report import collect, epochs_to, write_report
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study


def _finish(store: JobStore, job, curve, digest=None, recorded=True):
    """Record ``job`` as finished with ``curve``, recording the current code's provenance (or
    ``digest`` as its code digest; none at all unless ``recorded``)."""
    store.add(job)
    teacher_weights = (weights_fingerprint(store.weights_path(job.teacher_job))
                       if job.teacher_job else None)
    provenance = {"code_digest": digest or code_digest(job), "code_files": code_files(job),
                  "teacher_weights": teacher_weights, "kdflow_version": "0.1.0", "git_commit": "c" * 40,
                  "git_dirty": False, "torch": "2.14.1", "cuda": None, "device": "cpu"}
    write_sealed(store.weights_path(job.job_id), {"w": torch.zeros(2)})
    write_json(store.job_dir(job.job_id) / "result.json", {
        "job_id": job.job_id, "stage": job.stage, "method": job.method, "teacher": job.teacher,
        "student": job.model, "dataset": job.dataset, "seed": job.seed, "epochs": len(curve),
        "wall_time_s": 1.0, "metrics": {"top1": curve[-1]},
        "history": [{"val/top1": v} for v in curve],
        **({"provenance": provenance} if recorded else {})})


def test_epochs_to_level():
    assert epochs_to([10.0, 50.0, 90.0, 95.0, 100.0], 0.9) == 3
    assert epochs_to([10.0, 50.0, 90.0, 95.0, 100.0], 0.99) == 5
    assert epochs_to([], 0.9) is None


def test_report_rows_columns_and_convergence(study, tmp_path):
    study["seeds"] = [0, 1]
    study["ablations"] = {"kd": {"temperature": [2.0, 4.0]}}
    study["train_fractions"] = [1.0, 0.5]
    graph = expand_study(study)
    store = JobStore(tmp_path / "jobs")
    curves = {("kd", 0): [40.0, 80.0, 90.0], ("kd", 1): [60.0, 70.0, 92.0]}
    for job in graph.jobs:
        if job.stage == "teacher":
            _finish(store, job, [95.0])
        elif job.labels["fraction"] == "1.0" and job.labels.get("variant") == "temperature=4.0":
            _finish(store, job, curves[("kd", job.seed)])
        elif job.method == "vanilla" and job.seed == 0:
            _finish(store, job, [30.0, 50.0, 70.0])
    columns, rows, cells = collect(graph, store)
    assert [c.fraction for c in columns] == ["1.0", "0.5"]
    assert rows == ["teacher", "vanilla", "kd | temperature=2.0", "kd | temperature=4.0"]
    full, half = columns
    kd = cells[("kd | temperature=4.0", full)]
    assert kd.values == [90.0, 92.0] and kd.render() == "91.00 ± 1.41"
    assert kd.mean_curve() == [50.0, 75.0, 91.0]
    assert cells[("vanilla", full)].render() == "70.00 (1/2)"
    assert cells[("kd | temperature=4.0", half)].render() == "-"
    assert cells[("teacher", half)].render() == "95.00"

    text = write_report(graph, store, tmp_path / "report")
    assert "| KD (temperature=4.0) | 91.00 ± 1.41 | - |" in text
    # convergence of the seed-mean curve [50, 75, 91]: 90% of 91 = 81.9 -> epoch 3
    assert "| KD (temperature=4.0) | 3 / 3 / 3 | - |" in text
    with open(tmp_path / "report" / "report.csv") as f:
        rows_csv = list(csv.DictReader(f))
    kd_row = next(r for r in rows_csv if r["method"] == "kd | temperature=4.0"
                  and r["train_fraction"] == "1.0")
    assert kd_row["top1_mean"] == "91.0000" and kd_row["values"] == "90.00 92.00"
    for name in ("accuracy.png", "curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


def test_report_marks_stale_cells_and_says_where_results_came_from(study, tmp_path):
    study["seeds"] = [0, 1]
    graph = expand_study(study)
    store = JobStore(tmp_path / "jobs")
    for job in graph.jobs:
        if job.method == "kd" and job.seed == 1:
            _finish(store, job, [80.0], digest="0" * 64)  # ran with other code: stale, mixed
        else:
            _finish(store, job, [80.0], recorded=not (job.method == "vanilla" and job.seed == 1))
    text = write_report(graph, store, tmp_path / "report")
    assert "| KD | 80.00 ± 0.00 † |" in text and "| Teacher | 80.00 |" in text
    assert ("- 4 results from kdflow 0.1.0; commit cccccccccccc; torch 2.14.1 (no CUDA) on cpu."
            in text)
    assert "Mixed: KD / resnet14→resnet8 averages results of 2 code digests" in text
    assert "- 1 result recorded no provenance" in text
    assert ("† 2 of 5 finished jobs are stale: 1: their code changed since they ran; 1: no "
            "provenance recorded") in text
    with open(tmp_path / "report" / "report.csv") as f:
        stale = {r["method"]: r["stale"] for r in csv.DictReader(f)}
    assert stale == {"teacher": "0", "vanilla": "1", "kd": "1"}
