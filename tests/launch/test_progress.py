"""Issue 20, progress and output: bars on a terminal; off one, a line per job start and end and
a study summary line whose counts add up; job names shortened in the middle, never losing
pair and seed."""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from typing import Dict, List

import pytest

from kdflow.launch.local import run_local
from kdflow.orchestrator.progress import (BARS, LINES, OFF, StudyProgress, duration, eta_s,
                                          progress_style, short_name)
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

SUMMARY = re.compile(r"^\[(\w+)\] (\d+) jobs: (\d+) done, (\d+) failed, (\d+) blocked, "
                     r"(\d+) interrupted, (\d+) running, (\d+) pending, (\d+) skipped; "
                     r".+ elapsed, ETA (.+)$")
BAR_TEXT = re.compile(r"\d+%\||step/s|it/s|\d+/\d+ \[")


class _Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def _summaries(lines: List[str]) -> List[tuple]:
    return [tuple(int(n) for n in m.groups()[1:9]) for m in map(SUMMARY.match, lines) if m]


def test_bars_on_a_terminal_lines_elsewhere_nothing_when_off():
    tty, pipe = _Stream(True), _Stream(False)
    assert progress_style(True, [tty, tty]) == BARS
    assert progress_style(True, [tty, pipe]) == LINES
    assert progress_style(True, [pipe, tty]) == LINES
    assert progress_style(False, [tty, tty]) == OFF
    assert progress_style(True, [object()]) == LINES  # no isatty: not a terminal


def test_short_name_keeps_method_pair_and_seed_and_cuts_the_middle():
    title = "inverted_projection [direction=inverted] resnet32x4->resnet8x4 cifar100 s2"
    assert short_name(title, 100) == title
    assert short_name(title, 64) == "inverted_projection [inverted] resnet32x4->resnet8x4 cifar100 s2"
    for width in (40, 48, 60):
        name = short_name(title, width)
        assert len(name) == width and "…" in name
        assert name.startswith("invert") and name.endswith("resnet32x4->resnet8x4 cifar100 s2")
    assert short_name("kd resnet20->resnet8 digits s0", 20) == "kd…resnet8 digits s0"
    assert len(short_name(title, 10)) == 10


def test_duration_and_eta():
    assert [duration(s) for s in (0, 42.4, 240, 3 * 3600 + 5 * 60)] == ["0 s", "42 s", "4 min",
                                                                         "3 h 05 min"]
    assert eta_s(100.0, 0, 3) is None  # nothing ended yet: no rate
    assert eta_s(100.0, 4, 0) == 0.0
    assert eta_s(120.0, 4, 6) == 180.0  # 30 s a job, side by side as they ran


def test_study_progress_lines_count_every_job_and_say_a_periodic_summary():
    now = [0.0]
    out = _Stream(False)
    titles = {f"j{i}": f"kd resnet14->resnet8 synthetic s{i}" for i in range(4)}
    progress = StudyProgress("unit", titles, LINES, skipped=1, out=out, every_s=0.05,
                             clock=lambda: now[0])
    progress.started("j1")
    progress.started("j2")
    now[0] = 60.0
    progress.ended("j1", "done", "top1 50.0%, 1.0 s")
    time.sleep(0.3)  # the ticker says the summary a few times meanwhile
    assert SUMMARY.match(progress.summary()).group(10) == "2 min"  # 60 s a job, 2 left
    progress.ended("j2", "failed", "RuntimeError: boom")
    progress.ended("j3", "blocked", "needs job j2")
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["[unit] start  job 2 of 4: kd resnet14->resnet8 synthetic s1",
                         "[unit] start  job 3 of 4: kd resnet14->resnet8 synthetic s2",
                         "[unit] done   kd resnet14->resnet8 synthetic s1: top1 50.0%, 1.0 s"]
    assert "[unit] failed kd resnet14->resnet8 synthetic s2: RuntimeError: boom" in lines
    assert "[unit] blocked kd resnet14->resnet8 synthetic s3: needs job j2" in lines
    periodic = _summaries(lines[3:-3])
    assert len(periodic) >= 2 and all(s == (4, 1, 0, 0, 0, 1, 1, 1) for s in periodic)
    assert _summaries(lines[-1:]) == [(4, 1, 1, 1, 0, 0, 0, 1)]


