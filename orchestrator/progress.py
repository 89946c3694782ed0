"""How kdflow shows progress: bars on a terminal, one plain line per event elsewhere.

:func:`progress_style` decides once per launch whether output goes to a terminal; launchers
pass the answer to the jobs they start (``RunOptions.progress`` is then "draw a bar"), and
report the study through :class:`StudyProgress`:

* ``bars`` (stdout and stderr both terminals): a study bar, and one bar per running job;
* ``lines`` (CI, nohup, ``make demo > log``): a line per job start and end, with its headline
  metric and wall time, and a summary line every :data:`SUMMARY_EVERY_S` seconds and at the end;
* ``off`` (``progress=false``): nothing.
"""
from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, Optional, Sequence, Set

BARS, LINES, OFF = "bars", "lines", "off"
#: Seconds between two study summary lines in ``lines`` style.
SUMMARY_EVERY_S = 30.0
#: Terminal columns a job bar keeps for its meter and postfix (the name gets the rest).
METER_COLUMNS = 55
#: Fewest characters a job's name is cut to on a narrow terminal.
MIN_NAME_WIDTH = 40
#: Fewest characters of a job's method a cut name keeps.
MIN_HEAD = 6
#: How a job ended, as the launchers count it.
ENDINGS = ("done", "failed", "blocked", "interrupted")


def progress_style(enabled: bool, streams: Optional[Sequence[IO[str]]] = None) -> str:
    """``off`` when progress is disabled, else ``bars`` when every one of ``streams`` (default
    stdout and stderr: lines go to one, bars to the other) is a terminal, else ``lines``."""
    if not enabled:
        return OFF
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    return BARS if all(_is_terminal(s) for s in streams) else LINES


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def short_name(title: str, width: int) -> str:
    """A job's ``title`` (``method [variant] pair dataset seed``) in at most ``width``
    characters: whole if it fits; else with its variant's values alone (``[inverted]`` for
    ``[direction=inverted]``); else cut in the middle (``…``), keeping at least
    :data:`MIN_HEAD` characters of the method and as much of the end (pair, dataset, seed) as
    the rest allows: ``invert…resnet32x4->resnet8x4 cifar100 s2``."""
    if len(title) <= width:
        return title
    title = re.sub(r"\[[^\]]*\]", lambda m: "[" + ",".join(
        part.split("=", 1)[-1] for part in m.group(0)[1:-1].split(",")) + "]", title)
    if len(title) <= width:
        return title
    first = title.split(" ", 1)[0]
    end = title[title.index("] ") + 2:] if "] " in title else title[len(first) + 1:]
    head = min(max(min(MIN_HEAD, len(first)), width - 1 - len(end)), width - 1)
    return f"{title[:head]}…{title[len(title) - (width - 1 - head):] if head < width - 1 else ''}"


def bar_name_width(columns: Optional[int] = None) -> int:
    """The characters a job bar's name may take on a terminal ``columns`` wide (default: this
    terminal's width)."""
    columns = columns or shutil.get_terminal_size().columns
    return max(MIN_NAME_WIDTH, columns - METER_COLUMNS)


def job_bar(title: str, total: int, initial: int, position: int) -> Any:
    """A tqdm bar over a job's ``total`` training steps, named by its title (shortened to fit
    the terminal), on row ``position`` below the study bar; it vanishes when closed."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=short_name(title, bar_name_width()), unit="step",
                position=position, leave=False, dynamic_ncols=True)


def duration(seconds: float) -> str:
    """``seconds`` for a person: ``42 s``, ``4 min``, ``2 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def eta_s(elapsed_s: float, ended: int, left: int) -> Optional[float]:
    """Seconds until the ``left`` jobs (running or waiting) end, at the rate jobs ended so far
    (``ended`` of them in ``elapsed_s`` seconds, side by side as they ran); None before the
    first one ends."""
    if left == 0:
        return 0.0
    if ended == 0:
        return None
    return elapsed_s / ended * left


