"""Worker processes for the stages that run their pieces in parallel (scan, mask, sections, grids, apply)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context

from .errors import WorkerKilled

__all__ = ["worker_pool"]


@contextmanager
def worker_pool(workers: int, killed: str):
    """A pool of ``workers`` spawned processes (fresh interpreters: no inherited threads or device state).

    A worker that dies without a Python error (most often the out-of-memory
    killer) breaks the pool; that surfaces as :class:`WorkerKilled` with the
    message ``killed``, which should say what each worker held and what to
    change, instead of ``BrokenProcessPool``.
    """
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            yield pool
    except BrokenProcessPool:
        raise WorkerKilled(killed) from None
