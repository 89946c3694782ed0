"""Fetch a dataset archive, verify its digests and unpack it into place atomically.

:func:`fetch_archive` streams the archive (``http://``, ``https://`` or ``file://``) into a
hidden work folder under the destination (``<root>/.kdflow-download-XXXX/``), hashing it as
it arrives, then checks the byte count against the server's Content-Length and the digests
against the expected ones, unpacks it there (refusing members with absolute paths, ``..``,
links or devices) and only then renames the wanted folder into ``<root>``. Whatever fails,
the work folder is removed: nothing under ``root`` looks complete unless it is. Progress goes
to stderr: a bar on a terminal, else a line at each quarter of the transfer.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TextIO

from kdflow.orchestrator.data.errors import reason_of

#: The URL schemes an archive can be fetched from.
URL_SCHEMES = ("http://", "https://", "file://")
#: Bytes read from the connection per call.
CHUNK_BYTES = 1 << 20
#: Seconds a connection may stay silent (connecting or between reads) before it fails.
TIMEOUT_S = 60.0
#: Work folders are named with this prefix (hidden, never mistaken for a dataset).
WORK_PREFIX = ".kdflow-download-"


class DownloadError(RuntimeError):
    """An archive could not be fetched or unpacked; ``str()`` is one line, and nothing of
    it was kept."""


class ChecksumMismatch(DownloadError):
    """The archive fetched from ``url`` has ``algorithm`` digest ``got``, not ``expected``."""

    def __init__(self, url: str, algorithm: str, expected: str, got: str) -> None:
        super().__init__(f"the {algorithm} of {url} is {got}, expected {expected}; "
                         "the file was not kept")
        self.url = url
        self.algorithm = algorithm
        self.expected = expected
        self.got = got


@dataclass(frozen=True)
class Archive:
    """A .tar(.gz) archive to fetch.

    url:     where it is (a scheme of :data:`URL_SCHEMES`).
    digests: hashlib algorithm name (``md5``, ``sha256``) -> expected hex digest; at least one.
    folder:  the top-level folder it holds; it lands at ``<root>/<folder>``.
    """

    url: str
    digests: Mapping[str, str]
    folder: str

    def __post_init__(self) -> None:
        if not self.digests:
            raise ValueError(f"archive {self.url} needs at least one expected digest")


def fetch_archive(archive: Archive, root: str, stream: Optional[TextIO] = None) -> str:
    """Download, verify and unpack ``archive`` into ``root`` (created if missing); returns
    the path of ``<root>/<archive.folder>``.

    Progress goes to ``stream`` (default: stderr). Raises :class:`ChecksumMismatch` when a
    digest differs and :class:`DownloadError` for any other failure (HTTP error, no
    connection, a transfer shorter than its Content-Length, a broken or unsafe archive);
    either way the partial files are removed first.
    """
    stream = stream if stream is not None else sys.stderr
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=root)
    try:
        part = os.path.join(work, "archive.part")
        _download(archive, part, stream)
        unpacked = os.path.join(work, "unpacked")
        _unpack(archive, part, unpacked, stream)
        return _install(archive, os.path.join(unpacked, archive.folder), root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download(archive: Archive, path: str, stream: TextIO) -> None:
    """Stream ``archive.url`` into file ``path``, checking its length and digests."""
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in archive.digests}
    received, total = 0, None
    try:
        with urllib.request.urlopen(archive.url, timeout=TIMEOUT_S) as response, \
                open(path, "wb") as out:
            total = _content_length(response)
            progress = _progress(total, f"downloading {archive.url}", stream)
            try:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    for digest in hashes.values():
                        digest.update(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
            finally:
                progress.close()
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{archive.url} answered HTTP {err.code} {err.reason}; "
                            "nothing was kept") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot open {archive.url} ({err.reason}); nothing was kept") from None
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"the transfer of {archive.url} failed after {received:,} bytes "
                            f"({reason_of(err)}); nothing was kept") from None
    if total is not None and received != total:
        raise DownloadError(f"the transfer of {archive.url} stopped after {received:,} of "
                            f"{total:,} bytes (the connection was closed); nothing was kept")
    for name, expected in archive.digests.items():
        got = hashes[name].hexdigest()
        if got != expected.lower():
            raise ChecksumMismatch(archive.url, name, expected.lower(), got)


def _content_length(response: Any) -> Optional[int]:
    """The byte count the server announced, or None when it did not."""
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _unpack(archive: Archive, path: str, into: str, stream: TextIO) -> None:
    """Extract tar file ``path`` into folder ``into``; unsafe members raise DownloadError."""
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            print(f"unpacking {len(members)} files of {archive.folder}/", file=stream, flush=True)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(into, members=members, **safe)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DownloadError(f"cannot unpack the archive of {archive.url} ({reason_of(err)}); "
                            "nothing was kept") from None


def _check_member(archive: Archive, member: tarfile.TarInfo) -> None:
    """DownloadError unless ``member`` is a file or folder with a relative path inside."""
    name = member.name
    if (os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")
            or not (member.isfile() or member.isdir())):
        raise DownloadError(f"the archive of {archive.url} holds an unsafe member {name!r} "
                            "(an absolute path, '..', a link or a device); nothing was kept")


def _install(archive: Archive, source: str, root: str) -> str:
    """Rename the unpacked folder ``source`` to ``<root>/<archive.folder>`` (atomic on one
    filesystem); a folder another process installed meanwhile is kept."""
    if not os.path.isdir(source):
        raise DownloadError(f"the archive of {archive.url} holds no {archive.folder}/ folder; "
                            "nothing was kept")
    target = os.path.join(root, archive.folder)
    try:
        os.rename(source, target)
    except OSError as err:
        if not os.path.isdir(target):
            raise DownloadError(f"cannot move {archive.folder}/ into {os.path.abspath(root)} "
                                f"({reason_of(err)}); nothing was kept") from None
    return target


class _Lines:
    """Progress as a few lines on a stream that is not a terminal: each quarter of ``total``
    bytes (or every 32 MiB when the total is not known)."""

    STEP_UNKNOWN = 32 << 20

    def __init__(self, total: Optional[int], label: str, stream: TextIO) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.done = self.said = 0
        self.next = self._step()
        self._say(f"{label} ({_size(total) if total is not None else 'size not announced'})")

    def _step(self) -> int:
        return max(1, self.total // 4) if self.total else self.STEP_UNKNOWN

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.said = self.done

    def update(self, n: int) -> None:
        """``n`` more bytes arrived."""
        self.done += n
        if self.done >= self.next:
            self._report()
            while self.next <= self.done:
                self.next += self._step()

    def _report(self) -> None:
        share = f"{100 * self.done // self.total}% " if self.total else ""
        self._say(f"{self.label}: {share}({_size(self.done)})")

    def close(self) -> None:
        """Say where the transfer ended, unless the last line already did."""
        if self.done != self.said:
            self._report()


def _progress(total: Optional[int], label: str, stream: TextIO) -> Any:
    """A byte counter with ``update(n)`` and ``close()``: a tqdm bar on a terminal, else
    :class:`_Lines`."""
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                    file=stream, dynamic_ncols=True)
    return _Lines(total, label, stream)


def _size(n: int) -> str:
    """``n`` bytes as MiB with one decimal (``162.6 MiB``)."""
    return f"{n / (1 << 20):.1f} MiB"

