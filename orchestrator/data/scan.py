"""``kdflow data check``: decode every file of a dataset and list the ones that cannot be read.

A dataset stored as files lists them through its Config's ``data_files()`` (each with the
function training reads it with, so a file the check passes is one training can read);
datasets without ``data_files`` (generated or bundled ones) have nothing to check.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from kdflow.orchestrator.data.errors import reason_of

#: Files handed to a worker process at a time.
CHUNK = 16


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset and how to decode it in full.

    read: ``read(path)`` decodes the whole file and raises when it cannot; a module-level
          function (or a partial of one), so that it pickles into worker processes.
    """

    path: str
    read: Callable[[str], Any]


#: ``(path, reason)`` of a file that cannot be read.
Problem = Tuple[str, str]


def problem_of(item: DataFile) -> Optional[Problem]:
    """Why ``item`` cannot be read (``(path, "OSError: image file is truncated ...")``), or
    None when it decodes."""
    try:
        item.read(item.path)
    except Exception as err:  # noqa: BLE001  (whatever a broken file raises, it is listed)
        return item.path, reason_of(err)
    return None


def _results(files: Sequence[DataFile], workers: int) -> Iterator[Optional[Problem]]:
    """``problem_of`` each file, in order, decoded by ``workers`` processes (0: this one)."""
    if workers == 0:
        yield from map(problem_of, files)
        return
    with multiprocessing.get_context().Pool(max(1, min(workers, len(files)))) as pool:
        yield from pool.imap(problem_of, files, chunksize=CHUNK)


def scan_files(files: Sequence[DataFile], workers: int, progress: bool = True) -> List[Problem]:
    """Decode every one of ``files`` with ``workers`` processes (0: in this process) and
    return ``(path, reason)`` of those that cannot be read, in ``files`` order; a progress bar
    on stderr when ``progress``."""
    from tqdm import tqdm

    problems = []
    with tqdm(total=len(files), unit="file", disable=not progress, dynamic_ncols=True) as bar:
        for problem in _results(files, workers):
            bar.update()
            if problem is not None:
                problems.append(problem)
                bar.set_postfix(unreadable=len(problems))
    return problems
