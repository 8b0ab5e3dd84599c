"""N4 bias-field correction: the fit of either engine on a shrunk copy, and correction in memory.

N4 (Tustison et al. 2010, IEEE TMI 29(6); after Sled et al. 1998) models
``v = u * b`` with a smooth multiplicative field ``b`` and estimates
``log b`` by alternating histogram sharpening and B-spline fitting.  The
numerical reference is ITK's ``N4BiasFieldCorrectionImageFilter``, described
in ``docs/N4_ALGORITHM.md`` of the octn4 design notes.

This module is the front door of a fit: :func:`fit_bias` and
:func:`fit_bias_batch` take a shrunk copy (on ITK's centred sampling grid,
:func:`octn4.bspline.shrink_grid`; the sampled voxels or tissue block
means, :mod:`octn4.shrink`), divide the depth line out where asked
(:mod:`octn4.depth`), and fit with octn4's engine (:mod:`octn4.engine`, CPU
or CUDA) or SimpleITK (:mod:`octn4.sitk_backend`); :func:`correct` runs
shrink, fit and apply on a volume held in memory.  Parameters and schedule
rules live in :mod:`octn4.params`, the result type in
:mod:`octn4.fit_result`, the reference recipe in :mod:`octn4.reference`.
The result is a :class:`~octn4.bspline.BSplineField` evaluated at full
resolution tile by tile: the full-resolution field comes from the fitted
B-spline itself, never from resampling a shrunk field, and never needs the
whole volume in memory.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ._backend import DEVICES, array_namespace, cuda_namespace, from_numpy, is_cupy_array, to_numpy
from .bspline import BSplineField, axis_map
from .depth import add_depth_line, flatten_depth, z_centre
from .errors import InputError
from .fit_result import FitResult, too_little_tissue, zero_field
from .params import N4Params, control_points, final_control_points, fit_schedule, shrink_factors
from .shrink import shrink_volume
from .sitk_backend import fit_bias_sitk

log = logging.getLogger("octn4")

__all__ = [
    "BIAS_FLOOR",
    "ENGINES",
    "N4Params",
    "FitResult",
    "fit_bias",
    "fit_bias_sitk",
    "fit_bias_batch",
    "resolve_device",
    "choose_device",
    "correct",
    "apply_bias_field",
]

#: Smallest bias value divided by (as in the reference ``vol / max(bias, 1e-6)``).
BIAS_FLOOR = 1e-6


ENGINES = ("sitk", "octn4")


def resolve_device(device: str, engine: str) -> str:
    """The device a fit runs on: 'cpu' or 'cuda' (:func:`choose_device` without the reason)."""
    return choose_device(device, engine)[0]


def choose_device(device: str, engine: str) -> tuple[str, str | None]:
    """The device a fit runs on, 'cpu' or 'cuda', and why, when it was chosen automatically.

    'cuda' is an error (naming what is missing) unless the octn4 engine has
    CuPy and a CUDA device; 'auto' becomes 'cuda' when it would work and
    'cpu' otherwise (for schedulers that may or may not grant a GPU).  An
    automatic choice is logged as a warning and returned as its reason (None
    for a device asked for by name), for the outputs to record.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}; got {engine!r}")
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "auto":
        if engine != "octn4":
            why = f"device auto: fitting on the CPU (the {engine} engine runs on the CPU only)"
        else:
            try:
                cuda_namespace()
            except InputError as exc:
                why = f"device auto: fitting on the CPU ({exc.problem})"
            else:
                why = "device auto: fitting on the GPU (CuPy found a CUDA device)"
                log.warning("%s", why)
                return "cuda", why
        log.warning("%s", why)
        return "cpu", why
    if engine == "sitk" and device != "cpu":
        raise InputError(f"the SimpleITK engine runs on the CPU only; device {device!r} needs --engine octn4")
    if device == "cuda":
        cuda_namespace()
    return device, None


