"""The depth profile of every section: one stack-wide curve plus per-section deviations shrunk towards it.

Serial OCT images each slab from its cut surface down, so every section
carries a depth profile: attenuation (a straight line in log for
Beer-Lambert decay), the confocal gate around a focus inside the slab (a
Lorentzian in depth), and whatever the optics add.  N4 alone recovers a
strongly curved profile only in part, and section gains, which match
neighbouring sections where they touch (at their ends), then chain any error
at the ends into a ramp across the stack.  So octn4 models the profile
directly, before N4, from the per-plane median log tissue intensity ``y``
that the mask stage records for every plane:

    y(z) = c_s + C(d) + D_s(d) + e,        d = depth of plane z below the cut of its section s (mm)

``C`` is one smooth curve for the whole stack (a cubic B-spline in ``d``),
``D_s`` a per-section deviation in the same basis, and ``c_s`` a constant per
section (the gain, left to the gains stage).  Plane ``z`` weighs
``w = min(1, n_z / n_typ)`` (its tissue pixels over the stack's median
plane), and each deviation coefficient has a ridge prior of weight
``prior`` (in full planes), so a section with little tissue (a cap, a
damaged slab) is not fitted alone from a few hundred voxels: it follows the
stack's curve, and its own data move it only as far as they are worth.
Planes are Huber-weighted, so a few odd ones (a fold, a bubble) do not bend
the curve.  Anatomy varies along the stack, not with depth below each cut,
so it averages out of ``C``.

The result, per plane, is ``C(d) + D_s(d)`` with its tissue-weighted mean
over the section removed (the section's level stays the gains' business);
the section fit divides it out before N4 and stores it with the fitted
field (:attr:`octn4.bspline.BSplineField.z_profile`).  Everything here is
1-D and costs microseconds per plane.

The simpler model, the **depth line** (``N4Params.depth_line``), lives here
too: a robust straight line through a fit grid's per-plane median log
intensity (:func:`depth_line`), divided out of the fit grid before N4
(:func:`flatten_depth`) and added back to the fitted field
(:func:`add_depth_line`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .bspline import basis_matrix, shrink_grid
from .mask import depth_trend

if TYPE_CHECKING:
    from .fit_result import FitResult
    from .params import N4Params

__all__ = ["DEPTH_MODELS", "DEPTH_PRIOR", "plane_log_medians", "fit_depth_profiles", "depth_spans",
           "depth_line", "flatten_depth", "add_depth_line", "z_centre"]

#: 'curve': the stack-wide curve with per-section deviations (octn4's default); 'none': no depth model
#: (N4's own depth line, ``N4Params.depth_line``, or nothing).
DEPTH_MODELS = ("curve", "none")

#: Ridge weight of each deviation coefficient, in full-plane weights: a plane median is good to about
#: 0.03 log (anatomy and speckle), and sections differ from the stack curve by up to about 0.3 log, so
#: (0.03 / 0.3)^2.
DEPTH_PRIOR = 0.01

#: A plane with fewer tissue pixels does not count.
DEPTH_MIN_PIXELS = 50


def plane_log_medians(planes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane median log intensity over the tissue (NaN where none) and tissue pixel counts."""
    med = np.full(planes.shape[0], np.nan)
    count = np.zeros(planes.shape[0], np.int64)
    for k in range(planes.shape[0]):
        v = planes[k][mask[k] & (planes[k] > 0)]
        count[k] = v.size
        if v.size:
            med[k] = float(np.median(np.log(v)))
    return med, count


