"""Importing FFCV without its side effect on torch's thread count."""
from __future__ import annotations

import torch

_done = False


def import_ffcv() -> None:
    """Import FFCV without letting it resize torch's thread pool.

    FFCV's ``Compiler.set_num_threads`` also calls ``torch.set_num_threads``: once with 1 when
    ffcv is imported, then with ``workers`` when a Loader is made and at every epoch (from
    FFCV's own thread). Any of these would change the training's intra-op threads; kdflow
    restores torch's count after the import and keeps the method to numba's decoding threads.
    """
    global _done
    if _done:
        return
    threads = torch.get_num_threads()
    import numba
    try:
        from ffcv.pipeline.compiler import Compiler
    finally:
        torch.set_num_threads(threads)

    def set_num_threads(cls, n: int) -> None:
        cls.num_threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(cls.num_threads)

    Compiler.set_num_threads = classmethod(set_num_threads)
    _done = True

