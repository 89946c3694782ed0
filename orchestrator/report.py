"""Paper-style results of a study: a markdown table (mean +- std over seeds), convergence
speed, CSVs (one row per job; one per table cell) and plots (and, for segmentation, validation
images with each method's prediction).

Each column reports its dataset's task metric: top-1 accuracy for classification, mIoU for
segmentation (``orchestrator.metrics``), both in percent.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from kdflow.methods.distillers import DISTILLERS
from kdflow.methods.tasks import CLASSIFICATION, SEGMENTATION
from kdflow.orchestrator.data import DATASETS
from kdflow.orchestrator.atomic import replace_files
from kdflow.orchestrator.metrics import primary_metric
from kdflow.orchestrator.report_footer import STALE_MARK, provenance_footer
from kdflow.orchestrator.runner import VAL_SAMPLES
from kdflow.orchestrator.seg_figure import draw_samples
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.staleness import Stale, Staleness, assess
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

TEACHER_ROW = "teacher"
VARIANT_SEP = " | "  # row keys: "<method> | <setting=value, ...>"
CONVERGENCE_LEVELS = (0.90, 0.95, 0.99)
#: The files of a report, in the order they are put in place: ``report.md`` last.
REPORT_FILES = ("report.csv", "summary.csv", "accuracy.png", "curves.png", "segmentation.png",
                "report.md")


class Column(NamedTuple):
    """One column of the table: a teacher/student pair on a dataset (and training fraction)."""

    dataset: str
    fraction: str
    teacher: str
    student: str

    @property
    def title(self) -> str:
        share = f", {float(self.fraction):.0%} of train" if self.fraction else ""
        return f"{self.teacher} → {self.student} ({self.dataset}{share})"

    @property
    def short(self) -> str:
        share = f" {float(self.fraction):.0%}" if self.fraction else ""
        return f"{self.teacher}→{self.student}{share}"


@dataclass
class Cell:
    """One method on one column: a result per finished seed (accuracy in percent, and the
    validation curve per epoch).

    sources: job id -> the ``provenance`` its result recorded (None: none), per finished seed;
    stale:   how many of those results are stale (the cell is marked with ``†``).
    """

    values: List[float]
    curves: List[List[float]]
    expected: int
    sources: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)
    stale: int = 0

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        """The sample standard deviation over seeds; None below two seeds."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def render(self) -> str:
        if not self.values:
            return "-"
        text = f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"
        if len(self.values) < self.expected:
            text += f" ({len(self.values)}/{self.expected})"
        return text + (f" {STALE_MARK}" if self.stale else "")

    def mean_curve(self) -> List[float]:
        """Validation top-1 per epoch, averaged over the finished seeds."""
        length = min((len(c) for c in self.curves), default=0)
        return [statistics.fmean(c[e] for c in self.curves) for e in range(length)]


def epochs_to(curve: List[float], level: float) -> Optional[int]:
    """The first epoch (1-based) whose accuracy reaches ``level`` x the last epoch's."""
    if not curve:
        return None
    target = level * curve[-1]
    return next(e + 1 for e, value in enumerate(curve) if value >= target)


def row_key(job: JobSpec) -> str:
    """The report row of a job: ``teacher...`` rows for teachers, else the method and its
    ablation variant."""
    if job.stage == "teacher":
        kind = "" if job.method == "vanilla" else f":{job.method}"
        return f"{TEACHER_ROW}{kind}{':random' if job.recipe.get('epochs') == 0 else ''}"
    variant = job.labels.get("variant")
    return f"{job.method}{VARIANT_SEP}{variant}" if variant else job.method


def row_label(key: str) -> str:
    """``kd`` -> ``KD``; ``teacher:hsakd_teacher`` -> ``Teacher (HSAKD teacher)``."""
    if key.startswith(TEACHER_ROW):
        parts = key.split(":")[1:]
        notes = ["random init" if p == "random" else DISTILLERS.get(p).display_name or p
                 for p in parts]
        return "Teacher" + (f" ({', '.join(notes)})" if notes else "")
    method, _, variant = key.partition(VARIANT_SEP)
    label = DISTILLERS.get(method).display_name or method
    return f"{label} ({variant})" if variant else label


