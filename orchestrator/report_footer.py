"""The report's footer: which kdflow, commit, torch build and code its results came from, whether
they are mixed, and how many are stale."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from kdflow.orchestrator.staleness import Staleness

if TYPE_CHECKING:
    from kdflow.orchestrator.report import Cell, Column

#: The mark of a table cell that holds stale results.
STALE_MARK = "†"
#: Hex digits of a commit or code digest shown in the report.
SHORT = 12


def _commit(record: Mapping[str, Any]) -> str:
    commit = record.get("git_commit")
    if not commit:
        return "no git checkout"
    dirty = " (uncommitted changes)" if record.get("git_dirty") else ""
    return f"commit {commit[:SHORT]}{dirty}"


def _build(record: Mapping[str, Any]) -> str:
    cuda = (f"CUDA {record['cuda']}, cuDNN {record.get('cudnn')}" if record.get("cuda")
            else "no CUDA")
    return f"torch {record.get('torch')} ({cuda}) on {record.get('device')}"


#: What the footer says of every result, and how it words each value.
ASPECTS: Tuple[Tuple[str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("kdflow version", lambda record: f"kdflow {record.get('kdflow_version') or '(none)'}"),
    ("commit", _commit),
    ("torch build", _build),
)


def _counted(values: List[str]) -> str:
    """``a`` when all are ``a``; else ``a (3 results), b (2 results)``."""
    counts = Counter(values)
    if len(counts) == 1:
        return values[0]
    return ", ".join(f"{value} ({_results(n)})" for value, n in counts.most_common())


def _results(n: int) -> str:
    return f"{n} result{'s' if n != 1 else ''}"


def provenance_footer(cells: Mapping[Tuple[str, "Column"], "Cell"], label: Callable[[str], str],
                      staleness: Staleness) -> str:
    """The footer of a report whose table is ``cells`` (rows named by ``label(row)``):

    the kdflow versions, commits and torch builds of its results (with counts where they
    differ); each row's code digests; a ``Mixed:`` line when the results come from more than
    one of any of them, or a cell averages results of different code; the stale count.
    """
    records: Dict[str, Optional[Mapping[str, Any]]] = {}
    for cell in cells.values():
        records.update(cell.sources)
    known = [r for r in records.values() if r]
    lines = []
    if known:
        described = {name: [word(r) for r in known] for name, word in ASPECTS}
        lines.append(f"{_results(len(known))} from "
                     + "; ".join(_counted(values) for values in described.values()) + ".")
        digests: Dict[str, List[str]] = {}
        for (row, _), cell in cells.items():
            for record in cell.sources.values():
                short = (record or {}).get("code_digest", "")[:SHORT]
                if short and short not in digests.setdefault(row, []):
                    digests[row].append(short)
        lines.append("Code digests (sha256 of the source that defines each row's jobs): "
                     + "; ".join(f"{label(row)} {', '.join(d)}" for row, d in digests.items())
                     + ".")
        mixed = [f"{len(set(values))} {name}s" for name, values in described.items()
                 if len(set(values)) > 1]
        mixed += [f"{label(row)} / {column.short} averages results of {n} code digests"
                  for (row, column), cell in cells.items()
                  if (n := len({r["code_digest"] for r in cell.sources.values() if r})) > 1]
        if mixed:
            lines.append(f"Mixed: {'; '.join(mixed)}: compare these results with care.")
    if len(known) < len(records):
        lines.append(f"{_results(len(records) - len(known))} recorded no provenance (finished "
                     "before kdflow recorded it).")
    if staleness.stale:
        lines.append(f"{STALE_MARK} {staleness.summary()}.")
    return "\n".join(["Provenance:"] + [f"- {line}" for line in lines]) if lines else ""
