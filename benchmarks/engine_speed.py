#!/usr/bin/env python3
"""octn4's N4 engine against SimpleITK, side by side in one run on the same fit grids.

Three measurements (octn4's engine in parity mode, the mode whose result
SimpleITK's should equal), each printing times, their ratio and the parity figure
(largest difference between the two log fields on the fit grid, with the
iteration counts per level):

``--size 256 --shrink 4`` (always)
    A 256^3 volume with a smooth multiplicative bias, a spherical mask (37 %
    of the voxels) and gamma noise, shrunk by 4 (ITK's centred subsampling)
    to a 64^3 fit grid; ITK's defaults (4 levels x 50 iterations, threshold
    1e-3, 4 control points) and the same thread count for both.
``--growth 64 128 256 512``
    How time grows with the fit grid: the phantom generated directly at each
    size, a fixed schedule (``--growth-iterations``, threshold 0, so both run
    the same number of iterations), seconds per iteration for each.
``--batch N``
    N sections of one stack (equal shapes, different data): SimpleITK one by
    one, the engine one by one, and the engine's batched loop.

``--device cuda`` runs the engine on CuPy (SimpleITK stays on the CPU).

Usage::

    python benchmarks/engine_speed.py --threads 2 --growth 64 128 256 512 --batch 8
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def phantom(n: int | tuple, seed: int = 0):
    shape = (n,) * 3 if np.isscalar(n) else tuple(n)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, k, dtype=np.float32) for k in shape), indexing="ij")
    mask = x * x + y * y + z * z < 0.79   # ~37 % of the cube
    clean = np.where(mask, np.where(x * x + y * y < 0.2, 2.0, 1.0), 0.1).astype(np.float32)
    a = 0.3 + 0.1 * rng.standard_normal()
    bias = np.exp(a * x - 0.25 * z + 0.2 * y * y).astype(np.float32)
    return clean * bias * rng.gamma(30, 1 / 30, shape).astype(np.float32), mask


def run_sitk(img_arr, mask_arr, its, threshold, threads, *, with_filter=False):
    """SimpleITK's N4 on a fit grid: seconds, its log field there, iterations per level (and the filter)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(img_arr)
    msk = sitk.GetImageFromArray(mask_arr.astype(np.uint8))
    msk.CopyInformation(img)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(its))
    f.SetConvergenceThreshold(threshold)
    f.SetNumberOfThreads(threads)
    done = {}
    f.AddCommand(sitk.sitkIterationEvent, lambda: done.__setitem__(f.GetCurrentLevel(), f.GetElapsedIterations()))
    t0 = time.perf_counter()
    f.Execute(img, msk)
    t = time.perf_counter() - t0
    field = sitk.GetArrayFromImage(f.GetLogBiasFieldAsImage(img)).astype(np.float64)
    counts = [done.get(i, 0) for i in range(len(its))]
    return (t, field, counts, f) if with_filter else (t, field, counts)


def field_of(fit, shape):
    from octn4.engine import _contract, _grid_basis

    return _contract(fit.coeffs, [_grid_basis(n, m, 3) for n, m in zip(shape, fit.coeffs.shape)], np)


def timed(fn, device):
    if device == "cuda":
        import cupy

        cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        cupy.cuda.Device().synchronize()
    return time.perf_counter() - t0, out


def to_device(a, device):
    if device == "cuda":
        import cupy

        return cupy.asarray(a)
    return a


def headline(a):
    from octn4.bspline import shrink_grid
    from octn4.engine import fit_lattice

    vol, mask = phantom(a.size)
    sub = np.ix_(*[o + a.shrink * np.arange(m) for o, m in (shrink_grid(n, a.shrink) for n in vol.shape)])
    small, small_mask = np.ascontiguousarray(vol[sub]), np.ascontiguousarray(mask[sub])
    its = (50, 50, 50, 50)
    t_sitk, want, sitk_its = run_sitk(small, small_mask, its, 1e-3, a.threads)
    t_eng, fit = timed(lambda: fit_lattice(to_device(small, a.device), to_device(small_mask, a.device),
                                           m0=(4, 4, 4), levels_iterations=its, parity=True), a.device)
    got = field_of(fit, small.shape)
    print(f"== {a.size}^3 volume at shrink {a.shrink}: fit grid {small.shape} ({small_mask.mean():.0%} in mask), "
          f"ITK defaults, {a.threads} threads, engine on {a.device}")
    print(f"SimpleITK N4    {t_sitk:8.2f} s   iterations per level {sitk_its}")
    print(f"octn4 engine    {t_eng:8.2f} s   iterations per level {fit.iterations}")
    print(f"speed-up        {t_sitk / t_eng:8.1f}x   max |log field difference| {np.abs(got - want).max():.2e} "
          f"(field range {np.ptp(want):.3f})")
    if a.same_schedule and fit.iterations != sitk_its:
        # the fit itself, apart from where the convergence test stopped: both run SimpleITK's counts
        its_fixed = tuple(max(1, i) for i in sitk_its)
        _, want2, _ = run_sitk(small, small_mask, its_fixed, 0.0, a.threads)
        fit2 = fit_lattice(to_device(small, a.device), to_device(small_mask, a.device), m0=(4, 4, 4),
                           levels_iterations=its_fixed, threshold=0.0, parity=True)
        print(f"same schedule   {list(its_fixed)}, threshold 0: max |log field difference| "
              f"{np.abs(field_of(fit2, small.shape) - want2).max():.2e}")


