#!/usr/bin/env python3
"""The GPU figures, side by side in one run: octn4's engine on CuPy against its NumPy path and SimpleITK.

Two volumes, each fitted by all three (same fit grid, same schedule) and
corrected at full resolution:

``small``
    a 256^3 phantom (``engine_speed.phantom``: smooth bias, 37 % mask,
    gamma speckle) shrunk by 4 to a 64^3 fit grid, ITK's defaults (4 x 50
    iterations, threshold 1e-3).  Parity is measured at a fixed schedule
    (the counts SimpleITK took, threshold 0), where the convergence test
    cannot make the engines stop apart.
``big``
    a ``--big`` stack (default 512 x 1024 x 1024, 2 GiB of float32) built on
    the device, shrunk by 4 on the device, fitted with a fixed schedule
    (``--big-iterations``, threshold 0, so every engine runs the same
    iterations), then corrected at full resolution on the device.
    SimpleITK fits the same fit grid (copied to the host).

Figures: seconds of each fit and each full-resolution apply (evaluate the
field, ``exp``, divide), the CuPy fit's device-memory high-water mark
against ``octn4.engine.fit_memory_bytes``, the largest log-field difference
CuPy vs NumPy, whether two CuPy fits are bit-identical, and the ratio
SimpleITK fit / (CuPy fit + full-resolution apply) on the big stack.
Written as JSON (``--json``).

``--xp numpy --small 64 --big 32,64,64`` runs every step with NumPy standing
in for CuPy, on small data: the suite's smoke test of this script.  Without
a usable CuPy (and without ``--xp numpy``) it says so and exits 0.

Usage::

    python benchmarks/gpu_check.py --json gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sync(xp):
    if xp.__name__ == "cupy":
        xp.cuda.Device().synchronize()


def timed(xp, fn):
    sync(xp)
    t0 = time.perf_counter()
    out = fn()
    sync(xp)
    return time.perf_counter() - t0, out


def device_volume(xp, shape, seed=0):
    """A phantom built where ``xp`` computes: a brighter core in a sphere of tissue, a smooth bias, speckle."""
    z, y, x = (xp.reshape(xp.linspace(-1, 1, n, dtype=xp.float32), s)
               for n, s in zip(shape, ((-1, 1, 1), (1, -1, 1), (1, 1, -1))))
    r2 = x * x + y * y + z * z
    mask = r2 < 0.79
    clean = xp.where(mask, xp.where(x * x + y * y < 0.2, 2.0, 1.0), 0.1).astype(xp.float32)
    bias = xp.exp(0.3 * x - 0.25 * z + 0.2 * y * y).astype(xp.float32)
    if xp.__name__ == "cupy":
        noise = xp.random.RandomState(seed).standard_normal(shape, dtype=xp.float32)
    else:
        noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return clean * bias * xp.exp(0.18 * noise), xp.broadcast_to(mask, shape).copy()


def log_field(fit, shape):
    from engine_speed import field_of

    return field_of(fit, shape)


def sitk_fit(img, mask, its, threshold, threads):
    """SimpleITK's N4 on a fit grid: seconds, log field on the grid, iterations per level, the filter."""
    from engine_speed import run_sitk

    return run_sitk(img, mask, its, threshold, threads, with_filter=True)


def sitk_apply(corrector, vol):
    """SimpleITK's full-resolution correction: its log field on the full grid, then ``vol / exp(field)``."""
    import SimpleITK as sitk

    t0 = time.perf_counter()
    full = sitk.GetImageFromArray(vol)
    log_b = corrector.GetLogBiasFieldAsImage(full)
    out = sitk.GetArrayFromImage(full / sitk.Cast(sitk.Exp(log_b), full.GetPixelID()))
    return time.perf_counter() - t0, out


def engine_fit(xp, img, mask, its, threshold, parity=False):
    from octn4.engine import fit_lattice

    return fit_lattice(xp.asarray(img), xp.asarray(mask), m0=(4, 4, 4), levels_iterations=its, threshold=threshold,
                       parity=parity)


def apply_full(xp, vol, fit, full_shape, shrink, tile_planes=64):
    """Full-resolution correction with the fitted lattice, tile by tile, on ``vol``'s device."""
    from octn4.bspline import BSplineField, axis_map
    from octn4.n4 import apply_bias_field

    maps = tuple(axis_map(n, m - 3, shrink=s, mode="centred") for n, m, s in zip(full_shape, fit.coeffs.shape, shrink))
    field = BSplineField(fit.coeffs, 3, tuple(full_shape), maps)
    corrected = xp.empty(vol.shape, dtype=xp.float32)
    bias = xp.empty(vol.shape, dtype=xp.float32)
    for z0, z1, lb in field.tiles(tile_planes, like=vol):
        b = xp.exp(lb)
        bias[z0:z1] = b
        corrected[z0:z1] = apply_bias_field(vol[z0:z1], b)
    return corrected, bias


