"""`kdflow run` killed with SIGKILL leaves no job training on without it: its worker processes
get SIGTERM from the kernel (PR_SET_PDEATHSIG), checkpoint and stop as on a preemption, and the
next `kdflow run` resumes the job from that checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

RUN = ["study=smoke", "progress=false", "launcher.workers=2", "~study.methods.fitnet",
       "~study.methods.crd", "study.teacher_recipe.epochs=40", "study.teacher_recipe.lr_milestones=[30]",
       "study.teacher_recipe.checkpoint_every_steps=2"]


def _children(pid: int) -> List[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _teacher_checkpointed(jobs: Path) -> bool:
    return any(json.loads((ckpts.parent / "spec.json").read_text())["stage"] == "teacher"
               and any(ckpts.glob("step-*.pt")) for ckpts in jobs.glob("*/checkpoints"))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_kdflow_run_stops_its_workers_and_the_next_run_resumes(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kdflow.launch.cli", "run", *RUN, f"output_dir={tmp_path}"]
    main = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: _teacher_checkpointed(tmp_path / "jobs"), 240,
                  "the teacher's first checkpoint")
        workers = _children(main.pid)
        assert workers
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), 60,
                  f"workers {workers} to stop after their parent was killed")
    finally:
        if main.poll() is None:
            os.killpg(main.pid, signal.SIGKILL)
    (teacher,) = [d for d in (tmp_path / "jobs").iterdir()
                  if json.loads((d / "spec.json").read_text())["stage"] == "teacher"]
    state = json.loads((teacher / "state.json").read_text())
    assert state["status"] == "interrupted", state  # it checkpointed on SIGTERM and said so
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    state = json.loads((teacher / "state.json").read_text())
    assert state["status"] == "done" and state["attempts"] == 2 and state["resumed_step"] > 0
