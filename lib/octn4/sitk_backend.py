"""N4 with SimpleITK, the reference backend, and the recovery of its control lattice.

The fit runs on an already shrunk copy (on ITK's centred sampling grid,
:func:`octn4.bspline.shrink_grid`); the final control lattice is then
recovered from SimpleITK by evaluating its log field on a tiny
``(2m+1)^3`` grid and solving the per-axis collocation systems (exact to
~1e-7), and checked against SimpleITK's own field on the fit grid.  The
result is a :class:`~octn4.bspline.BSplineField` that is evaluated at full
resolution tile by tile, like every octn4 field.  SimpleITK is imported
only when a fit runs.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .bspline import BSplineField, axis_map, basis_matrix
from .fit_result import FitResult, too_little_tissue, zero_field
from .params import N4Params, control_points, final_control_points, fit_schedule

__all__ = ["fit_bias_sitk"]


def fit_bias_sitk(shrunk, shrunk_mask, *, full_shape, shrink, voxel_size, params: N4Params,
                  threads: int = 1) -> FitResult:
    """Fit N4 with SimpleITK on an already shrunk image.

    Parameters
    ----------
    shrunk : (Mz, My, Mx) float32 ndarray
        The volume sampled at ``o + s*j`` on every axis (:func:`shrink_grid`).
    shrunk_mask : (Mz, My, Mx) bool ndarray
        Voxels to fit; non-positive intensities are excluded (N4 takes logs).
    full_shape, shrink, voxel_size
        The full-resolution grid the field will be evaluated on.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    m0 = control_points(full_shape, voxel_size, params)
    params = fit_schedule(m0, np.shape(shrunk), params)
    include = np.asarray(shrunk_mask, bool) & (shrunk > 0)
    n_in = int(include.sum())
    result = dict(shrink=tuple(shrink), fit_shape=tuple(shrunk.shape), control_points=m0, fit_voxels=n_in)
    if too_little_tissue(n_in, m0):
        return FitResult(zero_field(full_shape, shrink, final_control_points(m0, params), params),
                         status="no tissue", converged=False, **result)
    spacing = [v * s for v, s in zip(voxel_size, shrink)][::-1]
    img = sitk.GetImageFromArray(np.ascontiguousarray(shrunk, dtype=np.float32))
    img.SetSpacing(spacing)
    msk = sitk.GetImageFromArray(include.astype(np.uint8))
    msk.CopyInformation(img)

    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(params.maximum_number_of_iterations))
    f.SetConvergenceThreshold(params.convergence_threshold)
    f.SetSplineOrder(params.spline_order)
    f.SetNumberOfControlPoints([int(v) for v in m0[::-1]])
    f.SetNumberOfHistogramBins(params.number_of_histogram_bins)
    f.SetBiasFieldFullWidthAtHalfMaximum(params.bias_field_full_width_at_half_maximum)
    f.SetWienerFilterNoise(params.wiener_filter_noise)
    f.SetNumberOfThreads(int(threads))
    trace: dict[int, tuple[int, float]] = {}
    f.AddCommand(sitk.sitkIterationEvent, lambda: trace.__setitem__(
        f.GetCurrentLevel(), (f.GetElapsedIterations(), f.GetCurrentConvergenceMeasurement())))
    f.Execute(img, msk)

    m_final = final_control_points(m0, params)
    coeffs = _recover_lattice(f, m_final, params.spline_order)
    maps = tuple(axis_map(n, m - params.spline_order, shrink=s, mode=params.evaluation)
                 for n, m, s in zip(full_shape, m_final, shrink))
    fld = BSplineField(coeffs, params.spline_order, tuple(full_shape), maps)
    _check_recovery(f, fld, shrunk.shape, params.spline_order)
    iters = [trace.get(level, (0, math.nan))[0] for level in range(params.levels)]
    conv = [float(trace.get(level, (0, math.nan))[1]) for level in range(params.levels)]
    converged = all(c <= params.convergence_threshold or i < cap
                    for i, c, cap in zip(iters, conv, params.maximum_number_of_iterations))
    return FitResult(fld, iterations=iters, convergence=conv, converged=converged,
                     seconds=time.perf_counter() - t0, **result)


def _stretched_basis(n: int, m: int, order: int) -> np.ndarray:
    """Basis of SimpleITK's evaluation on an ``n``-voxel reference axis (t = S*i/(n-1))."""
    spans = m - order
    return basis_matrix(spans * np.arange(n) / (n - 1.0), m, order, 1e-3 * spans / (n - 1.0))


def _recover_lattice(corrector, m_final, order) -> np.ndarray:
    """SimpleITK's final control lattice, from its log field on a ``(2m+1)^3`` grid."""
    import SimpleITK as sitk

    n = [2 * m + 1 for m in m_final]
    ref = sitk.Image([n[2], n[1], n[0]], sitk.sitkFloat32)
    f = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(ref)).astype(np.float64)
    for axis, (nn, m) in enumerate(zip(n, m_final)):
        pinv = np.linalg.pinv(_stretched_basis(nn, m, order))
        f = np.moveaxis(np.tensordot(pinv, f, axes=([1], [axis])), 0, axis)
    return f


def _check_recovery(corrector, fld: BSplineField, shrunk_shape, order) -> None:
    """The recovered lattice must reproduce SimpleITK's field on the fit grid."""
    import SimpleITK as sitk

    ref = sitk.Image([int(v) for v in shrunk_shape[::-1]], sitk.sitkFloat32)
    want = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(ref))
    b = [_stretched_basis(n, fld.coeffs.shape[d], order) for d, n in enumerate(shrunk_shape)]
    got = np.einsum("za,yb,xc,abc->zyx", b[0], b[1], b[2], fld.coeffs)
    err = float(np.abs(got - want).max())
    if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
        raise RuntimeError(f"internal error: recovered N4 lattice differs from SimpleITK by {err:.3g}")
