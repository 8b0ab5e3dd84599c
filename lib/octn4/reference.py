"""The reference API: the plain recipe (SimpleITK's N4 at ITK's settings), as functions of arrays in memory.

:func:`compute_tissue_mask`, :func:`n4_correct` and
:func:`n4_correct_per_section` are what the benchmarks and users compare
octn4's defaults with: SimpleITK's N4 on the whole volume or on each
section alone, the full-resolution bias being the fitted B-spline
evaluated on the full grid (never a shrunk field resampled).
"""

from __future__ import annotations

import numpy as np

from .mask import MaskParams, tissue_mask
from .n4 import correct
from .params import N4Params
from .sections import section_bounds

__all__ = ["compute_tissue_mask", "n4_correct", "n4_correct_per_section"]


def _reference_params(shrink_factor, n_iterations, spline_distance_mm) -> N4Params:
    return N4Params(maximum_number_of_iterations=tuple(n_iterations), shrink_factor=shrink_factor,
                    spline_distance_mm=spline_distance_mm)


def compute_tissue_mask(vol, smoothing_sigma=2.0, n_serial_slices=1, closing_radius=3,
                        z_closing_planes=2, smoothing_sigma_z=1.0):
    """Reference tissue mask (see :mod:`octn4.mask`); ``z_closing_planes`` counts Z planes."""
    bounds = section_bounds(np.shape(vol)[0], n_sections=n_serial_slices)
    params = MaskParams(smoothing_sigma=smoothing_sigma, smoothing_sigma_z=smoothing_sigma_z,
                        closing_radius=closing_radius, z_closing_planes=z_closing_planes)
    return tissue_mask(vol, bounds, params=params)


def n4_correct(vol, mask=None, shrink_factor=4, n_iterations=(50, 50, 50, 50), spline_distance_mm=10.0,
               voxel_size_mm=(1.0, 1.0, 1.0), *, threads: int = 1):
    """Reference N4 with SimpleITK: returns ``(corrected, bias)``, float32, full size.

    The full-resolution bias is the fitted B-spline evaluated on the full
    grid (not the shrunk field resampled).
    """
    corrected, bias, _ = correct(vol, mask, voxel_size=voxel_size_mm, threads=threads, engine="sitk",
                                 params=_reference_params(shrink_factor, n_iterations, spline_distance_mm))
    return corrected, bias


def _section_job(args):
    vol, mask, params, voxel_size, threads = args
    corrected, bias, _ = correct(vol, mask, voxel_size=voxel_size, params=params, threads=threads, engine="sitk")
    return corrected, bias


def n4_correct_per_section(vol, n_serial_slices, mask=None, n_processes=1, shrink_factor=4,
                           n_iterations=(50, 50, 50, 50), spline_distance_mm=10.0,
                           voxel_size_mm=(1.0, 1.0, 1.0)):
    """Reference per-section N4: each section corrected on its own, concatenated along Z."""
    vol = np.asarray(vol, dtype=np.float32)
    bounds = section_bounds(vol.shape[0], n_sections=n_serial_slices)
    params = _reference_params(shrink_factor, n_iterations, spline_distance_mm)
    jobs = [(vol[a:b], None if mask is None else np.asarray(mask)[a:b], params, voxel_size_mm, 1)
            for a, b in bounds]
    if n_processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_processes) as pool:
            results = list(pool.map(_section_job, jobs))
    else:
        results = [_section_job(j) for j in jobs]
    return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))
