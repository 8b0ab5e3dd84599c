#!/usr/bin/env python3
"""Memory of one engine fit as a function of its fit grid and its tissue voxels, measured.

Runs ``fit_lattice_batch`` on phantoms of several grid sizes, mask
fractions and batch sizes and records the peak of the bytes the fit
allocates above what it was given:

``numpy``
    NumPy's own allocations, traced with ``tracemalloc`` (NumPy reports
    its buffers to it): the CPU engine, histograms by ``bincount``.
``array_api_strict``
    The same fits through the array API path a GPU takes (histograms by
    the sorted integer sums of ``_backend.segment_sum``), which
    ``array_api_strict`` runs on NumPy buffers, so ``tracemalloc`` sees
    every array a CuPy fit allocates, in the same sizes.
``cupy`` (``--device cuda``)
    The CuPy memory pool's high-water mark (``total_bytes``) during the fit.

Then it fits ``peak = a * grid_voxels + b * tissue_voxels + c`` (members summed;
the tissue term counts the padded rows: members x the largest member's voxels)
by least squares and prints ``a``, ``b`` and ``c`` with the largest relative
misfit.  ``octn4.engine.FIT_BYTES_PER_GRID_VOXEL`` and
``FIT_BYTES_PER_TISSUE_VOXEL``, which size GPU batches, come from this.

Usage::

    python benchmarks/fit_memory.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [  # (members, grid), mask radius^2 (0.79: ~37 % of the grid; 2.5: all of it)
    (1, (32, 64, 64), 0.79), (1, (32, 64, 64), 2.5), (1, (64, 64, 64), 0.79), (1, (64, 128, 128), 0.79),
    (1, (64, 128, 128), 0.3), (1, (64, 128, 128), 2.5), (4, (16, 96, 96), 0.79), (8, (16, 64, 64), 0.79),
]


def phantom_batch(members, grid, r2):
    from engine_speed import phantom

    vols, masks = [], []
    for seed in range(members):
        v, _ = phantom(grid, seed=seed)
        z, y, x = np.meshgrid(*(np.linspace(-1, 1, k, dtype=np.float32) for k in grid), indexing="ij")
        vols.append(v)
        masks.append(x * x + y * y + z * z < r2)
    return np.stack(vols), np.stack(masks)


def peak_bytes(backend, imgs, masks, its):
    from octn4.engine import fit_lattice_batch

    if backend == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        a, m = cupy.asarray(imgs), cupy.asarray(masks)
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        base = pool.total_bytes()
        high = [base]
        # the pool grows monotonically while blocks stay cached: its total after the fit is the high-water mark
        fit_lattice_batch(a, m, m0=(4, 4, 4), levels_iterations=its, threshold=0.0)
        cupy.cuda.Device().synchronize()
        high.append(pool.total_bytes())
        return max(high) - base
    xp = importlib.import_module(backend)
    a, m = xp.asarray(imgs), xp.asarray(masks)
    fit_lattice_batch(a[:1, ...], m[:1, ...], m0=(4, 4, 4), levels_iterations=(1,), threshold=0.0)   # one-off caches
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fit_lattice_batch(a, m, m0=(4, 4, 4), levels_iterations=its, threshold=0.0)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iterations", default="2,2", help="iterations per level (the count does not change sizes)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    its = tuple(int(v) for v in a.iterations.split(","))
    backends = ["numpy", "array_api_strict"] + (["cupy"] if a.device == "cuda" else [])
    rows = []
    print(f"{'members':>7} {'grid':>16} {'grid voxels':>12} {'tissue voxels':>14} "
          + " ".join(f"{b + ' MiB':>22}" for b in backends))
    for members, grid, r2 in CASES:
        imgs, masks = phantom_batch(members, grid, r2)
        row = {"members": members, "grid": list(grid), "grid_voxels": int(imgs.size),
               "tissue_voxels": int(masks.sum()), "rows_voxels": int(members * masks.reshape(members, -1).sum(1).max())}
        for b in backends:
            row[b] = peak_bytes(b, imgs, masks, its)
        rows.append(row)
        print(f"{members:>7} {str(grid):>16} {row['grid_voxels']:>12,} {row['tissue_voxels']:>14,} "
              + " ".join(f"{row[b] / 2 ** 20:>22.1f}" for b in backends), flush=True)
    fits = {}
    for b in backends:
        design = np.array([[r["grid_voxels"], r["rows_voxels"], 1.0] for r in rows], np.float64)
        y = np.array([r[b] for r in rows], np.float64)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        misfit = float(np.max(np.abs(design @ coef - y) / y))
        fits[b] = {"bytes_per_grid_voxel": float(coef[0]), "bytes_per_tissue_voxel": float(coef[1]),
                   "bytes_fixed": float(coef[2]), "largest_relative_misfit": misfit}
        print(f"{b}: peak = {coef[0]:.1f} B x grid voxels + {coef[1]:.1f} B x tissue voxels + "
              f"{coef[2] / 2 ** 20:.1f} MiB (tissue voxels: members x largest member); largest misfit {misfit:.1%}")
    if a.json:
        a.json.write_text(json.dumps({"iterations": its, "rows": rows, "fits": fits}, indent=1))


if __name__ == "__main__":
    main()
