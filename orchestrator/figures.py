"""The report's figures, built as matplotlib :class:`~matplotlib.figure.Figure` objects (no
pyplot state) so tests can inspect them before they are saved.

Every row (a teacher variant, a method, a method with an ablation setting) gets one style
(:func:`row_styles`), assigned once from the report's ordered rows and used by every figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, NamedTuple, Sequence, Tuple

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from kdflow.orchestrator.report import Cell, Column

Cells = Mapping[Tuple[str, "Column"], "Cell"]
#: tab20's dark colours (tab10's) first, then their light partners: the first 10 rows get
#: strong, well separated colours, and a row keeps its colour when a study grows past 10.
PALETTE = tuple(to_hex(colormaps["tab20"](i)) for i in (*range(0, 20, 2), *range(1, 20, 2)))
#: The markers and line styles that tell apart rows sharing a colour (past the palette's size).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
#: How the axes name a metric (others by their key).
AXIS_NAMES = {"top1": "top-1 accuracy", "miou": "mIoU"}
#: Vertical offset of the individual seeds below their row's mean marker.
SEED_OFFSET = 0.22
DPI = 120


class RowStyle(NamedTuple):
    """How a row is drawn in every figure."""

    colour: str
    marker: str
    linestyle: str


def row_styles(rows: Sequence[str]) -> Dict[str, RowStyle]:
    """One style per row, in the order of ``rows``: the i-th row takes the i-th colour of
    :data:`PALETTE`; past its 20 colours they repeat with the next marker and line style, so up
    to ``20 * len(MARKERS)`` rows all look different."""
    styles = {}
    for i, row in enumerate(rows):
        cycle = i // len(PALETTE)
        styles[row] = RowStyle(PALETTE[i % len(PALETTE)], MARKERS[cycle % len(MARKERS)],
                               LINESTYLES[cycle % len(LINESTYLES)])
    return styles


def accuracy_figure(columns: Sequence["Column"], rows: Sequence[str], cells: Cells, metric: str,
                    styles: Mapping[str, RowStyle], label: Callable[[str], str]) -> Figure:
    """Dot-and-whisker plot: one panel per column, one line per row (named on the y-axis, first
    row on top). Each seed is a small dot; the mean over seeds a larger marker with a whisker of
    one sample standard deviation (none for a single seed). Artists carry their row as ``gid``.
    The x axis spans the results only: positions, not lengths, carry the values."""
    width = 2.2 + 0.06 * max((len(label(r)) for r in rows), default=0) + 3.0 * max(1, len(columns))
    fig = Figure(figsize=(width, 1.3 + 0.32 * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(1, max(1, len(columns)), sharey=True, squeeze=False)[0]
    positions = {row: -float(i) for i, row in enumerate(rows)}
    for ax, column in zip(axes, columns):
        for row in rows:
            cell = cells.get((row, column))
            if cell is not None and cell.values:
                _draw_cell(ax, positions[row], cell, styles[row], row)
        ax.set_title(column.title, fontsize=8)
        ax.set_xlabel(f"{axis_name(metric)} (%), last epoch")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(positions.values()), [label(r) for r in rows], fontsize=8)
    axes[0].set_ylim(-len(rows) + 0.5, 0.5)
    fig.suptitle("large marker and whisker: mean ± sample std over seeds; small dots: each seed",
                 fontsize=8)
    return fig


def axis_name(metric: str) -> str:
    """``top1`` -> ``top-1 accuracy``: how the axes name ``metric``."""
    return AXIS_NAMES.get(metric, metric)


def _draw_cell(ax: Axes, y: float, cell: "Cell", style: RowStyle, row: str) -> None:
    """The seeds of ``cell`` as small dots below ``y``, its mean ± std as a marker and whisker."""
    ax.scatter(cell.values, [y - SEED_OFFSET] * len(cell.values), s=10, color=style.colour,
               marker=style.marker, alpha=0.6, linewidths=0, gid=row)
    xerr = None if cell.std is None else [cell.std]
    bar = ax.errorbar([cell.mean], [y], xerr=xerr, fmt=style.marker, color=style.colour,
                      markersize=6, capsize=3)
    bar.lines[0].set_gid(row)


def curves_figure(columns: Sequence["Column"], rows: Sequence[str], cells: Cells, metric: str,
                  styles: Mapping[str, RowStyle], label: Callable[[str], str]) -> Figure:
    """Validation metric per epoch (mean over seeds): one panel per column, one line per row
    with at least two epochs, integer epoch ticks, one legend to the right of the panels."""
    count = max(1, len(columns))
    fig = Figure(figsize=(4.2 * count + 2.8, 3.4), layout="constrained")
    axes = fig.subplots(1, count, squeeze=False)[0]
    for ax, column in zip(axes, columns):
        for row in rows:
            cell = cells.get((row, column))
            curve = cell.mean_curve() if cell is not None else []
            if len(curve) >= 2:
                _draw_curve(ax, curve, styles[row], row, label(row))
        ax.set_title(column.title, fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {axis_name(metric)} (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(fig, list(axes))
    return fig


def _draw_curve(ax: Axes, curve: List[float], style: RowStyle, row: str, name: str) -> None:
    """``curve`` at epochs 1, 2, ..., with about ten markers."""
    ax.plot(range(1, len(curve) + 1), curve, color=style.colour, linestyle=style.linestyle,
            marker=style.marker, markersize=3, markevery=max(1, len(curve) // 10), label=name,
            gid=row)


def _legend_outside(fig: Figure, axes: List[Axes]) -> None:
    """One legend of every labelled line in ``axes``, right of the panels (none if none)."""
    handles: Dict[str, object] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)


def save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG to ``path``."""
    fig.savefig(path, dpi=DPI)
