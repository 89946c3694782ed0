"""``DataError``: a dataset file that cannot be decoded, named in one line.

Every reader of a dataset's files wraps its decoding with :func:`read_file`, which turns any
failure (PIL's ``image file is truncated``, a broken pickle, a wrong shape) into a
:class:`DataError` naming the file. Inside a DataLoader worker a raised exception reaches
the main process only as a traceback text in a new exception, so there a sample that failed
is *returned* as its DataError (a picklable value: :func:`collate_or_error` passes it on
instead of a batch) and :func:`raise_errors` raises it in the main process.
:func:`build_named` adds the ``kdflow data check`` command line of the dataset to every
DataError its loaders raise.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, List, Sequence, TypeVar

from kdflow.orchestrator.data.loaders import Batch, Data, Shard

T = TypeVar("T")


def reason_of(err: BaseException) -> str:
    """``err`` as one line: ``OSError: image file is truncated (3 bytes not processed)``."""
    return " ".join(f"{type(err).__name__}: {err}".split())


class DataError(RuntimeError):
    """File ``path`` of a dataset cannot be read because of ``reason`` (one line).

    ``check`` is the ``kdflow data check ...`` command that lists every unreadable file of
    the dataset (empty: not known where the error is raised; :func:`build_named` fills it in).
    ``str()`` is one line: the file, the cause and the fix.
    """

    def __init__(self, path: str, reason: str, check: str = "") -> None:
        super().__init__(path, reason, check)  # args: pickles through worker processes
        self.path = os.path.abspath(path)
        self.reason = " ".join(reason.split())
        self.check = check

    def __str__(self) -> str:
        check = self.check or "kdflow data check DATASET data.root=..."
        return (f"cannot read {self.path} ({self.reason}). Fix: replace or delete the file; "
                f"`{check}` lists every unreadable file of the dataset")

    def with_check(self, check: str) -> "DataError":
        """The same error with the ``kdflow data check`` command line ``check``."""
        return DataError(self.path, self.reason, check)


def read_file(read: Callable[[str], T], path: str) -> T:
    """``read(path)``; any failure is raised as a :class:`DataError` naming ``path``."""
    try:
        return read(path)
    except Exception as err:  # noqa: BLE001  (whatever a broken file raises, it is named)
        raise DataError(path, reason_of(err)) from err


def collate_or_error(collate: Callable[[List[Any]], T], items: Sequence[Any]) -> Any:
    """``collate(items)``, or the first item that is a :class:`DataError` (a sample that
    could not be read), passed on as the batch."""
    error = next((item for item in items if isinstance(item, DataError)), None)
    return error if error is not None else collate(list(items))


def raise_errors(batches: Iterator[T]) -> Iterator[T]:
    """``batches``, raising the first one that is a :class:`DataError` instead."""
    for batch in batches:
        if isinstance(batch, DataError):
            raise batch
        yield batch


def check_command(dataset: str, cfg: Any) -> str:
    """The ``kdflow data check`` command line that scans dataset ``dataset`` (settings
    ``cfg``, whose ``root`` is its folder)."""
    return f"kdflow data check {dataset} prepare.dataset.root={os.path.abspath(cfg.root)}"


class _Named:
    """Names ``kdflow data check`` for dataset ``dataset`` (settings ``cfg``) in the
    DataErrors raised while loading."""

    def __init__(self, dataset: str, cfg: Any) -> None:
        self.dataset = dataset
        self.cfg = cfg

    def named(self, batches: Iterator[T]) -> Iterator[T]:
        """``batches``, with the check command added to a DataError they raise."""
        try:
            yield from batches
        except DataError as err:
            raise err.with_check(check_command(self.dataset, self.cfg)) from None


class _NamedTrain(_Named):
    """A training loader whose DataErrors name the dataset's check command."""

    def __init__(self, loader: Any, dataset: str, cfg: Any) -> None:
        super().__init__(dataset, cfg)
        self.loader = loader
        self.steps_per_epoch = loader.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0, shard: Shard = (0, 1)) -> Iterator[Batch]:
        return self.named(self.loader.batches(epoch, start_step, shard))


class _NamedEval(_Named):
    """An evaluation loader whose DataErrors name the dataset's check command."""

    def __init__(self, loader: Any, dataset: str, cfg: Any) -> None:
        super().__init__(dataset, cfg)
        self.loader = loader

    def batches(self, shard: Shard = (0, 1)) -> Iterator[Batch]:
        return self.named(self.loader.batches(shard))


def build_named(build: Callable[[], Data], dataset: str, cfg: Any) -> Data:
    """``build()``, its loaders wrapped so that a :class:`DataError` raised while building or
    loading names ``kdflow data check`` for dataset ``dataset`` (settings ``cfg``)."""
    try:
        data = build()
    except DataError as err:
        raise err.with_check(check_command(dataset, cfg)) from None
    return Data(train=_NamedTrain(data.train, dataset, cfg),
                val=_NamedEval(data.val, dataset, cfg), info=data.info)
