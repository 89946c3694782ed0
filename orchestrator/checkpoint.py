"""Training checkpoints: sealed with a checksum, written atomically, loaded without pickle code.

A checkpoint file is an ordinary ``torch.save`` zip archive whose zip comment (the last bytes
of the file, which every zip reader, ``torch.load`` included, accepts) is
``kdflow-sha256:<hex>``: the sha256 of every byte before the comment. A truncated or damaged
file is detected from that before it is unpickled, and it is unpickled by
``torch.load(weights_only=True)``, which builds only tensors and plain containers, so a file
that smuggles code in its pickle is refused rather than run.

A job's final ``model.pt`` is sealed the same way (:func:`write_sealed`, :func:`read_sealed`).
Checkpoint files are numbered by global step; the newest two are kept. When the newest cannot be used it
is reported, set aside as ``<name>.rejected`` and the one before it is used.
Files written before checksums existed (a zip without a comment) still load, with a warning.
"""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from kdflow.orchestrator.atomic import atomic_write

log = logging.getLogger(__name__)
KEEP = 2
REJECTED_SUFFIX = ".rejected"
SEAL_MAGIC = b"kdflow-sha256:"
DIGEST_LENGTH = 64  # a sha256 in hex
SEAL_LENGTH = len(SEAL_MAGIC) + DIGEST_LENGTH
ZIP_END = b"PK\x05\x06"  # the signature of a zip's end-of-central-directory record
ZIP_END_LENGTH = 22  # that record without a comment; its last two bytes are the comment length


class CheckpointRejected(Exception):
    """A checkpoint file that must not be used: ``path`` and ``reason`` (why, in words)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} cannot be used: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> Any:
        return type(self), (self.path, self.reason)


@dataclass
class LatestCheckpoint:
    """What :func:`load_latest_checkpoint` found.

    state:    the newest usable checkpoint's contents (None: there is none, start from scratch);
    path:     its file;
    rejected: the newer files that could not be used, newest first (each now ``*.rejected``).
    """

    state: Optional[Dict[str, Any]] = None
    path: Optional[Path] = None
    rejected: List[CheckpointRejected] = field(default_factory=list)


def checkpoint_path(folder: Path, global_step: int) -> Path:
    """Where the checkpoint at ``global_step`` of the job whose checkpoints are in ``folder`` is."""
    return folder / f"step-{global_step:09d}.pt"


def init_checkpoint_path(folder: Path, global_step: int) -> Path:
    """Where a job whose checkpoints are in ``folder`` keeps its own copy of the donor checkpoint
    (at ``global_step``) it starts from (``JobSpec.init_from``); never pruned."""
    return checkpoint_path(folder / "init", global_step)


def latest_checkpoint_path(folder: Path) -> Optional[Path]:
    """The newest checkpoint file in ``folder`` (None when there is none)."""
    paths = sorted(folder.glob("step-*.pt"))
    return paths[-1] if paths else None


def seal_digests(archive: bytes) -> Optional[Tuple[str, str]]:
    """(recorded, actual) sha256 hex digests of a sealed archive (:func:`seal`): the one in its
    zip comment and the one of its bytes before it; None when ``archive`` carries no seal."""
    if archive[-SEAL_LENGTH:-DIGEST_LENGTH] != SEAL_MAGIC:
        return None
    recorded = bytes(archive[-DIGEST_LENGTH:]).decode("ascii", errors="replace")
    return recorded, hashlib.sha256(memoryview(archive)[:-SEAL_LENGTH]).hexdigest()


def ends_without_comment(archive: bytes) -> bool:
    """Whether ``archive`` ends in a zip end record with an empty comment (as ``torch.save``
    writes it, and as kdflow's files were before they were sealed)."""
    return archive[-ZIP_END_LENGTH:-ZIP_END_LENGTH + 4] == ZIP_END and archive[-2:] == b"\0\0"


def seal(archive: bytes) -> bytes:
    """``archive`` (the bytes of a ``torch.save`` zip, which end in a comment-less zip end
    record) with a comment holding the sha256 of every byte before that comment."""
    if not ends_without_comment(archive):
        raise ValueError("not a torch.save archive without a zip comment")
    body = archive[:-2] + SEAL_LENGTH.to_bytes(2, "little")
    return body + SEAL_MAGIC + hashlib.sha256(body).hexdigest().encode()


def encode(obj: Any) -> bytes:
    """``obj`` as a sealed ``torch.save`` archive (:func:`seal`), built in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return seal(buffer.getvalue())


def write_sealed(path: Path, obj: Any) -> None:
    """Write ``obj`` (tensors, numbers, strings and containers of them) to ``path`` as a sealed
    ``torch.save`` archive, atomically; plain ``torch.load`` still reads it."""
    payload = encode(obj)
    atomic_write(path, lambda f: f.write(payload))


def read_sealed(path: Path) -> Any:
    """The contents of the sealed archive at ``path``, on the CPU.

    The whole file is read into memory; its checksum is checked before anything is unpickled,
    and the unpickling allows only weights (``torch.load(weights_only=True)``). Raises
    :class:`CheckpointRejected` naming the file and why: unreadable, empty, truncated or not a
    kdflow file, checksum mismatch, or refused by the weights-only loader.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointRejected(path, f"unreadable ({err})") from err
    if not data:
        raise CheckpointRejected(path, "empty file")
    digests = seal_digests(data)
    if digests is not None:
        expected, actual = digests
        if actual != expected:
            raise CheckpointRejected(
                path, f"checksum mismatch (sha256 {actual[:12]}..., recorded {expected[:12]}...): "
                      f"the file was damaged after it was written")
    elif ends_without_comment(data):
        log.warning("%s has no checksum (written before kdflow sealed its files); loading it "
                    "weights-only", path)
    else:
        raise CheckpointRejected(
            path, f"truncated or not a kdflow checkpoint: no checksum at its end ({len(data)} bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointRejected(path, f"unsafe: refused by torch.load(weights_only=True): "
                                       f"{_what_was_refused(err)}") from err
    except Exception as err:
        raise CheckpointRejected(path, f"unreadable archive ({type(err).__name__}: {err})") from err


def _what_was_refused(err: pickle.UnpicklingError) -> str:
    """The line of the weights-only loader's message that names what it refused (the object
    the pickle asked for), rather than its advice to load the file unsafely."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "global" in line.lower()]
    return (named or lines or [type(err).__name__])[0]


def save_checkpoint(folder: Path, global_step: int, state: Dict[str, Any]) -> Path:
    """Write ``state`` as ``folder/step-<global_step>.pt`` (sealed, atomically); prune older ones.

    On a full disk this raises :class:`orchestrator.atomic.DiskFull` and leaves the older
    checkpoints as they were.
    """
    path = checkpoint_path(folder, global_step)
    write_sealed(path, state)
    for old in sorted(folder.glob("step-*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path) -> LatestCheckpoint:
    """The newest usable checkpoint in ``folder``.

    Every newer file that cannot be used (:func:`read_sealed`) is logged as a warning naming it
    and why, renamed to ``<name>.rejected`` (kept for inspection, never read again) and listed
    in the answer's ``rejected``.
    """
    found = LatestCheckpoint()
    for path in sorted(folder.glob("step-*.pt"), reverse=True):
        try:
            found.state, found.path = read_sealed(path), path
            return found
        except CheckpointRejected as rejected:
            log.warning("%s; using the previous checkpoint", rejected)
            path.replace(path.with_name(path.name + REJECTED_SUFFIX))
            found.rejected.append(rejected)
    return found
