"""Real multi-process job runs for tests: ``WORLD`` processes started with torchrun's variables."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

REPO = str(Path(__file__).resolve().parents[1])
WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(script: str, *args: str) -> List[subprocess.Popen]:
    """Start ``WORLD`` processes running ``script`` with torchrun's variables set."""
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable, "-c", script, *args, str(rank)],
        env={**os.environ, "PYTHONPATH": REPO, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)})
        for rank in range(WORLD)]


def wait_ranks(procs: List[subprocess.Popen], timeout: float = 120) -> None:
    """Wait for all of ``procs`` (killing the rest on a timeout) and require success."""
    deadline = time.time() + timeout
    try:
        codes = [proc.wait(timeout=max(deadline - time.time(), 1)) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == [0] * len(procs)


#: ``python -c WORKER root job_id out rank``: runs the job of the store at ``root`` as one rank
#: and writes ``out/rank<rank>.json`` (its result, or the error it raised).
WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from kdflow.orchestrator.distributed import detect_env
    from kdflow.orchestrator.runner import RunOptions, run_job_in_store
    root, job_id, out, rank = sys.argv[1:5]
    try:
        result = run_job_in_store(root, job_id, RunOptions(progress=False,
                                                           distributed=detect_env()))
        outcome = {"result": result}
    except Exception as err:
        outcome = {"error": type(err).__name__, "message": str(err),
                   "signum": getattr(err, "signum", None)}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(outcome, f)
""")