def growth(a):
    from octn4.engine import fit_lattice

    its = tuple(int(v) for v in a.growth_iterations.split(","))
    n_its = sum(its)
    print(f"== growth: fit grids n^3, {len(its)} levels x {its} iterations (threshold 0), {a.threads} threads, "
          f"engine on {a.device}; the engine's first call and the median of {a.repeat} (speed-up from the median)")
    print(f"{'grid':>6} {'voxels':>12} {'SimpleITK s/it':>15} {'octn4 first s/it':>17} {'octn4 s/it':>11} "
          f"{'speed-up':>9} {'max |diff|':>11}")
    for n in a.growth:
        vol, mask = phantom(n)
        t_sitk, want, _ = run_sitk(vol, mask, its, 0.0, a.threads) if n <= a.sitk_max else (np.nan, None, None)
        runs = [timed(lambda v=vol, m=mask: fit_lattice(to_device(v, a.device), to_device(m, a.device),
                                                        m0=(4, 4, 4), levels_iterations=its, threshold=0.0,
                                                        parity=True), a.device) for _ in range(a.repeat)]
        fit = runs[0][1]
        t_first, t_eng = runs[0][0], float(np.median([r[0] for r in runs]))
        diff = np.abs(field_of(fit, vol.shape) - want).max() if want is not None else np.nan
        print(f"{n:>5}^3 {vol.size:>12,} {t_sitk / n_its:>15.3f} {t_first / n_its:>17.3f} {t_eng / n_its:>11.3f} "
              f"{t_sitk / t_eng:>8.1f}x {diff:>11.2e}", flush=True)
        del vol, mask, want, fit, runs


def batch(a):
    from octn4.engine import fit_lattice, fit_lattice_batch

    shape = tuple(a.batch_shape)
    data = [phantom(shape, seed=s) for s in range(a.batch)]
    its = (50, 50, 50, 50)
    t_sitk, fields = 0.0, []
    for v, m in data:
        t, f, _ = run_sitk(v, m, its, 1e-3, a.threads)
        t_sitk += t
        fields.append(f)
    t_one, _ = timed(lambda: [fit_lattice(to_device(v, a.device), to_device(m, a.device), m0=(4, 4, 4),
                                          levels_iterations=its, parity=True) for v, m in data], a.device)
    imgs, masks = to_device(np.stack([d[0] for d in data]), a.device), to_device(np.stack([d[1] for d in data]),
                                                                                   a.device)
    t_batch, fits = timed(lambda: fit_lattice_batch(imgs, masks, m0=(4, 4, 4), levels_iterations=its, parity=True),
                          a.device)
    diff = max(np.abs(field_of(f, shape) - w).max() for f, w in zip(fits, fields))
    print(f"== {a.batch} sections, fit grid {shape} each, ITK defaults, {a.threads} threads, engine on {a.device}")
    print(f"SimpleITK one by one   {t_sitk:8.2f} s")
    print(f"octn4 one by one       {t_one:8.2f} s   ({t_sitk / t_one:.1f}x)")
    print(f"octn4 batched          {t_batch:8.2f} s   ({t_sitk / t_batch:.1f}x)   max |log field difference| "
          f"{diff:.2e}; iterations {[f.iterations for f in fits]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--shrink", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--growth", type=int, nargs="*", default=[], metavar="N")
    p.add_argument("--growth-iterations", default="3,3", help="fixed schedule for --growth (default 3,3)")
    p.add_argument("--sitk-max", type=int, default=512, help="largest --growth grid SimpleITK is run on")
    p.add_argument("--repeat", type=int, default=3, help="engine runs per --growth grid (first and median shown)")
    p.add_argument("--batch", type=int, default=0, metavar="N")
    p.add_argument("--batch-shape", type=int, nargs=3, default=(8, 96, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--same-schedule", action="store_true",
                   help="when the iteration counts differ, rerun both with SimpleITK's counts and threshold 0")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    headline(a)
    if a.growth:
        growth(a)
    if a.batch:
        batch(a)


if __name__ == "__main__":
    main()
