#!/usr/bin/env python3
"""octn4's engine at another revision against this tree's, side by side in one process on the same data.

The other revision's package is loaded from a work tree of it (``git
worktree add /tmp/before REV``) under another name, so both engines run in
the same process, alternately, on the same fit grids; each case prints the
median of ``--repeat`` runs of each, their ratio and both iteration counts.

Usage::

    git worktree add /tmp/before 844c813
    python benchmarks/engine_revisions.py /tmp/before
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (volume edge, shrink, iterations per level, threshold, parity)
CASES = [(256, 4, (50, 50, 50, 50), 1e-3, True), (256, 4, (50, 50, 50, 50), 1e-3, False),
         (128, 1, (3, 3), 0.0, True), (256, 1, (3, 3), 0.0, True)]


def load_engine(tree: Path):
    """``octn4.engine`` of the package under ``tree/lib/octn4``, imported as ``octn4_other``."""
    pkg = tree / "lib" / "octn4"
    spec = importlib.util.spec_from_file_location("octn4_other", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["octn4_other"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("octn4_other.engine")


def fit_grid(n: int, shrink: int):
    from engine_speed import phantom

    from octn4.bspline import shrink_grid

    vol, mask = phantom(n)
    if shrink == 1:
        return vol, mask
    sub = np.ix_(*[o + shrink * np.arange(m) for o, m in (shrink_grid(k, shrink) for k in vol.shape)])
    return np.ascontiguousarray(vol[sub]), np.ascontiguousarray(mask[sub])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree", type=Path, help="a work tree of the other revision")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    import octn4.engine as this

    other = load_engine(a.tree)
    print(f"other: {other.__file__}\nthis:  {this.__file__}")
    for n, s, its, threshold, parity in CASES:
        v, m = fit_grid(n, s)
        times = {"other": [], "this": []}
        counts = {}
        for _ in range(a.repeat):
            for name, engine in (("other", other), ("this", this)):
                t0 = time.perf_counter()
                fit = engine.fit_lattice(v, m, m0=(4, 4, 4), levels_iterations=its, threshold=threshold,
                                         parity=parity)
                times[name].append(time.perf_counter() - t0)
                counts[name] = fit.iterations
        t_other, t_this = (float(np.median(times[k])) for k in ("other", "this"))
        print(f"fit grid {v.shape}, {its}, threshold {threshold}, parity {parity}: other {t_other:.3f} s "
              f"{counts['other']}, this {t_this:.3f} s {counts['this']}, this/other {t_this / t_other:.2f} "
              f"(median of {a.repeat})", flush=True)


if __name__ == "__main__":
    main()