def dataset_task(dataset: str) -> str:
    """The task of registered dataset ``dataset`` (its Config's ``task``; classification)."""
    return getattr(DATASETS.get(dataset).Config, "task", CLASSIFICATION)


def study_metric(graph: JobGraph) -> str:
    """The metric of the study's student datasets: ``top1``, or ``miou`` when they segment."""
    tasks = {dataset_task(j.dataset) for j in graph.jobs if j.stage != "teacher"}
    return primary_metric(SEGMENTATION if tasks == {SEGMENTATION} else CLASSIFICATION)


def pair_teacher(job: JobSpec) -> str | None:
    """The study pair's teacher a student job belongs to (a cross-task job reads another)."""
    return job.labels.get("pair_teacher") or job.teacher


def collect(graph: JobGraph, store: JobStore, metric: str | None = None,
            staleness: Staleness | None = None) -> Tuple[List[Column], List[str],
                                                         Dict[Tuple[str, Column], Cell]]:
    """Group results into cells keyed by (row, column); ``metric`` defaults to the study's.
    With ``staleness``, each cell counts its stale results.

    Columns are the study's pairs per dataset and training fraction; rows are the teacher
    variants and then the methods (and their ablation variants) in study order. A teacher-free
    job (the student alone) fills the cell of every pair whose student it trains, and a
    teacher fills every column of its dataset whose teacher it is. A cross-task job (its
    teacher another architecture, or trained on another dataset) fills its pair's column.
    """
    metric = metric or study_metric(graph)
    teacher_model = {j.job_id: j.model for j in graph.jobs if j.stage == "teacher"}
    students = [j for j in graph.jobs if j.stage != "teacher"]
    teachers = [j for j in graph.jobs if j.stage == "teacher"]
    methods = list(dict.fromkeys(j.method for j in students))
    rows = list(dict.fromkeys(row_key(j) for j in teachers))
    rows += sorted(dict.fromkeys(row_key(j) for j in students),
                   key=lambda key: (methods.index(key.partition(VARIANT_SEP)[0]), key))
    columns = list(dict.fromkeys(
        Column(j.dataset, j.labels.get("fraction", ""),
               j.labels.get("pair_teacher") or teacher_model[j.teacher_job], j.model)
        for j in students if j.teacher_job))
    cells: Dict[Tuple[str, Column], Cell] = {}
    for column in columns:
        for job in graph.jobs:
            if job.dataset != column.dataset:
                continue
            if job.stage == "teacher":
                matches = job.model == column.teacher
            else:
                matches = (job.model == column.student
                           and pair_teacher(job) in (None, column.teacher)
                           and job.labels.get("fraction", "") == column.fraction)
            if not matches:
                continue
            cell = cells.setdefault((row_key(job), column), Cell([], [], 0))
            cell.expected += 1
            result = store.result(job.job_id)
            if result:
                cell.values.append(result["metrics"][metric])
                cell.curves.append([h[f"val/{metric}"] for h in result["history"]])
                cell.sources[job.job_id] = result.get("provenance")
                cell.stale += staleness is not None and job.job_id in staleness.stale
    return columns, rows, cells