def depth_spans(bounds, spans: int = 0) -> int:
    """B-spline spans of the depth model over the thickest section: as given, else one per 4 planes of the
    thinnest section, 1 to 6."""
    if spans:
        return int(spans)
    return int(np.clip(min(b - a for a, b in bounds) // 4, 1, 6))


def _huber(r, w, c: float = 2.5) -> np.ndarray:
    ok = w > 0
    if ok.sum() < 3:
        return np.ones_like(r)
    sigma = 1.4826 * float(np.median(np.abs(r[ok])))
    if sigma <= 0:
        return np.ones_like(r)
    return np.minimum(1.0, c * sigma / np.maximum(np.abs(r), 1e-300))


def fit_depth_profiles(log_median, tissue_pixels, bounds, *, spans: int = 0, prior: float = DEPTH_PRIOR,
                       min_pixels: int = DEPTH_MIN_PIXELS, iterations: int = 30) -> dict:
    """Fit the depth model to the per-plane statistics of a whole stack.

    ``log_median``, ``tissue_pixels``: one value per plane (NaN / 0 where a
    plane has no tissue); ``bounds``: the sections' Z ranges.  Returns ``{"profile": per-plane log profile (zero-mean
    over each section's tissue), "stack_curve": C at each plane,
    "spans": ..., "weights": ...}``; a section with no usable plane gets the
    stack curve, and a stack with fewer than 3 usable planes gets zeros.
    """
    y = np.asarray(log_median, np.float64)
    n = np.asarray(tissue_pixels, np.float64)
    depth = y.shape[0]
    usable = np.isfinite(y) & (n >= min_pixels)
    n_typ = float(np.median(n[usable])) if usable.any() else 1.0
    w0 = np.where(usable, np.minimum(1.0, n / max(n_typ, 1.0)), 0.0)
    y = np.where(usable, y, 0.0)
    spans = depth_spans(bounds, spans)
    order = 3
    k = spans + order
    thick = max(b - a for a, b in bounds)
    sec = np.empty(depth, np.int64)
    d = np.empty(depth)
    for i, (a, b) in enumerate(bounds):
        sec[a:b] = i
        d[a:b] = np.arange(b - a) + 0.5
    basis = basis_matrix(d / thick * spans, k, order)          # (planes, k): depth in units of the thickest section
    n_sec = len(bounds)
    if usable.sum() < 3:
        zero = np.zeros(depth)
        return {"profile": zero, "stack_curve": zero, "spans": spans, "weights": w0}
    c = np.array([np.average(y[a:b], weights=w0[a:b]) if w0[a:b].sum() else 0.0 for a, b in bounds])
    curve = np.zeros(k)
    dev = np.zeros((n_sec, k))
    robust = np.ones(depth)
    # C's own ridge is tiny (its constant is the sections' constants' business); a second-difference
    # penalty keeps it smooth where few sections reach (the thickest sections' last planes).
    diff2 = np.diff(np.eye(k), 2, axis=0)
    for it in range(iterations):
        w = w0 * robust
        # stack curve, all sections pooled
        r = y - c[sec] - np.einsum("pk,pk->p", basis, dev[sec])
        a = basis * w[:, None]
        lhs = basis.T @ a + 1e-3 * diff2.T @ diff2 + 1e-6 * np.eye(k)
        curve = np.linalg.solve(lhs, a.T @ r)
        # per-section deviations, shrunk towards the stack curve, and the section constants
        for i, (z0, z1) in enumerate(bounds):
            bi, wi = basis[z0:z1], w[z0:z1]
            if wi.sum() <= 0:
                dev[i] = 0.0
                c[i] = 0.0
                continue
            ri = y[z0:z1] - bi @ curve
            # constant and deviation jointly: [1, B] with the ridge on B only
            design = np.hstack([np.ones((z1 - z0, 1)), bi])
            reg = np.diag(np.r_[0.0, np.full(k, prior)])
            lhs_i = design.T @ (design * wi[:, None]) + reg + 1e-9 * np.eye(k + 1)
            sol = np.linalg.solve(lhs_i, design.T @ (wi * ri))
            c[i], dev[i] = sol[0], sol[1:]
        fit = c[sec] + basis @ curve + np.einsum("pk,pk->p", basis, dev[sec])
        new = _huber(np.where(w0 > 0, y - fit, 0.0), w0)
        if it > 3 and np.allclose(new, robust, atol=1e-6):
            break
        robust = new
    stack_curve = basis @ curve
    profile = stack_curve + np.einsum("pk,pk->p", basis, dev[sec])
    for a, b in bounds:
        wt = n[a:b] if n[a:b].sum() > 0 else np.ones(b - a)
        profile[a:b] -= np.average(profile[a:b], weights=wt)
    return {"profile": profile, "stack_curve": stack_curve, "spans": spans, "weights": w0,
            "section_deviation_rms": [float(np.sqrt(np.mean((basis[a:b] @ dev[i]) ** 2)))
                                      for i, (a, b) in enumerate(bounds)]}


# --------------------------------------------------------------------------- the depth line


DEPTH_LINE_MIN_VOXELS = 50


def depth_line(shrunk, include, z_full) -> float | None:
    """Slope (log per full-resolution plane) of the depth line of a fit grid, or None.

    ``z_full``: the full-resolution plane of each fit plane.  The line is a
    Huber-weighted fit through each plane's median log intensity over its
    fit voxels (planes with at least ``DEPTH_LINE_MIN_VOXELS``); fewer than 3
    such planes give no line.
    """
    med, zs = [], []
    for j in range(shrunk.shape[0]):
        v = shrunk[j][include[j]]
        if v.size >= DEPTH_LINE_MIN_VOXELS:
            med.append(float(np.median(np.log(v))))
            zs.append(float(z_full[j]))
    if len(zs) < 3:
        return None
    return depth_trend(zs, med)[0]


def flatten_depth(shrunk, include, shrink, full_shape, params: N4Params):
    """``(shrunk / exp(line), slope)`` when ``params.depth_line`` finds a line, else ``(shrunk, None)``."""
    if not params.depth_line:
        return shrunk, None
    oz, mz = shrink_grid(full_shape[0], shrink[0])
    z_full = oz + shrink[0] * np.arange(mz)
    slope = depth_line(shrunk, include, z_full)
    if slope is None:
        return shrunk, None
    line = slope * (z_full - z_centre(full_shape, shrink))
    return (shrunk / np.exp(line)[:, None, None]).astype(np.float32), slope


def add_depth_line(fit: FitResult, slope, centre: float, voxel_dz: float) -> FitResult:
    """``fit`` with the depth line of ``slope`` (zero at plane ``centre``) added back to its field."""
    if slope is not None and fit.status == "fitted":
        fit.field = fit.field.plus_depth_line(slope, -slope * centre)
        fit.depth_slope_per_mm = float(slope / voxel_dz)
    return fit


def z_centre(full_shape, shrink) -> float:
    """Mean full-resolution plane of the fit planes (where the depth line is zero)."""
    oz, mz = shrink_grid(full_shape[0], shrink[0])
    return oz + shrink[0] * (mz - 1) / 2
