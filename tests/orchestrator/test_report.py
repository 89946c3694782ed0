"""The report: cells (mean ± std over seeds), rows per method variant, convergence epochs,
the per-job and per-cell CSVs, and the figures (inspected as matplotlib Figures)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from kdflow.orchestrator import figures
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


def _read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _report_figures(graph, store, folder: Path, monkeypatch) -> Dict[str, Figure]:
    """Write the report of ``graph`` to ``folder``; return the figures it saved, by file name."""
    drawn: Dict[str, Figure] = {}
    save = figures.save

    def keep(fig: Figure, path: Path) -> None:
        drawn[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(figures, "save", keep)
    write_report(graph, store, folder)
    return drawn


def _row_colours(fig: Figure) -> Dict[str, set]:
    """Row (an artist's gid) -> the colours its lines and dots are drawn in, over all panels."""
    colours: Dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                colours.setdefault(line.get_gid(), set()).add(to_hex(line.get_color()))
        for dots in ax.collections:
            if dots.get_gid():
                colours.setdefault(dots.get_gid(), set()).update(
                    to_hex(c, keep_alpha=False) for c in dots.get_facecolor())
    return colours


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
    summary = _read_csv(tmp_path / "report" / "summary.csv")
    kd_row = next(r for r in summary if r["row"] == "kd | temperature=4.0"
                  and r["train_fraction"] == "1.0")
    assert (kd_row["method"], kd_row["variant"]) == ("kd", "temperature=4.0")
    assert kd_row["mean"] == "91.0000" and kd_row["std"] == "1.4142"
    assert kd_row["seeds_done"] == "2" and kd_row["epochs_to_90%"] == "3"
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
    stale = {r["row"]: r["stale"] for r in _read_csv(tmp_path / "report" / "summary.csv")}
    assert stale == {"teacher": "0", "vanilla": "1", "kd": "1"}
    jobs = _read_csv(tmp_path / "report" / "report.csv")
    assert sorted((r["row"], r["seed"], r["stale"], r["stale_reason"]) for r in jobs) == [
        ("kd", "0", "0", ""), ("kd", "1", "1", "code"), ("teacher", "0", "0", ""),
        ("vanilla", "0", "0", ""), ("vanilla", "1", "1", "no provenance")]


def _finish_twelve_student_rows(study, tmp_path):
    """A study of a teacher and 12 student rows (the student alone and 11 KD temperatures), seed
    0 finished everywhere with a 3-epoch curve, seed 1 only for the student alone (2 points
    higher)."""
    study["seeds"] = [0, 1]
    study["ablations"] = {"kd": {"temperature": [float(t) for t in range(1, 12)]}}
    graph = expand_study(study)
    store = JobStore(tmp_path / "jobs")
    for i, job in enumerate(graph.jobs):
        if job.seed == 0 or job.method == "vanilla":
            _finish(store, job, [60.0, 70.0 + i % 7, 80.0 + 2.0 * job.seed + 0.1 * (i % 5)])
    return graph, store


def test_accuracy_figure_is_dot_and_whisker_of_every_seed(study, tmp_path, monkeypatch):
    graph, store = _finish_twelve_student_rows(study, tmp_path)
    _, _, cells = collect(graph, store)
    accuracy = _report_figures(graph, store, tmp_path / "report", monkeypatch)["accuracy.png"]
    (ax,) = accuracy.axes
    assert not any(isinstance(c, BarContainer) for c in ax.containers) and not ax.patches
    assert all(isinstance(c, ErrorbarContainer) for c in ax.containers)
    assert ax.get_xlabel() == "top-1 accuracy (%), last epoch"
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == [
        "Teacher", "Student (alone)", "KD (temperature=1.0)"]
    by_row = {c.lines[0].get_gid(): c for c in ax.containers}
    for (row, _), cell in cells.items():
        (mean,) = by_row[row].lines[0].get_xdata()
        assert mean == pytest.approx(cell.mean)
        seeds = next(d for d in ax.collections if d.get_gid() == row)
        assert sorted(seeds.get_offsets()[:, 0]) == sorted(cell.values)
        assert by_row[row].has_xerr == (len(cell.values) > 1)  # no whisker for one seed
    vanilla = next(cell for (row, _), cell in cells.items() if row == "vanilla")
    whisker = by_row["vanilla"].lines[2][0].get_segments()[0][:, 0]
    assert whisker == pytest.approx([vanilla.mean - vanilla.std, vanilla.mean + vanilla.std])


def test_each_row_has_one_colour_in_every_figure_and_rows_differ(study, tmp_path, monkeypatch):
    graph, store = _finish_twelve_student_rows(study, tmp_path)
    drawn = _report_figures(graph, store, tmp_path / "report", monkeypatch)
    accuracy, curves = _row_colours(drawn["accuracy.png"]), _row_colours(drawn["curves.png"])
    assert len(accuracy) == 13 and set(curves) == set(accuracy) - {"teacher"}
    assert all(len(colours) == 1 for colours in [*accuracy.values(), *curves.values()])
    assert all(curves[row] == accuracy[row] for row in curves)
    assert len({colour for (colour,) in accuracy.values()}) == 13


def test_row_styles_stay_distinct_past_the_palette():
    for count in (1, 10, 12, 20, 45):
        styles = figures.row_styles([f"method{i}" for i in range(count)])
        assert len(set(styles.values())) == count
        assert len({style.colour for style in styles.values()}) == min(count, 20)
    ten, twelve = figures.row_styles(list("abcdefghij")), figures.row_styles(list("abcdefghijkl"))
    assert all(twelve[row] == style for row, style in ten.items())  # stable as rows are added


def test_curves_have_integer_epoch_ticks_and_a_legend_outside_the_panels(study, tmp_path,
                                                                        monkeypatch):
    study["train_fractions"] = [1.0, 0.5]
    graph, store = _finish_twelve_student_rows(study, tmp_path)
    curves = _report_figures(graph, store, tmp_path / "report", monkeypatch)["curves.png"]
    FigureCanvasAgg(curves).draw()
    renderer = curves.canvas.get_renderer()
    assert len(curves.axes) == 2
    for ax in curves.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(t == int(t) for t in ticks), ticks
        assert all(label.get_text().isdigit() for label in ax.get_xticklabels()
                   if label.get_text())
        assert ax.get_legend() is None
    (legend,) = curves.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == 12
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in curves.axes)
    assert curves.bbox.x0 <= box.x0 and box.x1 <= curves.bbox.x1  # and not cut off