def pool_high_water(xp, fn):
    """Run ``fn``; the bytes CuPy's pool had to grow by (0 off CuPy)."""
    if xp.__name__ != "cupy":
        return fn(), 0
    pool = xp.get_default_memory_pool()
    sync(xp)
    pool.free_all_blocks()
    base = pool.total_bytes()
    out = fn()
    sync(xp)
    return out, int(pool.total_bytes() - base)


def small_case(xp, n, threads, rep):
    from engine_speed import phantom

    from octn4.bspline import shrink_grid
    from octn4.engine import fit_memory_bytes

    vol, mask = phantom(n)
    sub = np.ix_(*[o + 4 * np.arange(m) for o, m in (shrink_grid(k, 4) for k in vol.shape)])
    img, msk = np.ascontiguousarray(vol[sub]), np.ascontiguousarray(mask[sub])
    its = (50, 50, 50, 50)
    out = {"volume": list(vol.shape), "fit_grid": list(img.shape), "mask_fraction": float(msk.mean()),
           "schedule": "ITK defaults: 4 x 50 iterations, threshold 1e-3"}
    t_sitk, want, sitk_its, corrector = sitk_fit(img, msk, its, 1e-3, threads)
    t_np, fit_np = timed(np, lambda: engine_fit(np, img, msk, its, 1e-3))
    t_cold, _ = timed(xp, lambda: engine_fit(xp, img, msk, its, 1e-3))        # kernels compiled, plans made
    (t_dev, fit_dev), pool = pool_high_water(xp, lambda: timed(xp, lambda: engine_fit(xp, img, msk, its, 1e-3)))
    times = [t_dev] + [timed(xp, lambda: engine_fit(xp, img, msk, its, 1e-3))[0] for _ in range(rep - 1)]
    out["iterations"] = {"simpleitk": sitk_its, "numpy": fit_np.iterations, "device": fit_dev.iterations}
    out["fit_seconds"] = {"simpleitk": t_sitk, "numpy": t_np, "device_first_call": t_cold,
                          "device": float(np.median(times))}
    out["device_fit_pool_bytes"] = pool
    out["fit_memory_model_bytes"] = fit_memory_bytes(img.size, int(msk.sum()))
    # parity at one fixed schedule: SimpleITK's counts, threshold 0, the engines in parity mode (SimpleITK's
    # quirks reproduced; the Q1 scan then reads each iteration's residuals on the host)
    fixed = tuple(max(1, i) for i in sitk_its)
    _, want0, _, _ = sitk_fit(img, msk, fixed, 0.0, threads)
    f_np0 = engine_fit(np, img, msk, fixed, 0.0, parity=True)
    f_dev0 = engine_fit(xp, img, msk, fixed, 0.0, parity=True)
    f_dev1 = engine_fit(xp, img, msk, fixed, 0.0, parity=True)
    g_np0, g_dev0 = log_field(f_np0, img.shape), log_field(f_dev0, img.shape)
    out["parity"] = {"schedule": list(fixed), "device_vs_numpy": float(np.abs(g_dev0 - g_np0).max()),
                     "device_vs_simpleitk": float(np.abs(g_dev0 - want0).max()),
                     "numpy_vs_simpleitk": float(np.abs(g_np0 - want0).max()),
                     "device_runs_bit_identical": bool(np.array_equal(f_dev0.coeffs, f_dev1.coeffs))}
    # full-resolution apply of the 256^3 volume
    t_np_apply, _ = timed(np, lambda: apply_full(np, vol, fit_np, vol.shape, (4, 4, 4)))
    vol_dev = xp.asarray(vol)
    apply_full(xp, vol_dev, fit_dev, vol.shape, (4, 4, 4))
    t_dev_apply, _ = timed(xp, lambda: apply_full(xp, vol_dev, fit_dev, vol.shape, (4, 4, 4)))
    t_sitk_apply, _ = sitk_apply(corrector, vol)
    out["apply_seconds"] = {"simpleitk": t_sitk_apply, "numpy": t_np_apply, "device": t_dev_apply}
    return out