def test_study_progress_on_a_terminal_draws_a_bar_and_says_no_lines(capsys):
    out = _Stream(True)
    progress = StudyProgress("unit", {"j0": "teacher resnet14 synthetic s0"}, BARS, out=out)
    progress.started("j0")
    progress.ended("j0", "done", "top1 90.0%, 1.0 s")
    progress.close()
    assert out.getvalue() == ""
    assert "unit jobs: 100%" in capsys.readouterr().err  # tqdm's study bar


def test_a_failed_teacher_prints_failed_and_blocked_lines_that_add_up(study, tmp_path, capsys):
    study["teacher_recipe"]["lr"] = 1e30  # diverges: non-finite loss
    graph = expand_study(study)
    summary = run_local(graph, str(tmp_path), RunOptions(progress=True), workers=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(summary.failed) == 1 and len(summary.blocked) == 1 and len(summary.done) == 1
    titles = {job.job_id: job.title for job in graph.jobs}
    teacher = next(t for t in titles.values() if t.startswith("teacher"))
    assert any(line.startswith(f"[unit] failed {teacher}: ") for line in lines), lines
    assert any(line.startswith("[unit] blocked kd ") for line in lines), lines
    assert not any(line.startswith("[unit] start  job") and " kd " in line for line in lines)
    assert _summaries(lines)[-1] == (3, 1, 1, 1, 0, 0, 0, 0)


def _kdflow_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", "run", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kdflow_run_off_a_terminal_says_one_line_per_job_start_and_end(tmp_path):
    run = _kdflow_run("study=smoke", "launcher.workers=2", "~study.methods.fitnet",
                      "~study.methods.crd", f"output_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    for text in (run.stdout, run.stderr):
        assert "\r" not in text and not BAR_TEXT.search(text), text
    lines = run.stdout.splitlines()
    store = JobStore(tmp_path / "jobs")
    titles = [store.spec(d.name).title for d in (tmp_path / "jobs").iterdir()]
    assert len(titles) == 3  # teacher, vanilla, kd
    numbers = []
    for title in titles:
        starts = [line for line in lines if line.startswith("[smoke] start  job ")
                  and line.endswith(f": {title}")]
        ends = [line for line in lines if line.startswith(f"[smoke] done   {title}: ")]
        assert len(starts) == 1 and len(ends) == 1, (title, lines)
        numbers.append(int(starts[0].split()[3]))
        assert re.fullmatch(r".*: top1 \d+\.\d%, \d+\.\d s", ends[0]), ends[0]
    assert sorted(numbers) == [1, 2, 3]
    assert _summaries(lines)[-1] == (3, 3, 0, 0, 0, 0, 0, 0)
    assert all(sum(s[1:]) == s[0] for s in _summaries(lines))


def _read_pty(command: List[str], env: Dict[str, str]) -> str:
    """Everything ``command`` writes to a pseudo-terminal that is its stdout and stderr."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns
    proc = subprocess.Popen(command, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    try:
        while True:
            if select.select([master], [], [], 300)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            else:
                break
    finally:
        proc.wait(timeout=60)
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_on_a_terminal_the_local_launcher_draws_bars_not_lines(study, tmp_path):
    study["methods"] = {"vanilla": {}}
    script = ("import json, sys; from kdflow.launch.local import run_local; "
              "from kdflow.orchestrator.runner import RunOptions; "
              "from kdflow.orchestrator.study import expand_study; "
              "graph = expand_study(json.loads(sys.argv[1])); "
              "sys.exit(0 if run_local(graph, sys.argv[2], RunOptions(), workers=1).ok else 1)")
    text = _read_pty([sys.executable, "-c", script, json.dumps(study), str(tmp_path)],
                     {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    assert "\r" in text and "unit jobs:" in text and "step/s" in text, text
    assert "vanilla resnet8 synthetic s0:  50%|" in text  # the job bar, by its name
    assert "[unit] start" not in text and "[unit] done" not in text
    assert len(list((tmp_path / "jobs").glob("*/result.json"))) == 1