def fit_bias(shrunk, shrunk_mask, *, full_shape, shrink, voxel_size, params: N4Params, threads: int = 1,
             engine: str = "octn4", device: str = "cpu") -> FitResult:
    """Fit N4 on a shrunk image with the chosen engine ('octn4' or 'sitk') and device; same result type."""
    if engine != "octn4":
        resolve_device(device, engine)          # an unknown engine, or a GPU asked of SimpleITK, is an error
        shrunk = np.asarray(shrunk, np.float32)
        include = np.asarray(shrunk_mask, bool) & (shrunk > 0)
        flat, slope = flatten_depth(shrunk, include, shrink, full_shape, params)
        fit = fit_bias_sitk(flat, shrunk_mask, full_shape=full_shape, shrink=shrink, voxel_size=voxel_size,
                            params=params, threads=threads)
        return add_depth_line(fit, slope, z_centre(full_shape, shrink), voxel_size[0])
    return fit_bias_batch([shrunk], [shrunk_mask], full_shape=full_shape, shrink=shrink, voxel_size=voxel_size,
                          params=params, device=device)[0]


def fit_bias_batch(shrunk, shrunk_masks, *, full_shape, shrink, voxel_size, params: N4Params,
                   device: str = "cpu") -> list[FitResult]:
    """Fit N4 with octn4's engine on several equal-shaped shrunk images at once (one batched loop).

    All members share ``full_shape``, ``shrink`` and ``params`` (the
    sections of one stack with equal plane counts).  Members with too
    little tissue get the flagged zero field, as in :func:`fit_bias_sitk`.
    On ``device='cuda'`` the fit grids are copied to the GPU (CuPy) and only
    the lattices come back.
    """
    from .engine import fit_lattice_batch

    device = resolve_device(device, "octn4")
    xp = cuda_namespace() if device == "cuda" else None
    t0 = time.perf_counter()
    m0 = control_points(full_shape, voxel_size, params)
    images = [np.asarray(a, np.float32) for a in shrunk]
    if images:
        params = fit_schedule(m0, images[0].shape, params)
    m_final = final_control_points(m0, params)
    include = [np.asarray(k, bool) & (a > 0) for a, k in zip(images, shrunk_masks)]
    flattened = [flatten_depth(a, inc, shrink, full_shape, params) for a, inc in zip(images, include)]
    images = [f[0] for f in flattened]
    if len({a.shape for a in images}) > 1:
        raise ValueError(f"a batch needs equal shapes; got {sorted({a.shape for a in images})}")
    common = dict(shrink=tuple(shrink), control_points=m0, engine="octn4", device=device)
    out: list[FitResult | None] = [None] * len(images)
    todo = []
    for j, (a, inc) in enumerate(zip(images, include)):
        n_in = int(inc.sum())
        if too_little_tissue(n_in, m0):
            out[j] = FitResult(zero_field(full_shape, shrink, m_final, params), fit_shape=a.shape,
                               fit_voxels=n_in, status="no tissue", converged=False, **common)
        else:
            todo.append(j)
    if todo:
        batch_img, batch_mask = np.stack([images[j] for j in todo]), np.stack([include[j] for j in todo])
        if xp is not None:
            batch_img, batch_mask = xp.asarray(batch_img), xp.asarray(batch_mask)
        fits = fit_lattice_batch(batch_img, batch_mask, m0=m0, levels_iterations=params.maximum_number_of_iterations,
                                 threshold=params.convergence_threshold, order=params.spline_order,
                                 bins=params.number_of_histogram_bins,
                                 fwhm=params.bias_field_full_width_at_half_maximum, noise=params.wiener_filter_noise,
                                 parity=params.parity)
        seconds = (time.perf_counter() - t0) / len(todo)
        maps = tuple(axis_map(n, m - params.spline_order, shrink=s, mode=params.evaluation)
                     for n, m, s in zip(full_shape, m_final, shrink))
        for j, fit in zip(todo, fits):
            converged = all(c <= params.convergence_threshold or i < cap for i, c, cap in
                            zip(fit.iterations, fit.convergence, params.maximum_number_of_iterations))
            out[j] = FitResult(BSplineField(fit.coeffs, params.spline_order, tuple(full_shape), maps),
                               fit_shape=images[j].shape, fit_voxels=int(include[j].sum()),
                               iterations=fit.iterations, convergence=fit.convergence, converged=converged,
                               seconds=seconds, batch_size=len(todo), **common)
    centre = z_centre(full_shape, shrink)
    return [add_depth_line(f, slope, centre, voxel_size[0]) for f, (_, slope) in zip(out, flattened)]


