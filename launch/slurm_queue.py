"""What SLURM says about jobs: ``squeue`` for live ones, ``sacct`` for ended ones; ``scancel``.

Every call is counted (``calls``), so launchers and benchmarks can report how many times they
asked the scheduler. Ids are SLURM's: ``1234`` for a plain job, ``1234_5`` for an array task.
"""
from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from kdflow.methods.errors import ConfigError

# squeue states of a job that will still run (or runs): it must not be submitted again
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
               "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED")
# a pending job whose dependency can never be met: it will never run by itself
STUCK_REASONS = ("DependencyNeverSatisfied",)
ID_BATCH = 200  # ids per sacct / scancel call
#: Seconds ``scontrol ping`` may take: a live controller answers in milliseconds, while SLURM's
#: commands retry a missing slurm.conf for 60 s and an unresolvable controller for about 10 s.
PING_TIMEOUT_S = 8.0
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scancel", "scontrol")


class SlurmUnreachable(RuntimeError):
    """SLURM's commands are installed but its controller does not answer (no slurm.conf, the
    controller down or unknown): a fault of the cluster, not of the study; nothing was done."""


@dataclass(frozen=True)
class QueueEntry:
    """One job as the scheduler sees it. state: SLURM's (``PENDING``, ``COMPLETED``...);
    reason: squeue's reason for a pending job or sacct's exit code for an ended one."""

    scheduler_id: str
    state: str
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES and self.reason not in STUCK_REASONS


def require_slurm() -> None:
    """Before anything is submitted or asked: ConfigError when SLURM's commands are missing,
    :class:`SlurmUnreachable` when its controller does not answer ``scontrol ping`` within
    :data:`PING_TIMEOUT_S` (instead of every later command retrying for a minute)."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise ConfigError("launcher", f"launcher=slurm needs SLURM's commands; not found: "
                          f"{', '.join(missing)}",
                          fix="run kdflow on a SLURM login node, or use launcher=local "
                              "(scripts/slurm-dev-cluster.sh start brings up a one-node test cluster)")
    problem = _ping_problem()
    if problem is not None:
        raise SlurmUnreachable(
            f"the SLURM cluster does not answer ({problem}); nothing was submitted or changed. "
            "Fix: run kdflow where `scontrol ping` says UP (a login node; SLURM_CONF naming the "
            "cluster's slurm.conf), try again once the controller is back, or use launcher=local")


def _ping_problem() -> Optional[str]:
    """Why ``scontrol ping`` says the controller is not up (its first line); None when it is."""
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False,
                              timeout=PING_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:  # its partial output comes back as bytes
        said = expired.stderr or b""
        said = said.decode(errors="replace") if isinstance(said, bytes) else said
        return f"`scontrol ping` gave no answer in {PING_TIMEOUT_S:g} s" + _first_line(": ", said)
    if proc.returncode == 0:
        return None
    said = proc.stdout + proc.stderr
    return f"`scontrol ping` exited {proc.returncode}" + _first_line(": ", said)


def _first_line(prefix: str, text: str) -> str:
    """``prefix`` and the first non-blank line of ``text`` without SLURM's ``scontrol: error:``;
    "" when there is none."""
    lines = [line.replace("scontrol: error: ", "").strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("*")]
    return prefix + lines[0] if lines else ""


class SlurmQueue:
    """Thin, counted wrappers around squeue / sacct / scancel."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def _run(self, args: List[str]) -> str:
        self.calls[args[0]] += 1
        proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])}... failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def live(self) -> Dict[str, QueueEntry]:
        """This user's queued and running jobs, one entry per array task (one squeue call)."""
        out = self._run(["squeue", "--me", "--array", "--noheader", "--format=%i|%T|%r"])
        entries = {}
        for line in out.splitlines():
            job_id, state, reason = (line.split("|") + ["", ""])[:3]
            entries[job_id.strip()] = QueueEntry(job_id.strip(), state.strip(), reason.strip())
        return entries

    def accounting(self, scheduler_ids: Iterable[str]) -> Dict[str, QueueEntry]:
        """Final (or latest) states from accounting, for ids squeue no longer shows."""
        ids = sorted(set(scheduler_ids))
        entries: Dict[str, QueueEntry] = {}
        for start in range(0, len(ids), ID_BATCH):
            out = self._run(["sacct", "--allocations", "--noheader", "--parsable2",
                             "--format=JobID,State,ExitCode", "--jobs", ",".join(ids[start:start + ID_BATCH])])
            for line in out.splitlines():
                job_id, state, code = (line.split("|") + ["", ""])[:3]
                # "CANCELLED by 0" -> CANCELLED; a requeued job's older runs come first, the last wins
                entries[job_id] = QueueEntry(job_id, state.split()[0] if state else "", code)
        return entries

    def test_only(self, flags: List[str]) -> Optional[str]:
        """Ask ``sbatch --test-only`` whether a job with ``flags`` could be queued; None when it
        could, else SLURM's reason (an unknown partition, account or qos, too much memory...)."""
        args = ["sbatch", "--test-only", *flags, "--wrap=true"]
        self.calls["sbatch --test-only"] += 1
        proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode == 0:
            return None
        lines = [line.replace("sbatch: error: ", "").strip() for line in proc.stderr.splitlines()]
        return "; ".join(line for line in lines if line) or f"sbatch exited {proc.returncode}"

    def cancel(self, scheduler_ids: Sequence[str], signal: Optional[str] = None) -> None:
        """``scancel`` the ids (in batches); with ``signal``, send it instead of cancelling."""
        ids = sorted(set(scheduler_ids))
        flags = [f"--signal={signal}"] if signal else []
        for start in range(0, len(ids), ID_BATCH):
            self._run(["scancel", *flags, *ids[start:start + ID_BATCH]])
