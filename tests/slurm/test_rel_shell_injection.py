"""No config value reaches a shell unquoted: a study whose name, SLURM job name, output folder
and a free-text sbatch flag hold shell commands (``;``, ``$(...)``, backquotes, a stray quote)
is submitted to the real dev cluster and finishes; none of the commands ran, and SLURM holds
the job name as written (so it was quoted, not cut at a space or interpreted).

``launcher.python`` and ``launcher.setup`` are left out: they are shell code by design (the
interpreter command and the lines run before it); line breaks in every other value are refused
(``test_rel_bad_slurm_input.py``)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import List

import pytest
from test_launcher import DEV, jobs_by_title

from kdflow.orchestrator.store import JobStore

pytestmark = [pytest.mark.slurm, pytest.mark.reliability, pytest.mark.usefixtures("slurm_cluster")]

# the teacher and one KD student, one epoch each on generated data: two sbatch calls
STUDY = ["study=smoke", "~study.methods.vanilla", "~study.methods.fitnet", "~study.methods.crd",
         "study.teacher_recipe.epochs=1", "study.student_recipe.epochs=1"]


def commands(marker: str) -> str:
    """Text that runs ``touch`` three ways if a shell ever reads it unquoted."""
    return f"; touch {marker}-a $(touch {marker}-b) `touch {marker}-c` ;'\"; touch {marker}-d #"


def kdflow_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``kdflow ARGS`` run from ``cwd`` (SLURM runs the jobs in the folder they were submitted from)."""
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def touched_markers(token: str, folders: List[Path]) -> List[Path]:
    """Files ``pwned-<token>-<who>-<a..d>`` (what the injected commands create) in ``folders``
    (searched recursively) and in /tmp and the home folder."""
    name = re.compile(rf"pwned-{token}-(study|job|comment|out)-[abcd]$")
    found = [p for folder in folders for p in folder.rglob("*") if name.match(p.name)]
    found += [p for folder in (Path("/tmp"), Path.home()) for p in folder.glob(f"pwned-{token}-*")]
    return sorted(set(found))


def sbatch_value(script: Path, flag: str) -> str:
    """The value of ``#SBATCH --<flag>=...`` in ``script``, unquoted as sbatch reads it."""
    for line in script.read_text().splitlines():
        if line.startswith(f"#SBATCH --{flag}="):
            (word,) = shlex.split(line[len(f"#SBATCH --{flag}="):])
            return word
    raise AssertionError(f"no --{flag} line in {script}")


def slurm_job_names(scheduler_ids: List[str]) -> List[str]:
    """The job names SLURM's accounting holds for the arrays of ``scheduler_ids``."""
    arrays = sorted({sid.split("_")[0] for sid in scheduler_ids})
    out = subprocess.run(["sacct", "-X", "--noheader", "--parsable2", "--format=JobName%300",
                          "--jobs", ",".join(arrays)], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return sorted(set(out.splitlines()))


def test_shell_commands_in_names_paths_and_flags_are_never_run(tmp_path):
    token = uuid.uuid4().hex[:12]
    cwd = tmp_path / "cwd"  # the jobs' working folder: relative touches would land here
    cwd.mkdir()
    study = f"x{commands(f'pwned-{token}-study')}"  # a study name is a folder name: no '/'
    job_name = f"j{commands(f'/tmp/pwned-{token}-job')}"
    comment = f"c{commands(f'/tmp/pwned-{token}-comment')}"
    output_dir = tmp_path / f"out{commands(f'pwned-{token}-out')}"
    overrides = [*STUDY, *DEV, f"study.name={study!r}", f"launcher.job_name={job_name!r}",
                 f"+launcher.resources.additional.comment={comment!r}",
                 f"output_dir={str(output_dir)!r}"]

    run = kdflow_in(cwd, "run", *overrides, "launcher.wait=true")
    assert run.returncode == 0, run.stdout + run.stderr
    store = JobStore(output_dir / "jobs")
    titles = jobs_by_title(output_dir)
    assert len(titles) == 2 and all(store.is_done(job_id) for job_id in titles.values())
    status = kdflow_in(cwd, "status", *overrides)
    assert status.returncode == 0 and "\n2 done\n" in status.stdout, status.stdout + status.stderr

    touched = touched_markers(token, [tmp_path])
    assert touched == [], f"a shell ran a command from the config: {touched}"

    scripts = sorted(output_dir.rglob("*_submission.sh"))
    assert scripts, "no sbatch script was written"
    names = {f"{job_name}-{study}-{stage}" for stage in ("teacher", "distill")}
    assert {sbatch_value(s, "job-name") for s in scripts} == names
    assert {sbatch_value(s, "comment") for s in scripts} == {comment}
    # accounting stores " as ` and cuts long names: each name is a prefix of one we sent,
    # well past the first ';' and space, so sbatch read the quoted value as one word
    submitted = [store.submissions(job_id)[-1] for job_id in titles.values()]
    sent = {name.replace('"', "`") for name in names}
    recorded = slurm_job_names(submitted)
    assert recorded and all(len(got) > len(job_name) for got in recorded), recorded
    assert all(any(name.startswith(got) for name in sent) for got in recorded), recorded
