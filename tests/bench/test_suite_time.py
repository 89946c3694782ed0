"""bench/suite_time.py reads pytest's own JUnit XML: per-folder counts and seconds, failures,
the target verdict and the slowest tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SUITE_TIME = Path(__file__).resolve().parents[2] / "bench" / "suite_time.py"


def test_a_real_junit_file_is_summed_per_folder(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    for folder, body in {"fast": "def test_a():\n    pass\n\n\ndef test_b():\n    assert False\n",
                         "slow": "import time\n\n\ndef test_c():\n    time.sleep(0.3)\n"}.items():
        (tests / folder).mkdir(parents=True)
        (tests / folder / "__init__.py").write_text("")
        (tests / folder / f"test_{folder}.py").write_text(body)
    (tests / "__init__.py").write_text("")
    junit = tmp_path / "check.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", "tests"], cwd=tmp_path, capture_output=True)
    out = tmp_path / "suite.json"
    done = subprocess.run([sys.executable, str(SUITE_TIME), str(junit), "--target", "0.2",
                           "--out", str(out)], capture_output=True, text=True, check=True)
    record = json.loads(out.read_text())
    assert (record["tests"], record["failed"]) == (3, 1)
    assert {f: row["tests"] for f, row in record["folders"].items()} == {"fast": 2, "slow": 1}
    assert list(record["folders"]) == ["slow", "fast"]  # by seconds, the slowest first
    assert record["folders"]["slow"]["seconds"] >= 0.3 and not record["met"]
    assert record["slowest"][0]["test"] == "tests.slow.test_slow::test_c"
    assert "| tests/slow | 1 |" in done.stdout and "NOT met; 1 failed" in done.stdout