def test_report_csv_has_one_row_per_finished_job_and_one_seed_has_no_std(study, tmp_path):
    graph, store = _finish_twelve_student_rows(study, tmp_path)
    text = write_report(graph, store, tmp_path / "report")
    jobs = _read_csv(tmp_path / "report" / "report.csv")
    finished = [j for j in graph.jobs if store.result(j.job_id)]
    assert [r["job_id"] for r in jobs] == [j.job_id for j in finished]
    assert all(r["metric"] == "top1" and float(r["value"]) > 0 for r in jobs)
    kd = next(r for r in jobs if r["variant"] == "temperature=3.0")
    assert (kd["stage"], kd["row"], kd["method"], kd["teacher"], kd["model"], kd["seed"],
            kd["dataset"], kd["train_fraction"], kd["epochs"], float(kd["wall_time_s"])) == (
        "ablation", "kd | temperature=3.0", "kd", "resnet14", "resnet8", "0", "synthetic",
        "1.0", "3", 1.0)
    teacher = next(r for r in jobs if r["stage"] == "teacher")
    assert (teacher["teacher"], teacher["model"]) == ("", "resnet14")
    summary = {r["row"]: r for r in _read_csv(tmp_path / "report" / "summary.csv")}
    assert (summary["kd | temperature=3.0"]["seeds_done"],
            summary["kd | temperature=3.0"]["std"]) == ("1", "")
    assert summary["teacher"]["std"] == "" and float(summary["vanilla"]["std"]) > 0
    table = text.split("\n\n")[1]
    kd_line = next(line for line in table.splitlines() if "(temperature=3.0)" in line)
    assert "±" not in kd_line and "(1/2)" in kd_line