def correct(volume, mask=None, *, voxel_size=(1.0, 1.0, 1.0), params: N4Params = N4Params(),
            threads: int = 1, tile_planes: int = 32, engine: str = "octn4", device: str | None = None):
    """N4-correct a volume held in memory, on the volume's own device.

    Parameters
    ----------
    volume : (Z, Y, X) array, positive intensities in tissue
        NumPy, or a device array (CuPy, any array API library): then the
        shrink and the tile-by-tile apply run on that device and the
        results are arrays of its namespace.
    mask : (Z, Y, X) bool array, optional
        Voxels to fit; all voxels when omitted.
    voxel_size : (z, y, x) floats, mm
    params : N4Params
    engine : 'octn4' (octn4's engine, the default) or 'sitk' (SimpleITK, the reference)
    device : where the fit runs: 'cpu', 'cuda' or 'auto'; by default 'cuda'
        for a CuPy volume and 'cpu' otherwise.  Only the fit grid travels
        between host and device, never the volume.

    Returns
    -------
    corrected : (Z, Y, X) float32 array, ``volume / bias``
    bias : (Z, Y, X) float32 array, ``exp(log field)``
    fit : FitResult
    """
    host = isinstance(volume, (np.ndarray, list, tuple)) or np.isscalar(volume)
    xp = np if host else array_namespace(volume)
    vol = np.asarray(volume, dtype=np.float32) if host else xp.astype(volume, xp.float32)
    if device is None:
        device = "cuda" if is_cupy_array(vol) else "cpu"
    if vol.ndim != 3:
        raise InputError(f"volume must be 3-D (Z, Y, X); got shape {tuple(vol.shape)}")
    if mask is None:
        msk = xp.ones(vol.shape, dtype=xp.bool)
    else:
        on_host = isinstance(mask, (np.ndarray, list, tuple))
        msk = np.asarray(mask, bool) if host else \
            (from_numpy(np.asarray(mask, bool), like=vol) if on_host else xp.astype(mask, xp.bool))
    if tuple(msk.shape) != tuple(vol.shape):
        raise InputError(f"mask shape {tuple(msk.shape)} does not match volume shape {tuple(vol.shape)}")
    s = shrink_factors(vol.shape, voxel_size, params)
    sub, sub_mask = shrink_volume(vol, msk, s, params.shrink_mode)
    fit = fit_bias(to_numpy(sub), to_numpy(sub_mask), full_shape=tuple(vol.shape), shrink=s, voxel_size=voxel_size,
                   params=params, threads=threads, engine=engine, device=device)
    corrected = xp.empty(vol.shape, dtype=xp.float32)
    bias = xp.empty(vol.shape, dtype=xp.float32)
    for z0, z1, log_b in fit.field.tiles(tile_planes, like=None if host else vol):
        b = xp.exp(log_b)
        bias[z0:z1, ...] = b
        corrected[z0:z1, ...] = apply_bias_field(vol[z0:z1, ...], b)
    return corrected, bias, fit


def apply_bias_field(volume, bias, out=None, *, floor: float = BIAS_FLOOR):
    """``volume / max(bias, floor)`` on the arrays' device (``out`` may alias ``volume``)."""
    xp = array_namespace(volume, bias)
    denom = xp.maximum(bias, xp.asarray(floor, dtype=bias.dtype))
    if out is None:
        return xp.astype(volume / denom, xp.float32)
    out[...] = volume / denom
    return out


# --------------------------------------------------------------------------- reference API
