"""Paper-style results of a study: a markdown table (mean +- std over seeds), convergence
speed, CSV and plots (and, for segmentation, validation images with each method's prediction).

Each column reports its dataset's task metric: top-1 accuracy for classification, mIoU for
segmentation (``orchestrator.metrics``), both in percent.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

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
from kdflow.orchestrator.staleness import Staleness, assess
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

TEACHER_ROW = "teacher"
VARIANT_SEP = " | "  # row keys: "<method> | <setting=value, ...>"
CONVERGENCE_LEVELS = (0.90, 0.95, 0.99)
#: The files of a report, in the order they are put in place: ``report.md`` last.
REPORT_FILES = ("report.csv", "accuracy.png", "curves.png", "segmentation.png", "report.md")


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
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def render(self) -> str:
        if not self.values:
            return "-"
        text = f"{self.mean:.2f}" if len(self.values) == 1 else f"{self.mean:.2f} ± {self.std:.2f}"
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
    """Write ``report.md``, ``report.csv``, ``accuracy.png`` and ``curves.png`` (and, for
    segmentation studies, ``segmentation.png``) into ``folder``; return the markdown.

    All or nothing: the files are made in a temporary folder and moved in once every one is
    complete (:func:`orchestrator.atomic.replace_files`), so a failure (a full disk raises
    :class:`orchestrator.atomic.DiskFull`) leaves the previous report as it was. The markdown
    ends with where its results came from (:func:`provenance_footer`); cells holding stale
    results are marked ``†``, and the CSV counts them (``stale``)."""
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
            f"{provenance_footer(cells, row_label, staleness)}\n")

    def write(staging: Path) -> None:
        nonlocal text
        _write_csv(cells, metric, staging / "report.csv")
        _plot_accuracy(columns, rows, cells, staging / "accuracy.png", metric)
        _plot_curves(columns, rows, cells, staging / "curves.png", metric)
        if plot_segmentation_samples(graph, store, staging / "segmentation.png"):
            text += ("\nValidation images, their ground truth and each method's prediction "
                     "(first seed): segmentation.png\n")
        (staging / "report.md").write_text(text)

    replace_files(folder, write, REPORT_FILES)
    return text


def _write_csv(cells: Dict[Tuple[str, Column], Cell], metric: str, path: Path) -> None:
    """One CSV row per cell: column, row, seeds, mean, std, values, convergence, stale count."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["dataset", "train_fraction", "teacher", "student", "method", "seeds_done",
                      "seeds_expected", f"{metric}_mean", f"{metric}_std", "values"]
                     + [f"epochs_to_{level:.0%}" for level in CONVERGENCE_LEVELS] + ["stale"])
        for (row, column), cell in cells.items():
            curve = cell.mean_curve()
            out.writerow([column.dataset, column.fraction or "1.0", column.teacher, column.student,
                          row, len(cell.values), cell.expected,
                          "" if cell.mean is None else f"{cell.mean:.4f}", f"{cell.std:.4f}",
                          " ".join(f"{v:.2f}" for v in cell.values)]
                         + [epochs_to(curve, level) or "" for level in CONVERGENCE_LEVELS]
                         + [cell.stale])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(columns: List[Column], rows: List[str], cells: Dict[Tuple[str, Column], Cell],
                   path: Path, metric: str) -> None:
    """Grouped bars: one group per column, one bar per row, error bars = std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(columns) + 2), 3.6))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs, means, stds = [], [], []
        for j, column in enumerate(columns):
            cell = cells.get((row, column))
            if cell and cell.mean is not None:
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                means.append(cell.mean)
                stds.append(cell.std)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=row_label(row))
    finite = [c.mean for c in cells.values() if c.mean is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
    ax.set_xticks(range(len(columns)), [c.short for c in columns])
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(columns: List[Column], rows: List[str], cells: Dict[Tuple[str, Column], Cell],
                 path: Path, metric: str) -> None:
    """Validation accuracy per epoch (mean over seeds), one panel per column, a line per row."""
    plt = _pyplot()
    count = max(1, len(columns))
    fig, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.4), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for row in rows:
            cell = cells.get((row, column))
            curve = cell.mean_curve() if cell else []
            if row.startswith(TEACHER_ROW) or len(curve) < 2:
                continue
            ax.plot(range(1, len(curve) + 1), curve, label=row_label(row))
        ax.set_title(column.title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {metric} (%)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
