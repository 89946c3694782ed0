"""Polling helper shared by the SLURM tests (imported as a sibling module)."""
from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.5) -> Any:
    """``check()``'s first truthy value, polled every ``interval`` s; AssertionError after
    ``timeout`` s naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
