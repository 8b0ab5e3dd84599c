"""Fit grids: how a volume is shrunk before N4 fits its field.

Both modes sample the same grid: fit voxel ``j`` of an axis of ``n`` voxels
shrunk by ``s`` sits at full-resolution index ``o + s*j`` (ITK's centred
``ShrinkImageFilter``, :func:`octn4.bspline.shrink_grid`), so the fitted
field's geometry does not depend on the mode.  They differ in what a fit
voxel holds:

``subsample``
    the single voxel at ``o + s*j`` (ITK, the reference recipe); the fit
    mask is the tissue mask there.
``mean``
    the mean of the **tissue** voxels of the block of ``s`` voxels per axis
    around it (indices ``o + s*j - (s-1)//2`` ... ``+ s - 1``, clipped to the
    volume), so speckle is averaged over up to ``s^3`` voxels instead of
    kept whole; a fit voxel is in the fit mask when at least half of its
    block is tissue.  Agarose never enters a tissue mean.

Why ``mean`` is octn4's default, and the evidence, are in
``docs/QUALITY.md``.
"""

from __future__ import annotations

import numpy as np

from .bspline import shrink_grid
from .errors import InputError

__all__ = ["SHRINK_MODES", "block_indices", "block_mean_plane", "shrink_volume"]

SHRINK_MODES = ("subsample", "mean")

#: A fit voxel of the 'mean' mode is fitted when at least this fraction of its block is tissue.
MIN_TISSUE_FRACTION = 0.5


def block_indices(n: int, s: int) -> np.ndarray:
    """``(M, s)`` full-resolution indices of the blocks of an axis of ``n`` voxels shrunk by ``s`` (clipped)."""
    o, m = shrink_grid(n, s)
    start = o + s * np.arange(m) - (s - 1) // 2
    return np.clip(start[:, None] + np.arange(s)[None, :], 0, n - 1)


def block_mean_plane(planes, tissue, shrink_yx, shape_yx):
    """Tissue mean over the Y/X blocks of a stack of planes (one Z block).

    ``planes``, ``tissue`` : (k, Y, X) intensities and tissue mask of the
    block's ``k`` planes.  Returns ``(mean, fitted)``, each ``(My, Mx)``:
    the tissue mean of each block and whether enough of it is tissue.
    """
    iy, ix = (block_indices(n, s) for n, s in zip(shape_yx, shrink_yx))
    use = np.asarray(tissue, bool) & (planes > 0)
    # sums are separable: over the block's planes, then its rows, then its columns
    vs = np.where(use, planes, 0).sum(axis=0, dtype=np.float64)[iy].sum(axis=1)[:, ix].sum(axis=2)
    ns = use.sum(axis=0, dtype=np.int64)[iy].sum(axis=1)[:, ix].sum(axis=2)
    size = planes.shape[0] * iy.shape[1] * ix.shape[1]
    mean = np.where(ns > 0, vs / np.maximum(ns, 1), 0.0).astype(np.float32)
    return mean, ns >= MIN_TISSUE_FRACTION * size


def shrink_volume(volume, mask, shrink, mode: str = "subsample"):
    """The fit grid of an in-memory volume: ``(image, mask)`` of shape ``(Mz, My, Mx)``."""
    if mode not in SHRINK_MODES:
        raise InputError(f"shrink mode must be one of {SHRINK_MODES}; got {mode!r}")
    vol = np.asarray(volume, np.float32)
    msk = np.asarray(mask, bool)
    if mode == "subsample":
        idx = [o + s * np.arange(m) for (o, m), s in ((shrink_grid(n, s), s) for n, s in zip(vol.shape, shrink))]
        sub = np.ix_(*idx)
        return vol[sub], msk[sub]
    zb = block_indices(vol.shape[0], shrink[0])
    out = [block_mean_plane(vol[z], msk[z], shrink[1:], vol.shape[1:]) for z in zb]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
