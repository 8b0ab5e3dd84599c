"""Progress for long stages: a bar on a terminal, sparse log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

log = logging.getLogger("octn4")


@contextmanager
def progress(total: int, desc: str):
    """Yield ``advance(n=1)``; shows a tqdm bar when stderr is a terminal.

    Otherwise (Nextflow tasks, CI, redirected output) it logs at most about
    ten lines per stage, so logs stay quiet but show the run is alive.
    """
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="step", leave=False)
        try:
            yield bar.update
        finally:
            bar.close()
        return
    done, next_pct, t0 = 0, 10, time.perf_counter()
    log.info("%s: started (%d steps)", desc, total)

    def advance(n: int = 1):
        nonlocal done, next_pct
        done += n
        pct = 100 * done // max(total, 1)
        if pct >= next_pct and done < total:
            log.info("%s: %d%% (%d/%d)", desc, pct, done, total)
            next_pct = (pct // 10 + 1) * 10

    yield advance
    log.info("%s: done in %.1f s", desc, time.perf_counter() - t0)
