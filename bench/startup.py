"""How long ``kdflow --help`` takes: the command line must answer without importing torch.

What is measured, ``--repeat`` times each (the median and the worst are reported):
1. wall: ``kdflow --help`` run as a new process (the console script beside this interpreter,
   else ``python -m kdflow.launch.cli``), output discarded; seconds.
2. import: the ``-X importtime`` total of ``import kdflow.launch.cli`` (the cumulative time of
   the module, which includes every module it imports); seconds.
3. torch: whether that import pulled in ``torch`` (it must not).
The target is :data:`TARGET_S`: an import under 1 s, so ``--help`` and the refusal of a bad
argument answer at once.

A markdown table is printed and a JSON record written (``--out``, default
``bench/results/startup-<date>.cpu.json``, git-ignored).

    python bench/startup.py              # 5 repetitions, a few seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
#: The import time ``kdflow --help`` must stay under; seconds.
TARGET_S = 1.0
#: Prints whether torch was imported, after importing the command line.
PROBE = "import sys, kdflow.launch.cli; print('torch' in sys.modules)"


def help_command() -> List[str]:
    """``kdflow --help`` as an argument list: the console script when installed beside this
    interpreter, else the module run by this interpreter."""
    script = Path(sys.executable).with_name("kdflow")
    if script.is_file():
        return [str(script), "--help"]
    return [sys.executable, "-m", "kdflow.launch.cli", "--help"]


def time_help(command: List[str]) -> float:
    """Wall seconds of one run of ``command``, which must exit 0."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - started


def import_seconds() -> float:
    """The ``-X importtime`` cumulative time of ``kdflow.launch.cli`` in a new interpreter;
    seconds (the report gives microseconds)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import kdflow.launch.cli"],
                          check=True, capture_output=True, text=True, cwd=REPO)
    for line in done.stderr.splitlines():
        fields = [part.strip() for part in line.split("|")]
        if len(fields) == 3 and fields[2] == "kdflow.launch.cli":
            return int(fields[1]) / 1e6
    raise SystemExit("no import time of kdflow.launch.cli in -X importtime's report")


def imports_torch() -> bool:
    """Whether importing the command line imports torch, in a new interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                          text=True, cwd=REPO)
    return done.stdout.strip() == "True"


def summary(times: List[float]) -> Dict[str, float]:
    """Median and worst of ``times``; seconds."""
    return {"median_s": statistics.median(times), "max_s": max(times)}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    command = help_command()
    time_help(command)  # the first run reads the files from disk; not counted
    wall = [time_help(command) for _ in range(args.repeat)]
    imports = [import_seconds() for _ in range(args.repeat)]
    torch_imported = imports_torch()
    met = statistics.median(imports) < TARGET_S and not torch_imported
    record: Dict[str, Any] = {
        "benchmark": "startup", "date": datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg()[0], "command": " ".join(command), "repeat": args.repeat,
        "wall_s": wall, "import_s": imports, "wall": summary(wall), "import": summary(imports),
        "imports_torch": torch_imported, "target_import_s": TARGET_S, "target_met": met,
    }
    print(f"`{record['command']}`, {args.repeat} runs, load average {record['load_avg']:.1f} "
          f"on {os.cpu_count()} cores")
    print("| measure | median s | worst s |\n|---|---:|---:|")
    for name, key in (("wall of `--help`", "wall"), ("import of kdflow.launch.cli", "import")):
        print(f"| {name} | {record[key]['median_s']:.3f} | {record[key]['max_s']:.3f} |")
    print(f"torch imported: {'yes' if torch_imported else 'no'}; target: import under "
          f"{TARGET_S:.0f} s without torch: {'met' if met else 'NOT met'}")
    out = args.out or REPO / "bench" / "results" / f"startup-{datetime.now():%Y-%m-%d}.cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
