"""A real ``mlflow server`` for tests: on 127.0.0.1, SQLite store, proxied artifacts; it can be
stopped and started again on the same port and store (a tracking outage)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

from tests.multiprocess import free_port

MLFLOW = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


def wait_healthy(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until ``uri/health`` answers 200; raise with the server's log if ``proc`` ends first."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: {log.read_text()}")
        time.sleep(0.3)


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` any more (a new server could bind it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_group(proc: subprocess.Popen, port: int, timeout: float = 60) -> None:
    """SIGTERM the process group ``proc`` leads (the server and its workers) and wait until
    ``port`` is free; SIGKILL the group if that takes over ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline, killed = time.time() + timeout, False
    while proc.poll() is None or not port_is_free(port):
        if time.time() > deadline:
            if killed:
                raise RuntimeError(f"port {port} still taken after SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            deadline, killed = time.time() + 30, True
        time.sleep(0.2)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over ``folder/server.db``, artifacts in ``folder/artifacts``.

    The port is chosen once, so :meth:`start` after :meth:`stop` brings the same server back.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        return [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination", str(self.folder / "artifacts")]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_healthy(self.uri, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, self.port)
            self.proc = None
