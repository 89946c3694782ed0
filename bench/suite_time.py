"""Where the test suite's time goes, from the JUnit XML that ``make test`` and ``make check``
write (``test-results/<tier>.xml``).

Prints, for each folder under ``tests/``, the number of tests and their seconds (setup, call
and teardown together, as pytest's JUnit writer times each test case), the total against the
target (:data:`TARGET_S`, 25 minutes of test time on 2 cores for ``make test``), and the slowest
tests; writes the same as JSON (``--out``, default ``bench/results/suite-<tier>-<date>.cpu.json``,
git-ignored).

    python bench/suite_time.py test-results/test.xml
    python bench/suite_time.py test-results/check.xml --target 180
"""
from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
#: ``make test``'s target: the whole suite in 25 minutes on 2 cores; seconds.
TARGET_S = 25 * 60.0
#: How many of the slowest tests are listed.
SLOWEST = 15


def read_cases(junit: Path) -> List[Dict[str, Any]]:
    """Each test case of ``junit``: its folder under ``tests/``, node id and seconds, and
    whether it failed or errored."""
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else "."
        failed = any(child.tag in ("failure", "error") for child in case)
        cases.append({"folder": folder, "test": f"{module}::{case.get('name')}",
                      "seconds": float(case.get("time", 0.0)), "failed": failed})
    return cases


def summarise(cases: Sequence[Dict[str, Any]], target_s: float) -> Dict[str, Any]:
    """Per-folder counts and seconds, the total against ``target_s`` and the slowest tests."""
    folders: Dict[str, Dict[str, float]] = defaultdict(lambda: {"tests": 0, "seconds": 0.0})
    for case in cases:
        folders[case["folder"]]["tests"] += 1
        folders[case["folder"]]["seconds"] += case["seconds"]
    total = sum(case["seconds"] for case in cases)
    return {"tests": len(cases), "failed": sum(case["failed"] for case in cases),
            "total_s": total, "target_s": target_s, "met": total <= target_s,
            "folders": dict(sorted(folders.items(), key=lambda kv: -kv[1]["seconds"])),
            "slowest": sorted(cases, key=lambda c: -c["seconds"])[:SLOWEST]}


def render(summary: Dict[str, Any]) -> str:
    """The summary as markdown tables."""
    lines = ["| folder | tests | seconds | share |", "|---|---:|---:|---:|"]
    total = summary["total_s"] or 1.0
    for folder, row in summary["folders"].items():
        lines.append(f"| tests/{folder} | {row['tests']} | {row['seconds']:.0f} | "
                     f"{100 * row['seconds'] / total:.0f}% |")
    verdict = "met" if summary["met"] else "NOT met"
    lines += [f"| **all** | {summary['tests']} | {summary['total_s']:.0f} | |", "",
              f"target: {summary['target_s']:.0f} s of test time, {verdict}; "
              f"{summary['failed']} failed", "", "| slowest test | seconds |", "|---|---:|"]
    lines += [f"| {c['test']} | {c['seconds']:.0f} |" for c in summary["slowest"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path, help="a JUnit XML file written by pytest")
    parser.add_argument("--target", type=float, default=TARGET_S, help="seconds (default 1500)")
    parser.add_argument("--out", type=Path, help="JSON record (default bench/results/...)")
    args = parser.parse_args(argv)
    summary = summarise(read_cases(args.junit), args.target)
    print(render(summary))
    out = args.out or (REPO / "bench" / "results" /
                       f"suite-{args.junit.stem}-{datetime.now():%Y-%m-%d}.cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"junit": str(args.junit), "cpus": os.cpu_count(), **summary}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