def result_text(result: Optional[Dict[str, Any]]) -> str:
    """A finished job's headline from its ``result.json``: ``top1 45.3%, 12.3 s`` (``miou``
    for segmentation; metrics are in percent)."""
    if not result:
        return ""
    from kdflow.orchestrator.metrics import headline, primary_metric

    metric = primary_metric(result.get("task", "classification"))
    return f"{metric} {headline(result):.1f}%, {result.get('wall_time_s', 0.0):.1f} s"


class StudyProgress:
    """The progress of one launch of a study, in ``style`` (:func:`progress_style`).

    Launchers call :meth:`started` as a job starts and :meth:`ended` as it ends (``done``,
    ``failed``, ``blocked`` or ``interrupted``, with a detail: the headline or the error), and
    :meth:`close` at the end. ``skipped`` jobs were done before the launch.
    """

    def __init__(self, study: str, titles: Dict[str, str], style: str, skipped: int = 0,
                 out: Optional[IO[str]] = None, every_s: float = SUMMARY_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.study, self.titles, self.style = study, titles, style
        self.out = out or sys.stdout
        self.clock = clock
        self.begun = clock()
        self.skipped = skipped
        self.running: Set[str] = set()
        self.ends: Dict[str, int] = {ending: 0 for ending in ENDINGS}
        self.lock = threading.Lock()
        self.bar = self._study_bar() if style == BARS else None
        self.stop = threading.Event()
        self.ticker: Optional[threading.Thread] = None
        if style == LINES:
            self.ticker = threading.Thread(target=self._tick, args=(every_s,), daemon=True,
                                           name="kdflow-progress")
            self.ticker.start()

    @property
    def total(self) -> int:
        return len(self.titles)

    @property
    def pending(self) -> int:
        """Jobs neither skipped, running nor ended."""
        return self.total - self.skipped - len(self.running) - sum(self.ends.values())

    def started(self, job_id: str) -> None:
        with self.lock:
            self.running.add(job_id)
            number = self.skipped + sum(self.ends.values()) + len(self.running)
            self._say(f"start  job {number} of {self.total}: {self.titles[job_id]}")
            self._refresh_bar(0)

    def ended(self, job_id: str, status: str, detail: str = "") -> None:
        """Count ``job_id`` as ended with ``status`` (one of :data:`ENDINGS`)."""
        with self.lock:
            self.running.discard(job_id)
            self.ends[status] += 1
            self._say(f"{status:<6} {self.titles[job_id]}" + (f": {detail}" if detail else ""))
            self._refresh_bar(1)

    def summary(self) -> str:
        """``[smoke] 5 jobs: 2 done, 1 failed, 0 blocked, 0 interrupted, 1 running, 1 pending,
        0 skipped; 40 s elapsed, ETA 25 s``: the counts add up to the study's jobs."""
        elapsed = self.clock() - self.begun
        eta = eta_s(elapsed, self.ends["done"] + self.ends["failed"], len(self.running) + self.pending)
        return (f"[{self.study}] {self.total} jobs: "
                + ", ".join(f"{n} {ending}" for ending, n in self.ends.items())
                + f", {len(self.running)} running, {self.pending} pending, {self.skipped} skipped; "
                f"{duration(elapsed)} elapsed, ETA {'?' if eta is None else duration(eta)}")

    def close(self) -> None:
        """Stop the periodic summary and say the last one (``lines``), or close the bar."""
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        with self.lock:
            if self.style == LINES:
                self._print(self.summary())
            if self.bar is not None:
                self.bar.close()

    def _say(self, text: str) -> None:
        if self.style == LINES:
            self._print(f"[{self.study}] {text}")

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _tick(self, every_s: float) -> None:
        while not self.stop.wait(every_s):
            with self.lock:
                self._print(self.summary())

    def _study_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.total, initial=self.skipped, desc=f"{self.study} jobs", unit="job",
                    position=0, dynamic_ncols=True)

    def _refresh_bar(self, ended: int) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"{len(self.running)} running, {self.ends['failed']} failed, "
                                 f"{self.ends['blocked']} blocked", refresh=False)
        self.bar.update(ended)
        self.bar.refresh()
