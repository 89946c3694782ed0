"""Crash-safe file writes: write a temporary sibling, fsync, then rename over the target."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, List, Optional

#: errno values that mean "the file system has no room for this write".
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TEMP_PREFIX = ".tmp-"


class DiskFull(OSError):
    """A write that failed because its file system (or the user's quota there) is full: an
    ``OSError`` with the original errno (ENOSPC or EDQUOT) and ``filename`` set to the file that
    could not be written. Build it with :meth:`while_writing`."""

    @classmethod
    def while_writing(cls, path: Path, cause: OSError) -> "DiskFull":
        """The error for ``cause`` raised while writing ``path``: its message names the path,
        the bytes still free there and the fix."""
        return cls(cause.errno,
                   f"{os.strerror(cause.errno)} (disk full) while writing {path} "
                   f"({_free_bytes(path.parent)} bytes free on its file system); free space "
                   f"there and run again (the file it would have replaced, if any, is intact)",
                   str(path))


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A reader sees either the old file or the complete new one, never a partial write. If the
    write fails the temporary file is removed (a full disk raises :class:`DiskFull`); if the
    process is killed mid-way a ``.tmp-*`` file remains, which readers ignore and
    :func:`remove_partial_writes` deletes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Optional[str] = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
            raise DiskFull.while_writing(path, err) from err
        raise


def remove_partial_writes(folder: Path, target: str = "") -> List[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``
    (only those for the file named ``target``, if given) and return their paths.

    Call it only while no other process can be writing there (e.g. under the job's lock).
    """
    pattern = f"{TEMP_PREFIX}{target}-*" if target else f"{TEMP_PREFIX}*"
    leftovers = sorted(folder.glob(pattern)) if folder.is_dir() else []
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def write_json(path: Path, data: Any) -> None:
    payload = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(payload))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
