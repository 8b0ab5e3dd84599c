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

import math

import numpy as np

from ._backend import array_namespace, from_numpy
from .bspline import shrink_grid
from .errors import InputError
from .io import ForwardReader, Volume

__all__ = ["SHRINK_MODES", "block_indices", "block_tissue_sums", "block_mean_from_sums", "block_mean_plane",
           "shrink_volume"]

SHRINK_MODES = ("subsample", "mean")

#: A fit voxel of the 'mean' mode is fitted when at least this fraction of its block is tissue.
MIN_TISSUE_FRACTION = 0.5


def block_indices(n: int, s: int) -> np.ndarray:
    """``(M, s)`` full-resolution indices of the blocks of an axis of ``n`` voxels shrunk by ``s`` (clipped)."""
    o, m = shrink_grid(n, s)
    start = o + s * np.arange(m) - (s - 1) // 2
    return np.clip(start[:, None] + np.arange(s)[None, :], 0, n - 1)


def block_tissue_sums(planes, tissue, shrink_yx, shape_yx):
    """Tissue sums and counts over the Y/X blocks of a stack of planes, on the planes' device.

    ``planes``, ``tissue`` : (k, Y, X) intensities and tissue mask.  Returns
    ``(sums, counts)``, each ``(My, Mx)``: float64 sums of the positive tissue
    voxels (per pixel over the planes in order, then over each block's rows,
    then its columns) and their integer counts.
    """
    xp = array_namespace(planes)
    iy, ix = (block_indices(n, s) for n, s in zip(shape_yx, shrink_yx))
    (my, sy), (mx, sx) = iy.shape, ix.shape
    iy_d, ix_d = (from_numpy(i.reshape(-1), like=planes) for i in (iy, ix))

    def block_sums(per_pixel):
        # sums are separable: over the block's planes (above), then its rows, then its columns
        rows = xp.sum(xp.reshape(xp.take(per_pixel, iy_d, axis=0), (my, sy, per_pixel.shape[1])), axis=1)
        return xp.sum(xp.reshape(xp.take(rows, ix_d, axis=1), (my, mx, sx)), axis=2)

    # per pixel, over the planes in order: the tissue sum in float64 (the additions a float64 sum over
    # the planes' axis makes, without its (k, Y, X) temporaries) and the tissue count
    zero = xp.zeros((), dtype=planes.dtype)
    total = count = None
    for i in range(planes.shape[0]):
        plane = planes[i, ...]
        use = xp.astype(tissue[i, ...], xp.bool) & (plane > 0)
        if total is None:
            total, count = xp.astype(xp.where(use, plane, zero), xp.float64), xp.astype(use, xp.int32)
        else:
            total += xp.astype(xp.where(use, plane, zero), xp.float64)
            count += xp.astype(use, xp.int32)
    return block_sums(total), block_sums(count)


def block_mean_from_sums(sums, counts, size: int):
    """``(mean, fitted)`` of blocks of ``size`` voxels from their tissue sums and counts."""
    xp = array_namespace(sums)
    mean = xp.astype(xp.where(counts > 0, sums / xp.astype(xp.where(counts > 0, counts, xp.ones_like(counts)),
                                                           xp.float64), xp.zeros_like(sums)), xp.float32)
    return mean, counts >= math.ceil(MIN_TISSUE_FRACTION * size)      # counts are integers


def block_mean_plane(planes, tissue, shrink_yx, shape_yx):
    """Tissue mean over the Y/X blocks of a stack of planes (one Z block), on the planes' device.

    ``planes``, ``tissue`` : (k, Y, X) intensities and tissue mask of the
    block's ``k`` planes.  Returns ``(mean, fitted)``, each ``(My, Mx)``:
    the tissue mean of each block and whether enough of it is tissue.
    """
    sy, sx = (block_indices(n, s).shape[1] for n, s in zip(shape_yx, shrink_yx))
    vs, ns = block_tissue_sums(planes, tissue, shrink_yx, shape_yx)
    return block_mean_from_sums(vs, ns, planes.shape[0] * sy * sx)


def shrink_volume(volume, mask, shrink, mode: str = "subsample"):
    """The fit grid of an in-memory volume: ``(image, mask)`` of shape ``(Mz, My, Mx)``, on its device."""
    if mode not in SHRINK_MODES:
        raise InputError(f"shrink mode must be one of {SHRINK_MODES}; got {mode!r}")
    xp = array_namespace(volume)
    vol = xp.astype(volume, xp.float32)
    msk = xp.astype(mask, xp.bool)
    if mode == "subsample":
        for axis, (n, s) in enumerate(zip(vol.shape, shrink)):
            o, m = shrink_grid(n, s)
            idx = from_numpy(o + s * np.arange(m), like=vol)
            vol, msk = xp.take(vol, idx, axis=axis), xp.take(msk, idx, axis=axis)
        return vol, msk
    zb = block_indices(vol.shape[0], shrink[0])
    out = [block_mean_plane(xp.take(vol, from_numpy(z, like=vol), axis=0), xp.take(msk, from_numpy(z, like=vol),
                                                                                     axis=0), shrink[1:], vol.shape[1:])
           for z in zb]
    return xp.stack([o[0] for o in out]), xp.stack([o[1] for o in out])


def block_mean_grid(vol: Volume, msk: Volume, z_blocks, s, log_field=None, advance=None):
    """Tissue block means of ``vol`` (divided by ``exp(log_field(planes))`` when given), one Z block at a time
    (``advance()`` after each); every stored chunk of input and mask is decompressed once."""
    img = np.empty((len(z_blocks),) + tuple(shrink_grid(n, k)[1] for n, k in zip(vol.shape[1:], s[1:])), np.float32)
    fit = np.empty(img.shape, bool)
    vol_rows, msk_rows = ForwardReader(vol), ForwardReader(msk, tissue=True)
    for j, zb in enumerate(z_blocks):
        planes = vol_rows.read_planes(zb)
        if log_field is not None:
            planes = planes / np.exp(log_field(zb))
        img[j], fit[j] = block_mean_plane(planes, msk_rows.read_planes(zb), s[1:], vol.shape[1:])
        if advance is not None:
            advance()
    return img, fit

