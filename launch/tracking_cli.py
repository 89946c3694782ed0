"""``kdflow sync`` and ``kdflow server``: the study's MLflow tracking from the command line.

``sync`` sends what the study's jobs kept in their outboxes while the tracking server was down
(:mod:`orchestrator.tracking_outbox`); ``server`` serves the study's embedded SQLite store with
``mlflow server``, bound to 127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, NoReturn

from kdflow.methods.errors import ConfigError

if TYPE_CHECKING:
    from kdflow.launch.cli import Session

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _job_is_running(job_dir: Path) -> bool:
    """Whether a process holds the job's store lock (``<job>/.lock``, see ``JobStore.lock``)."""
    lock = job_dir / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def describe_sent(records: List[Dict[str, Any]]) -> str:
    """``3 metrics (steps 1-3), 1 artifact, 1 status`` for a list of outbox records."""
    counts = Counter(record["op"] for record in records)
    parts = []
    for op, count in counts.items():
        text = f"{count} {op}"
        if op == "metrics":
            steps = sorted(r["step"] for r in records if r["op"] == "metrics")
            text += f" (steps {steps[0]}-{steps[-1]})" if len(steps) > 1 else f" (step {steps[0]})"
        parts.append(text)
    return ", ".join(parts)


def sync_command(session: "Session") -> int:
    """Send every job's kept tracking calls; 0 when all went out, 1 when the server is down."""
    from kdflow.orchestrator.tracking import reachability_problem, redact, sync_job
    from kdflow.orchestrator.tracking_outbox import OUTBOX_FILE

    uri = redact(session.tracking_uri)  # shown; the session's URI is the one used
    problem = reachability_problem(session.tracking_uri)
    if problem is not None:
        print(f"kdflow: error: the tracking server {uri} is unreachable ({problem}). Nothing "
              "was sent; the jobs keep their tracking. Start the server (or point tracking_uri "
              "at it) and run `kdflow sync` again.", file=sys.stderr)
        return 1
    sent = 0
    for job in session.graph.jobs:
        job_dir = session.store.job_dir(job.job_id)
        if not (job_dir / OUTBOX_FILE).exists():
            continue
        if _job_is_running(job_dir):
            print(f"{job.title}: running; it sends what it keeps itself at its next epoch")
            continue

        def record_run(run_id: str, job_id: str = job.job_id) -> None:
            session.store.update_state(job_id, mlflow_run_id=run_id)

        report = sync_job(session.tracking_uri, job_dir,
                          session.store.state(job.job_id).mlflow_run_id, record_run)
        if report.sent:
            print(f"{job.title} [{job.job_id[:12]}]: sent {describe_sent(report.sent)}")
            sent += len(report.sent)
        if report.error is not None:
            print(f"kdflow: error: sending the tracking of {job.title} to {uri} failed "
                  f"({redact(str(report.error))}); {report.pending} call(s) are still kept in "
                  f"{job_dir}. Run `kdflow sync` again once the server answers.", file=sys.stderr)
            return 1
    print(f"sent {sent} kept tracking call(s) to {uri}" if sent
          else f"nothing to send: {uri} has every job's tracking")
    return 0


def server_command(session: "Session", host: str, port: int, workers: int) -> NoReturn:
    """Replace this process with ``mlflow server`` on ``host:port`` over the study's store,
    first marking its experiments that have no kind as model training
    (:func:`~orchestrator.tracking.mark_experiments`)."""
    from kdflow.orchestrator.tracking import SQLITE_PREFIX, mark_experiments, redact

    uri = session.tracking_uri
    if not uri.startswith("sqlite:///"):
        raise ConfigError("tracking_uri", f"it points at a tracking server already "
                          f"({redact(uri)}); `kdflow server` serves the study's embedded "
                          "SQLite store",
                          fix=f"open {redact(uri)} in a browser, or drop tracking_uri")
    if not 0 < port < 65536:
        raise ConfigError("--port", f"{port} is not a TCP port", fix="give a port in 1-65535")
    if workers < 1:
        raise ConfigError("--workers", f"{workers} server processes", fix="give 1 or more")
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow, "server", "--host", host, "--port", str(port), "--workers", str(workers),
               "--backend-store-uri", uri,
               "--artifacts-destination", str(Path(session.output_dir) / "mlartifacts")]
    if host not in LOOPBACK_HOSTS:
        print(f"kdflow: warning: --host {host} makes the server reachable from other machines; "
              "MLflow asks no password by default", file=sys.stderr)
    if Path(uri[len(SQLITE_PREFIX):]).exists():
        marked = mark_experiments(uri)
        if marked:
            print(f"marked {len(marked)} experiment(s) as model training, so that the UI "
                  f"opens on their runs: {', '.join(marked)}", flush=True)
    print(f"serving {uri} at http://{host}:{port} (Ctrl-C stops it)", flush=True)
    os.execvp(mlflow, command)
