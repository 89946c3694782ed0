"""A job's tracking outbox: every MLflow call of the job, written down before it is sent.

``<job_dir>/tracking-outbox.jsonl`` holds one JSON object per line, appended and fsynced:

- a record, ``{"seq": 3, "op": "metrics", ...}``: one call to make (ops and their fields are
  :mod:`orchestrator.tracking`'s business), numbered from 0 in the order it must be sent;
- an acknowledgement, ``{"ack": 3}``: record 3 has reached MLflow. The one of a ``create_run``
  record also names the run it made: ``{"ack": 0, "run_id": "..."}``.

Records without an acknowledgement are pending: a server that was down, or a process killed
between sending and acknowledging. A line torn by a crash mid-append is skipped when reading,
and the next append starts on a fresh line. Readers and writers hold ``tracking-outbox.lock``
(flock), so a job and ``kdflow sync`` never send the same record at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

log = logging.getLogger(__name__)

OUTBOX_FILE = "tracking-outbox.jsonl"
LOCK_FILE = "tracking-outbox.lock"


@dataclass
class OutboxContents:
    """What an outbox file says.

    records:  every record, by ``seq``, in order (dicts with ``seq``, ``op`` and the op's fields);
    acked:    the ``seq`` of every acknowledged record;
    run_id:   the run an acknowledged ``create_run`` made (None: none yet);
    torn:     how many unreadable lines were skipped (a crash mid-append leaves one).
    """

    records: List[Dict[str, Any]] = field(default_factory=list)
    acked: Set[int] = field(default_factory=set)
    run_id: Optional[str] = None
    torn: int = 0

    @property
    def pending(self) -> List[Dict[str, Any]]:
        return [r for r in self.records if r["seq"] not in self.acked]

    def acked_metric_steps(self) -> Set[Tuple[str, int]]:
        """``{(metric name, step)}`` of every acknowledged metrics record."""
        return {(name, r["step"]) for r in self.records
                if r["op"] == "metrics" and r["seq"] in self.acked for name in r["metrics"]}


class Outbox:
    """The outbox of the job folder ``job_dir`` (the file is created on the first append)."""

    def __init__(self, job_dir: Path | str) -> None:
        self.job_dir = Path(job_dir)
        self.path = self.job_dir / OUTBOX_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the outbox's exclusive lock (released if the process dies)."""
        self.job_dir.mkdir(parents=True, exist_ok=True)
        with open(self.job_dir / LOCK_FILE, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> OutboxContents:
        contents = OutboxContents()
        if not self.path.exists():
            return contents
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                contents.torn += 1
                continue
            if "ack" in entry:
                contents.acked.add(entry["ack"])
                contents.run_id = entry.get("run_id", contents.run_id)
            else:
                contents.records.append(entry)
        if contents.torn:
            log.debug("%s: skipped %d torn line(s) (a crash while appending)",
                        self.path, contents.torn)
        return contents

    def append(self, contents: OutboxContents, op: str, **fields: Any) -> Dict[str, Any]:
        """Write a new ``op`` record after those of ``contents`` (updated too); the record."""
        seq = contents.records[-1]["seq"] + 1 if contents.records else 0
        record = {"seq": seq, "op": op, **fields}
        self._write(record)
        contents.records.append(record)
        return record

    def ack(self, contents: OutboxContents, seq: int, run_id: Optional[str] = None) -> None:
        """Mark record ``seq`` as sent (in the file and in ``contents``)."""
        self._write({"ack": seq, **({"run_id": run_id} if run_id else {})})
        contents.acked.add(seq)
        if run_id:
            contents.run_id = run_id

    def _write(self, entry: Dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        self.job_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: keep it apart from ours
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