def _table(columns: List[Column], rows: List[str], cells: Dict[Tuple[str, Column], Cell],
           render) -> str:
    lines = ["| Method | " + " | ".join(c.title for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        values = [render(cells[(row, c)]) if (row, c) in cells else "-" for c in columns]
        lines.append(f"| {row_label(row)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown_table(graph: JobGraph, store: JobStore, metric: str | None = None) -> str:
    """The metric per method (rows) and pair (columns), mean ± sample std over seeds; cells
    holding stale results are marked ``†``."""
    return _table(*collect(graph, store, metric, assess(graph, store)), Cell.render)


def convergence_table(graph: JobGraph, store: JobStore, metric: str | None = None) -> str:
    """Epochs until the seed-mean validation curve first reaches 90/95/99% of its final value."""
    columns, rows, cells = collect(graph, store, metric)
    students = [r for r in rows if not r.startswith(TEACHER_ROW)]

    def render(cell: Cell) -> str:
        curve = cell.mean_curve()
        if not curve:
            return "-"
        return " / ".join(str(epochs_to(curve, level)) for level in CONVERGENCE_LEVELS)

    return _table(columns, students, cells, render)


METRIC_NAMES = {"top1": "Top-1 accuracy", "miou": "mIoU (ignore index 255, whole split)"}


def write_report(graph: JobGraph, store: JobStore, folder: Path,
                 metric: str | None = None) -> str:
    """Write ``report.md``, ``report.csv`` (one row per finished job), ``summary.csv`` (one row
    per table cell), ``accuracy.png`` and ``curves.png`` (and, for segmentation studies,
    ``segmentation.png``) into ``folder``; return the markdown.

    All or nothing: the files are made in a temporary folder and moved in once every one is
    complete (:func:`orchestrator.atomic.replace_files`), so a failure (a full disk raises
    :class:`orchestrator.atomic.DiskFull`) leaves the previous report as it was. The markdown
    ends with where its results came from (:func:`provenance_footer`); cells holding stale
    results are marked ``†``, and both CSVs say which (``stale``)."""
    metric = metric or study_metric(graph)
    staleness = assess(graph, store)
    columns, rows, cells = collect(graph, store, metric, staleness)
    seeds = sorted({j.seed for j in graph.jobs if j.stage != "teacher"})
    levels = "/".join(f"{level:.0%}" for level in CONVERGENCE_LEVELS)
    text = (f"{METRIC_NAMES.get(metric, metric)} (%) on the held-out split of study "
            f"`{graph.study}`, last epoch, mean ± sample std over seeds {seeds}.\n\n"
            f"{_table(columns, rows, cells, Cell.render)}\n\n"
            f"Convergence: epochs until the seed-mean validation {metric} first reaches "
            f"{levels} of its final value (curves in curves.png).\n\n"
            f"{convergence_table(graph, store, metric)}\n\n"
            f"Data: report.csv (one row per finished job), summary.csv (one row per table "
            f"cell).\n\n"
            f"{provenance_footer(cells, row_label, staleness)}\n")

    def write(staging: Path) -> None:
        nonlocal text
        write_csv(staging / "report.csv", JOB_FIELDS,
                  job_records(graph, store, metric, staleness))
        write_csv(staging / "summary.csv", SUMMARY_FIELDS,
                  summary_records(columns, rows, cells, metric))
        write_figures(columns, rows, cells, metric, staging)
        if plot_segmentation_samples(graph, store, staging / "segmentation.png"):
            text += ("\nValidation images, their ground truth and each method's prediction "
                     "(first seed): segmentation.png\n")
        (staging / "report.md").write_text(text)

    replace_files(folder, write, REPORT_FILES)
    return text


#: The columns of ``report.csv``: one row per finished job (see :func:`job_records`).
JOB_FIELDS = ("job_id", "stage", "row", "method", "variant", "dataset", "train_fraction",
              "teacher", "model", "seed", "metric", "value", "epochs", "wall_time_s", "stale",
              "stale_reason")
#: The columns of ``summary.csv``: one row per table cell (see :func:`summary_records`).
SUMMARY_FIELDS = ("dataset", "train_fraction", "teacher", "student", "row", "method", "variant",
                  "metric", "seeds_done", "seeds_expected", "mean", "std",
                  *(f"epochs_to_{level:.0%}" for level in CONVERGENCE_LEVELS), "stale")


def job_records(graph: JobGraph, store: JobStore, metric: str,
                staleness: Staleness) -> List[Dict[str, Any]]:
    """One record per finished job of ``graph``, in graph order (:func:`job_record`)."""
    return [job_record(job, result, metric, staleness.stale.get(job.job_id))
            for job in graph.jobs if (result := store.result(job.job_id)) is not None]


def job_record(job: JobSpec, result: Dict[str, Any], metric: str,
               stale: Optional[Stale]) -> Dict[str, Any]:
    """The ``report.csv`` record of finished ``job`` with ``result``: ``value`` is its
    ``metric``, or its own task's metric where it records no ``metric`` (a teacher trained on
    another task).

    ``row`` is the job's report row (:func:`row_key`); ``model`` the architecture it trained;
    ``teacher`` the study pair's teacher it learned from (empty for teachers and teacher-free
    jobs); ``stale`` 1 or 0, and ``stale_reason`` why (a kind of :mod:`orchestrator.staleness`).
    """
    measured = metric if metric in result["metrics"] else primary_metric(dataset_task(job.dataset))
    return {"job_id": job.job_id, "stage": job.stage, "row": row_key(job), "method": job.method,
            "variant": job.labels.get("variant", ""), "dataset": job.dataset,
            "train_fraction": job.labels.get("fraction") or "1.0",
            "teacher": "" if job.stage == "teacher" else pair_teacher(job) or "",
            "model": job.model, "seed": job.seed, "metric": measured,
            "value": result["metrics"][measured], "epochs": result.get("epochs", ""),
            "wall_time_s": _rounded(result.get("wall_time_s")), "stale": int(stale is not None),
            "stale_reason": stale.kind if stale else ""}


def summary_records(columns: List[Column], rows: List[str], cells: Dict[Tuple[str, Column], Cell],
                    metric: str) -> List[Dict[str, Any]]:
    """One record per cell (column by column, rows in report order): the seeds done and
    expected, mean and sample std of ``metric`` (std empty below two seeds, mean empty with
    none), epochs to each convergence level, and how many of its results are stale.
    ``method`` and ``variant`` split ``row`` (a teacher row is its own ``method``)."""
    records = []
    for column in columns:
        for row in (r for r in rows if (r, column) in cells):
            cell = cells[(row, column)]
            curve = cell.mean_curve()
            method, _, variant = row.partition(VARIANT_SEP)
            records.append({
                "dataset": column.dataset, "train_fraction": column.fraction or "1.0",
                "teacher": column.teacher, "student": column.student, "row": row,
                "method": method, "variant": variant, "metric": metric,
                "seeds_done": len(cell.values), "seeds_expected": cell.expected,
                "mean": _number(cell.mean), "std": _number(cell.std),
                **{f"epochs_to_{level:.0%}": epochs_to(curve, level) or ""
                   for level in CONVERGENCE_LEVELS},
                "stale": cell.stale})
    return records


def _rounded(seconds: Optional[float]) -> Any:
    """``seconds`` to milliseconds; empty when there are none."""
    return "" if seconds is None else round(seconds, 3)


def _number(value: Optional[float]) -> str:
    """``value`` to four decimals; empty when there is none."""
    return "" if value is None else f"{value:.4f}"


def write_csv(path: Path, fields: Sequence[str], records: List[Dict[str, Any]]) -> None:
    """``records`` as a CSV with the header ``fields``."""
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fields)
        out.writeheader()
        out.writerows(records)


def write_figures(columns: List[Column], rows: List[str], cells: Dict[Tuple[str, Column], Cell],
                  metric: str, folder: Path) -> None:
    """``accuracy.png`` (every row) and ``curves.png`` (student rows) into ``folder``, each row
    drawn in the same style in both."""
    from kdflow.orchestrator import figures  # matplotlib loads only when a report is drawn

    styles = figures.row_styles(rows)
    students = [r for r in rows if not r.startswith(TEACHER_ROW)]
    figures.save(figures.accuracy_figure(columns, rows, cells, metric, styles, row_label),
                 folder / "accuracy.png")
    figures.save(figures.curves_figure(columns, students, cells, metric, styles, row_label),
                 folder / "curves.png")


def plot_segmentation_samples(graph: JobGraph, store: JobStore, path: Path) -> bool:
    """Draw the saved validation samples of the first segmentation dataset's finished jobs
    (teachers, then each student row and pair, first seed) to ``path``; False if there are none."""
    jobs = [j for j in graph.jobs if dataset_task(j.dataset) == SEGMENTATION]
    if not jobs:
        return False
    dataset, seed = jobs[0].dataset, min(j.seed for j in jobs if j.stage != "teacher")
    pairs = {pair_teacher(j) for j in jobs if j.stage != "teacher" and pair_teacher(j)}
    panels = []
    for job in jobs:
        sample_file = store.job_dir(job.job_id) / VAL_SAMPLES
        if job.dataset != dataset or (job.stage != "teacher" and job.seed != seed) \
                or not sample_file.exists():
            continue
        title = row_label(row_key(job))
        if job.stage == "teacher" or len(pairs) > 1:
            title += f"\n{job.model}" if job.stage == "teacher" else f"\n{pair_teacher(job) or ''}→{job.model}"
        panels.append((title, torch.load(sample_file, weights_only=True)))
    if not panels:
        return False
    draw_samples(panels, path)
    return True
