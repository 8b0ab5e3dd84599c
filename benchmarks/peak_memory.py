#!/usr/bin/env python3
"""Peak memory of a command and all its child processes (summed RSS, sampled).

``/usr/bin/time -v`` reports the largest single process; octn4 runs sections
in worker processes, so this samples the RSS of the whole process tree every
``--interval`` seconds and reports the peak of the sum and of each process.

Usage::

    python benchmarks/peak_memory.py -- octn4 run IN OUT --sections 8 --workers 2
    python benchmarks/peak_memory.py --pid 1234        # attach to a running command
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> dict[int, int]:
    out = {}
    for p in [proc] + proc.children(recursive=True):
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def watch(proc: psutil.Process, interval: float) -> tuple[int, dict[int, int]]:
    peak_sum, peak_each = 0, {}
    while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
        rss = tree_rss(proc)
        peak_sum = max(peak_sum, sum(rss.values()))
        for pid, r in rss.items():
            peak_each[pid] = max(peak_each.get(pid, 0), r)
        time.sleep(interval)
    return peak_sum, peak_each


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, help="attach to this running process instead of starting one")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("command", nargs="*")
    a = p.parse_args(argv)
    if a.pid:
        proc, child = psutil.Process(a.pid), None
    else:
        child = subprocess.Popen(a.command)
        proc = psutil.Process(child.pid)
    t0 = time.perf_counter()
    peak_sum, peak_each = watch(proc, a.interval)
    rc = child.wait() if child else 0
    mib = 2 ** 20
    print(f"peak RSS, all processes together: {peak_sum / mib:.0f} MiB; largest single process: "
          f"{max(peak_each.values(), default=0) / mib:.0f} MiB; {len(peak_each)} processes; "
          f"{time.perf_counter() - t0:.0f} s watched", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
