"""Paper-style results of a study: a markdown table (mean +- std over seeds), CSV and plots."""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from methods.distillers import DISTILLERS
from orchestrator.spec import JobSpec
from orchestrator.store import JobStore
from orchestrator.study import JobGraph

TEACHER_ROW = "teacher"


@dataclass
class Cell:
    """Accuracies (percent) of one method on one pair, one value per finished seed."""

    values: List[float]
    expected: int

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def render(self) -> str:
        if not self.values:
            return "-"
        text = f"{self.mean:.2f}" if self.expected == 1 else f"{self.mean:.2f} ± {self.std:.2f}"
        if len(self.values) < self.expected:
            text += f" ({len(self.values)}/{self.expected})"
        return text


Column = Tuple[str, str, str]  # dataset, teacher, student


def row_key(job: JobSpec) -> str:
    """The report row of a job: ``teacher...`` rows for teachers, else method[variant]."""
    if job.stage == "teacher":
        kind = "" if job.method == "vanilla" else f":{job.method}"
        return f"{TEACHER_ROW}{kind}{':random' if job.recipe.get('epochs') == 0 else ''}"
    variant = job.labels.get("variant")
    return f"{job.method}[{variant}]" if variant else job.method


def row_label(key: str) -> str:
    """``kd`` -> ``KD``; ``teacher:hsakd_teacher`` -> ``Teacher (HSAKD teacher)``."""
    if key.startswith(TEACHER_ROW):
        parts = key.split(":")[1:]
        notes = ["random init" if p == "random" else DISTILLERS.get(p).display_name or p
                 for p in parts]
        return "Teacher" + (f" ({', '.join(notes)})" if notes else "")
    method, _, variant = key.partition("[")
    label = DISTILLERS.get(method).display_name or method
    return f"{label} ({variant.rstrip(']')})" if variant else label


def collect(graph: JobGraph, store: JobStore,
            metric: str = "top1") -> Tuple[List[Column], List[str], Dict[Tuple[str, Column], Cell]]:
    """Group finished results into cells keyed by (row, column).

    Columns are the study's (dataset, teacher, student) pairs; rows are the teacher variants
    and then the methods (and their ablation variants) in study order. A teacher-free job
    (the student alone) fills the cell of every pair whose student it trains.
    """
    teacher_model = {j.job_id: j.model for j in graph.jobs if j.stage == "teacher"}
    students = [j for j in graph.jobs if j.stage != "teacher"]
    teachers = [j for j in graph.jobs if j.stage == "teacher"]
    methods = list(dict.fromkeys(j.method for j in students))
    rows = list(dict.fromkeys(row_key(j) for j in teachers))
    rows += sorted(dict.fromkeys(row_key(j) for j in students),
                   key=lambda key: (methods.index(key.partition("[")[0]), key))
    columns = list(dict.fromkeys((j.dataset, teacher_model[j.teacher_job], j.model)
                                 for j in students if j.teacher_job))
    cells: Dict[Tuple[str, Column], Cell] = {}
    for column in columns:
        dataset, teacher, student = column
        for job in graph.jobs:
            if job.dataset != dataset:
                continue
            if job.stage == "teacher":
                matches = job.model == teacher
            else:
                matches = job.model == student and job.teacher in (None, teacher)
            if not matches:
                continue
            cell = cells.setdefault((row_key(job), column), Cell([], 0))
            cell.expected += 1
            result = store.result(job.job_id)
            if result:
                cell.values.append(result["metrics"][metric])
    return columns, rows, cells


def markdown_table(graph: JobGraph, store: JobStore, metric: str = "top1") -> str:
    columns, rows, cells = collect(graph, store, metric)
    multi_dataset = len({c[0] for c in columns}) > 1
    heads = [f"{t} → {s}" + (f" ({d})" if multi_dataset else "") for d, t, s in columns]
    lines = ["| Method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        values = [cells[(row, c)].render() if (row, c) in cells else "-" for c in columns]
        lines.append(f"| {row_label(row)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_report(graph: JobGraph, store: JobStore, folder: Path, metric: str = "top1") -> str:
    """Write ``report.md``, ``report.csv``, ``accuracy.png`` and ``curves.png``; return the md."""
    folder.mkdir(parents=True, exist_ok=True)
    columns, rows, cells = collect(graph, store, metric)
    table = markdown_table(graph, store, metric)
    seeds = sorted({j.seed for j in graph.jobs if j.stage != "teacher"})
    caption = (f"Top-1 accuracy (%) on the held-out split of study `{graph.study}`, last epoch, "
               f"mean ± sample std over seeds {seeds}.")
    text = f"{caption}\n\n{table}\n"
    (folder / "report.md").write_text(text)
    with open(folder / "report.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["dataset", "teacher", "student", "method", "seeds_done", "seeds_expected",
                      f"{metric}_mean", f"{metric}_std", "values"])
        for (row, (dataset, teacher, student)), cell in cells.items():
            out.writerow([dataset, teacher, student, row, len(cell.values), cell.expected,
                          "" if cell.mean is None else f"{cell.mean:.4f}", f"{cell.std:.4f}",
                          " ".join(f"{v:.2f}" for v in cell.values)])
    _plot_accuracy(columns, rows, cells, folder / "accuracy.png", metric)
    _plot_curves(graph, store, columns, folder / "curves.png")
    return text


def _plot_accuracy(columns: List[Column], rows: List[str], cells: Dict[Tuple[str, Column], Cell],
                   path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_xticks(range(len(columns)), [f"{t}→{s}" for _, t, s in columns])
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(graph: JobGraph, store: JobStore, columns: List[Column], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(4 * max(1, len(columns)), 3.2),
                             squeeze=False)
    for ax, (dataset, teacher, student) in zip(axes[0], columns):
        curves: Dict[str, List[List[float]]] = {}
        for job in graph.jobs:
            result = store.result(job.job_id)
            if not result or job.stage == "teacher" or job.dataset != dataset or job.model != student:
                continue
            if job.teacher is not None and job.teacher != teacher:
                continue
            curves.setdefault(row_key(job), []).append([h["val/top1"] for h in result["history"]])
        for method, runs in curves.items():
            length = min(len(r) for r in runs)
            mean = [statistics.fmean(r[e] for r in runs) for e in range(length)]
            ax.plot(range(1, length + 1), mean, label=row_label(method))
        ax.set_title(f"{teacher} → {student} ({dataset})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