def big_case(xp, shape, its, threads, numpy_apply):
    from octn4.engine import fit_memory_bytes
    from octn4.shrink import shrink_volume

    out = {"volume": list(shape), "volume_gib": float(np.prod(shape) * 4 / 2 ** 30),
           "schedule": f"{len(its)} levels x {list(its)} iterations, threshold 0 (the same work for every engine)"}
    t_make, (vol, mask) = timed(xp, lambda: device_volume(xp, shape))
    out["build_seconds"] = t_make
    t_shrink, (img_d, msk_d) = timed(xp, lambda: shrink_volume(vol, mask, (4, 4, 4)))
    img, msk = (np.asarray(a.get() if hasattr(a, "get") else a) for a in (img_d, msk_d))
    out["fit_grid"] = list(img.shape)
    out["shrink_seconds_device"] = t_shrink
    engine_fit(xp, img_d[:8, :32, :32], msk_d[:8, :32, :32], its, 0.0)      # compile kernels on a small grid
    (t_dev, fit_dev), pool = pool_high_water(xp, lambda: timed(xp, lambda: engine_fit(xp, img_d, msk_d, its, 0.0)))
    t_dev_apply, _ = timed(xp, lambda: apply_full(xp, vol, fit_dev, shape, (4, 4, 4)))
    out["device_fit_pool_bytes"] = pool
    out["fit_memory_model_bytes"] = fit_memory_bytes(img.size, int(msk.sum()))
    t_np, fit_np = timed(np, lambda: engine_fit(np, img, msk, its, 0.0))
    t_sitk, want, _, _ = sitk_fit(img, msk, its, 0.0, threads)
    f_par = engine_fit(np, img, msk, its, 0.0, parity=True)
    g_np, g_dev = log_field(fit_np, img.shape), log_field(fit_dev, img.shape)
    out["fit_seconds"] = {"simpleitk": t_sitk, "numpy": t_np, "device": t_dev}
    out["apply_seconds"] = {"device": t_dev_apply}
    if numpy_apply:
        host = np.asarray(vol.get() if hasattr(vol, "get") else vol)
        out["apply_seconds"]["numpy"] = timed(np, lambda: apply_full(np, host, fit_np, shape, (4, 4, 4)))[0]
        del host
    out["parity"] = {"device_vs_numpy": float(np.abs(g_dev - g_np).max()),
                     "numpy_parity_mode_vs_simpleitk": float(np.abs(log_field(f_par, img.shape) - want).max())}
    out["simpleitk_fit_over_device_fit_and_apply"] = t_sitk / (t_dev + t_dev_apply)
    out["simpleitk_fit_over_numpy_fit"] = t_sitk / t_np
    return out


def environment(xp):
    import SimpleITK as sitk

    import octn4

    env = {"octn4": octn4.__version__, "numpy": np.__version__, "simpleitk": sitk.Version_VersionString(),
           "python": platform.python_version(), "cpu_count": os.cpu_count(), "xp": xp.__name__}
    if xp.__name__ == "cupy":
        props = xp.cuda.runtime.getDeviceProperties(0)
        env.update(cupy=xp.__version__, cuda_runtime=xp.cuda.runtime.runtimeGetVersion(),
                   driver=xp.cuda.runtime.driverGetVersion(), device=props["name"].decode(),
                   device_memory_bytes=int(props["totalGlobalMem"]))
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xp", choices=("cupy", "numpy"), default="cupy",
                   help="the device namespace (numpy: a smoke run of every step without a GPU)")
    p.add_argument("--small", type=int, default=256, help="edge of the cubic volume of the first case")
    p.add_argument("--big", default="512,1024,1024", help="Z,Y,X of the stack built on the device")
    p.add_argument("--big-iterations", default="5,5,5,5")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="SimpleITK's and NumPy's threads")
    p.add_argument("--repeat", type=int, default=3, help="device fits timed on the small case (median)")
    p.add_argument("--no-numpy-big-apply", action="store_true", help="skip the NumPy full-resolution apply")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.xp == "cupy":
        try:
            xp = importlib.import_module("cupy")
            if xp.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device")
        except Exception as exc:                     # no CuPy, or no device: nothing to measure here
            print(f"gpu_check: no usable CuPy with a CUDA device here ({type(exc).__name__}: {exc}); "
                  "nothing measured")
            return 0
    else:
        xp = np
    result = {"environment": environment(xp)}
    print(json.dumps(result["environment"]), flush=True)
    result["small"] = small_case(xp, a.small, a.threads, a.repeat)
    print(json.dumps(result["small"], indent=1), flush=True)
    shape = tuple(int(v) for v in a.big.split(","))
    its = tuple(int(v) for v in a.big_iterations.split(","))
    result["big"] = big_case(xp, shape, its, a.threads, not a.no_numpy_big_apply)
    print(json.dumps(result["big"], indent=1), flush=True)
    small, big = result["small"], result["big"]
    result["criteria"] = {
        "device_vs_numpy_log_field_at_most_1e-5": max(small["parity"]["device_vs_numpy"],
                                                      big["parity"]["device_vs_numpy"]) <= 1e-5,
        "two_device_runs_bit_identical": small["parity"]["device_runs_bit_identical"],
        "big_fit_and_apply_100x_simpleitk_fit": big["simpleitk_fit_over_device_fit_and_apply"] >= 100,
    }
    print(json.dumps(result["criteria"]))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
