"""Crash-safe file writes: write a temporary sibling, fsync, then rename over the target."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, List, Optional, Sequence

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


def replace_files(folder: Path, write: Callable[[Path], None], names: Sequence[str]) -> None:
    """Replace the files ``names`` in ``folder`` with those ``write(staging)`` writes into a
    fresh temporary folder inside it, or leave ``folder`` as it was if ``write`` fails.

    Only once ``write`` has returned are its files synced and renamed into ``folder``, in the
    order of ``names`` (put the file readers look for first last); a name it did not write is
    removed from ``folder`` (it belonged to the earlier version). On failure the temporary
    folder is removed and the error raised again (a full disk as :class:`DiskFull` naming
    ``folder``). A process killed while writing leaves the old files and a ``.tmp-*`` folder;
    only one killed during the renames (milliseconds) leaves some files new, the last one old.
    """
    staging: Optional[Path] = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder))
        write(staging)
        for name in names:
            _sync(staging / name)
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
            raise DiskFull.while_writing(folder, err) from err
        raise
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    shutil.rmtree(staging)


def _sync(path: Path) -> None:
    """fsync the file at ``path`` (if there is one) so a rename of it survives a crash."""
    if path.exists():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


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
