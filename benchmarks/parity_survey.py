#!/usr/bin/env python3
"""Where octn4's engine and SimpleITK part: a survey of small multi-level cases, and the top-bin test.

For each case (a phantom, shrink 2, a level-0 lattice, 2 levels x 5
iterations, threshold 0) it prints the largest log-field difference between
octn4's engine and SimpleITK on the same fit grid, then searches for the
iteration(s) at which dropping the brightest voxel from octn4's histogram
(what ITK does when ``(v - lo) / h`` rounds a hair above the last bin
centre in float32) removes the difference.  A difference that one such
drop removes is ITK's top-bin cliff: a decision taken by the last bit of
ITK's single-precision arithmetic, which no re-implementation can follow.

Usage::

    python benchmarks/parity_survey.py [--max-drops 2]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CASES = [((20, 40, 44), m0) for m0 in ((4, 4, 4), (4, 5, 4), (5, 4, 4), (4, 4, 5))] + \
        [((24, 48, 52), m0) for m0 in ((4, 4, 4), (4, 5, 4), (5, 4, 4), (4, 4, 5))] + \
        [((30, 40, 44), m0) for m0 in ((4, 4, 4), (4, 5, 4), (5, 4, 4), (4, 4, 5))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-drops", type=int, default=2, help="largest number of forced drops tried per case")
    a = p.parse_args(argv)
    import octn4.engine as E
    from conftest import smooth_phantom
    from octn4.bspline import shrink_grid
    from test_engine import engine_run, sitk_run

    its = (5, 5)
    n_iter = sum(its)
    original_bincount, original_sharpen = E.bincount, E._sharpen_compact
    state = {"drop": None}

    def bincount(x, weights=None, minlength=0):       # the histogram calls carry one weight per masked voxel
        if state["drop"] is not None and weights is not None and minlength > 1:
            weights = weights.copy()
            weights[state["drop"]] = 0.0
        return original_bincount(x, weights=weights, minlength=minlength)

    def with_drops(drops):
        calls = [0]

        def sharpen(v, seg, segments, **kw):
            state["drop"] = int(np.argmax(v)) if calls[0] in drops else None
            calls[0] += 1
            try:
                return original_sharpen(v, seg, segments, **kw)
            finally:
                state["drop"] = None
        return sharpen

    E.bincount = bincount
    print(f"{'fit grid':>14} {'m0':>10} {'octn4 vs SimpleITK':>19} {'after forced drop':>18}  at iteration(s)")
    for shape, m0 in CASES:
        vol, mask, _ = smooth_phantom(shape=shape)
        sub = np.ix_(*[o + 2 * np.arange(m) for o, m in (shrink_grid(n, 2) for n in vol.shape)])
        v, m = np.ascontiguousarray(vol[sub]), np.ascontiguousarray(mask[sub])
        want, _ = sitk_run(v, m, its, m0, 0.0, spacing=(0.04, 0.04, 0.1))
        E._sharpen_compact = original_sharpen
        plain = float(np.abs(engine_run(np, v, m, its, m0, 0.0)[0] - want).max())
        best = (plain, ())
        if plain > 1e-6:
            for r in range(1, a.max_drops + 1):
                for drops in itertools.combinations(range(n_iter), r):
                    E._sharpen_compact = with_drops(set(drops))
                    d = float(np.abs(engine_run(np, v, m, its, m0, 0.0)[0] - want).max())
                    best = min(best, (d, drops))
                if best[0] < 1e-6:
                    break
        E._sharpen_compact = original_sharpen
        print(f"{str(v.shape):>14} {str(m0):>10} {plain:19.1e} {best[0]:18.1e}  {list(best[1]) or '-'}", flush=True)


if __name__ == "__main__":
    main()
