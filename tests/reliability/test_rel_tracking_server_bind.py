"""`kdflow server`: the study's MLflow store served on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Set

from kdflow.launch.cli import main
from kdflow.orchestrator.tracking import ensure_experiment
from tests.mlflow_server import stop_group, wait_healthy
from tests.multiprocess import free_port

LISTEN = "0A"  # TCP state in /proc/net/tcp*


def listening_addresses(port: int) -> Set[str]:
    """The local addresses of every socket listening on TCP ``port`` (IPv4 and IPv6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw))
            found.add(socket.inet_ntop(family, words))
    return found


def group_command_lines(group: int) -> List[List[str]]:
    """The argument lists of the processes in process group ``group``."""
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
            if int(fields[2]) == group:
                lines.append((proc / "cmdline").read_bytes().decode().split("\0")[:-1])
        except OSError:
            continue  # a process that ended meanwhile
    return lines


def test_kdflow_server_serves_the_study_store_on_loopback_only(tmp_path):
    ensure_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke")  # the study's store
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdflow.launch.cli", "server", "--port", str(port), "study=smoke",
             f"output_dir={tmp_path}"], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_healthy(uri, proc, log)
        assert listening_addresses(port) == {"127.0.0.1"}
        commands = group_command_lines(proc.pid)
        hosts = [cmd[cmd.index("--host") + 1] for cmd in commands if "--host" in cmd]
        assert hosts and set(hosts) == {"127.0.0.1"}, commands
        assert not any("0.0.0.0" in arg for cmd in commands for arg in cmd)
        from mlflow.tracking import MlflowClient

        assert MlflowClient(uri).get_experiment_by_name("smoke") is not None
        assert f"serving sqlite:///{tmp_path / 'mlflow.db'} at {uri}" in log.read_text()
    finally:
        stop_group(proc, port)


def test_kdflow_server_refuses_a_study_tracked_on_a_server(tmp_path, capsys):
    code = main(["server", "study=smoke", f"output_dir={tmp_path}",
                 "tracking_uri=http://127.0.0.1:1"])
    assert code == 2
    assert "`tracking_uri`" in capsys.readouterr().err
