"""Tissue mask: the reference recipe, on NumPy or CuPy, in memory or streamed.

Recipe (SPEC.md, "Tissue mask"), for a volume split into serial sections:

1. anisotropic Gaussian smoothing (``smoothing_sigma_z`` along Z,
   ``smoothing_sigma`` in Y and X), in voxels;
2. one Otsu threshold per section, computed on that section's smoothed
   voxels that are > 0 (a section with fewer than ``min_voxels`` such voxels
   is all tissue);
3. each voxel thresholded with its own section's threshold (so oblique
   sections whose footprint moves with Z are handled);
4. in every Z plane, hole filling, then a binary closing with a disk of
   ``closing_radius`` voxels;
5. with more than one section, a closing along Z with a ``(2k+1, 1, 1)``
   element, ``k = z_closing_planes`` **planes** (the system octn4 grew from
   called this a number of sections but applied it as planes).

Step 2-3 has two methods (``MaskParams.method``):

``reference``
    one Otsu threshold per section on the smoothed intensities, as above.
``depth`` (octn4's default)
    the threshold follows the depth attenuation: an Otsu threshold of the
    **log** smoothed intensities of every plane (planes with fewer than
    ``min_voxels`` positive voxels give none), then per section a robust
    straight line through those thresholds against Z (Huber-weighted least
    squares), which each plane uses.  In log units agarose is far below
    both grey and white matter, so Otsu splits agarose from tissue rather
    than grey from white, and attenuation (linear in log with depth) moves
    the line, not the split.  A section with fewer than 3 planes with a
    threshold uses their mean; with none, it is all tissue.  The evidence
    for the method is in ``docs/QUALITY.md``.

Closings treat the outside of the volume as neutral (dilation sees False,
erosion sees True), so planes and pixels at the volume's faces are not
eroded away.  :func:`write_tissue_mask` computes the same mask in Z slabs
with halos sized from the filters (per-section Otsu from histograms
accumulated over the slabs), so the streamed mask equals the in-memory one
exactly and its memory does not depend on the section thickness.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from array_api_compat import is_numpy_array
from numpy.lib.format import open_memmap
from scipy import ndimage

from ._backend import array_namespace, ndimage_for, segment_sum, to_numpy
from .errors import InputError

__all__ = ["MaskParams", "MASK_METHODS", "otsu_threshold", "tissue_mask", "section_thresholds", "plane_thresholds",
           "section_plane_thresholds", "write_section_mask", "kept_planes", "sections_reached",
           "KeptSection",
           "depth_trend", "write_tissue_mask"]

MASK_METHODS = ("reference", "depth")


@dataclass(frozen=True)
class MaskParams:
    """Parameters of the tissue-mask recipe (the reference defaults)."""

    smoothing_sigma: float = 2.0      # Y/X Gaussian sigma, voxels
    smoothing_sigma_z: float = 1.0    # Z Gaussian sigma, voxels
    closing_radius: int = 3           # per-plane disk radius, voxels
    z_closing_planes: int = 2         # k of the (2k+1, 1, 1) Z closing, planes
    min_voxels: int = 100             # below this many positive voxels a section (or plane) gets no threshold
    method: str = "reference"         # or 'depth' (see the module's docstring)

    def __post_init__(self):
        if self.method not in MASK_METHODS:
            raise InputError(f"mask method must be one of {MASK_METHODS}; got {self.method!r}")
        for name in ("smoothing_sigma", "smoothing_sigma_z"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("closing_radius", "z_closing_planes", "min_voxels"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise InputError(f"{name} must be a non-negative integer; got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)


def _histogram(values, lo: float, hi: float, nbins: int):
    """Counts of ``values`` in ``nbins`` equal bins over ``[lo, hi]`` (float64, on the values' device)."""
    xp = array_namespace(values)
    width = (hi - lo) / nbins
    if is_numpy_array(values):
        # the same arithmetic in place, clipped before the integer cast (the same integers), counted without
        # weights (counts below 2**53 are exact in float64): about 8x faster on a 16 x 2048^2 slab
        v = np.subtract(values, lo)
        np.divide(v, width, out=v)
        np.floor(v, out=v)
        np.clip(v, 0, nbins - 1, out=v)
        return np.bincount(v.astype(np.int64), minlength=nbins).astype(np.float64)
    idx = xp.clip(xp.astype(xp.floor((values - lo) / width), xp.int64), 0, nbins - 1)
    return segment_sum(idx, xp.ones(idx.shape, dtype=xp.float64), nbins)      # no host read on a device


def _otsu_rows(hist, lo, width):
    """Otsu's threshold of each row of ``hist`` (k, nbins), whose bins start at ``lo`` (k,) and are ``width``
    (k,) wide (bin centres as in scikit-image), on the histograms' device."""
    xp = array_namespace(hist)
    nbins = hist.shape[1]
    centers = lo[:, None] + (xp.arange(nbins, dtype=xp.float64) + 0.5)[None, :] * width[:, None]
    w1 = xp.cumulative_sum(hist, axis=1)
    w2 = xp.flip(xp.cumulative_sum(xp.flip(hist, axis=1), axis=1), axis=1)
    m1 = xp.cumulative_sum(hist * centers, axis=1) / xp.where(w1 > 0, w1, xp.ones_like(w1))
    w2f = xp.flip(w2, axis=1)
    m2 = xp.flip(xp.cumulative_sum(xp.flip(hist * centers, axis=1), axis=1) / xp.where(w2f > 0, w2f, xp.ones_like(w2f)),
                 axis=1)
    var = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    return xp.take_along_axis(centers, xp.argmax(var, axis=1, keepdims=True), axis=1)[:, 0]


def _otsu_from_histogram(hist, lo: float, hi: float) -> float:
    """Otsu's threshold from a histogram over ``[lo, hi]`` (:func:`_otsu_rows` of one row)."""
    xp = array_namespace(hist)
    row = xp.asarray([[lo, (hi - lo) / hist.shape[0]]], dtype=xp.float64)
    return float(_otsu_rows(hist[None, :], row[:, 0], row[:, 1])[0])


def otsu_threshold(values, nbins: int = 256) -> float:
    """Otsu's threshold of an array (scikit-image's histogram convention, float64 sums).

    Same result as :func:`skimage.filters.threshold_otsu` with 256 bins on a
    float64 input, on the array's own device.  A constant input returns that
    constant.
    """
    xp = array_namespace(values)
    v = xp.reshape(values, (-1,))
    lo, hi = float(xp.min(v)), float(xp.max(v))
    if lo == hi:
        return lo
    return _otsu_from_histogram(_histogram(v, lo, hi, nbins), lo, hi)


def _smooth(volume, params: MaskParams, keep: tuple[int, int] | None = None):
    """The Gaussian smoothing of ``volume`` (float32), of its planes ``keep = (a, b)`` only.

    The separable passes of ``gaussian_filter`` one axis at a time, Z first:
    the planes that are only the Z pass's halo are dropped before the Y and
    X passes, which work on each plane alone, so a plane read with its Z
    halo gets the same bits whatever block it was smoothed in.
    """
    ndi = ndimage_for(volume)
    xp = array_namespace(volume)
    a, b = keep if keep is not None else (0, volume.shape[0])
    v = xp.astype(volume, xp.float32, copy=False)
    if params.smoothing_sigma_z > 1e-15:
        if is_numpy_array(v) and v.ndim == 3:
            return _smooth_in_plane(_smooth_z_host(v, params.smoothing_sigma_z, (a, b)), params.smoothing_sigma)
        v = ndi.gaussian_filter1d(v, params.smoothing_sigma_z, axis=0, mode="reflect", truncate=4.0)
    return _smooth_in_plane(v[a:b], params.smoothing_sigma)


def _smooth_z_host(v: np.ndarray, sigma: float, keep: tuple[int, int], rows: int = 2) -> np.ndarray:
    """``gaussian_filter1d(v, sigma, axis=0, mode='reflect')[a:b]`` (float32) on the host, the same bits,
    for the planes ``keep = (a, b)`` only.

    SciPy filters every Z line of the block (the halo planes too) with a
    stride of a whole plane between taps.  Here each block of ``rows`` rows
    of the planes ``a - r .. b + r`` (folded into the block as ``reflect``
    does) is copied into a float64 buffer and SciPy's symmetric-kernel sum
    is formed with whole-row operations in its order, as
    :func:`_smooth_in_plane_host` does for the Y pass.  Tested equal to
    ``gaussian_filter1d``.
    """
    w = _gaussian_weights(sigma)
    r = (w.size - 1) // 2
    k, ny, nx = v.shape
    a0, b0 = keep
    n = b0 - a0
    idx = slice(a0 - r, b0 + r) if a0 >= r and b0 + r <= k else _reflected(np.arange(a0 - r, b0 + r), k)
    out = np.empty((n, ny, nx), np.float32)
    buf, acc, pair = np.empty((n + 2 * r, rows, nx)), np.empty((n, rows, nx)), np.empty((n, rows, nx))
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        b, a, t = buf[:, :y1 - y0], acc[:, :y1 - y0], pair[:, :y1 - y0]
        b[...] = v[idx, y0:y1]
        np.multiply(b[r:r + n], w[r], out=a)
        for j in range(r, 0, -1):
            np.add(b[r - j:r - j + n], b[r + j:r + j + n], out=t)
            t *= w[r - j]
            a += t
        out[:, y0:y1] = a
    return out


def _smooth_in_plane(v, sigma: float):
    """``gaussian_filter(v, (0, sigma, sigma))``: the Y pass, then the X pass (the same bits)."""
    if not sigma > 1e-15:
        return v
    if is_numpy_array(v) and v.dtype == np.float32 and v.ndim == 3:
        return _smooth_in_plane_host(v, sigma)
    ndi = ndimage_for(v)
    for axis in (1, 2):
        v = ndi.gaussian_filter1d(v, sigma, axis=axis, mode="reflect", truncate=4.0)
    return v


def _gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """SciPy's Gaussian correlation weights for ``sigma`` (2r + 1 of them), taken from its own impulse
    response, so they are its weights to the last bit."""
    r = int(truncate * float(sigma) + 0.5)
    impulse = np.zeros(4 * r + 1)
    impulse[2 * r] = 1.0
    return ndimage.gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate)[r:3 * r + 1]


def _reflected(i: np.ndarray, n: int) -> np.ndarray:
    """Indices ``i`` folded into ``[0, n)`` as SciPy's ``mode='reflect'`` extends a line (d c b a | a b c d)."""
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _smooth_in_plane_host(v: np.ndarray, sigma: float, rows: int = 16) -> np.ndarray:
    """:func:`_smooth_in_plane` on the host, the same bits, about 2.6x faster.

    SciPy's Y pass walks columns 8 kB apart, several times slower than its
    X pass.  Here the Y pass runs on blocks of ``rows`` rows: each block and
    its halo of r rows is copied into a float64 buffer, and SciPy's
    symmetric-kernel sum, ``x[0]*w[0] + sum_j (x[-j] + x[j])*w[j]`` for
    j = r .. 1 in double precision, is formed with whole-row array
    operations in the same order (so the same roundings); the block's X pass
    is SciPy's, while the block is still in cache.  Tested equal to
    ``gaussian_filter1d`` along Y then X.
    """
    w = _gaussian_weights(sigma)
    r = (w.size - 1) // 2
    k, ny, nx = v.shape
    out = np.empty(v.shape, np.float32)
    buf, acc, pair = np.empty((rows + 2 * r, nx)), np.empty((rows, nx)), np.empty((rows, nx))
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        n, lo, hi = y1 - y0, y0 - r, y1 + r
        idx = None if lo >= 0 and hi <= ny else _reflected(np.arange(lo, hi), ny)
        b, a, t = buf[:n + 2 * r], acc[:n], pair[:n]
        for z in range(k):
            b[...] = v[z, lo:hi] if idx is None else v[z][idx]
            np.multiply(b[r:r + n], w[r], out=a)
            for j in range(r, 0, -1):
                np.add(b[r - j:r - j + n], b[r + j:r + j + n], out=t)
                t *= w[r - j]
                a += t
            out[z, y0:y1] = ndimage.gaussian_filter1d(a.astype(np.float32), sigma, axis=1, mode="reflect",
                                                      truncate=4.0)
    return out


def above_in_plane(planes: np.ndarray, thresholds, sigma: float) -> np.ndarray:
    """Tissue by intensity: voxels whose value, smoothed in Y/X only, is above their plane's threshold.

    Unlike the mask, which smooths and closes across planes, this never
    takes tissue smoothed in from a neighbouring plane (or section), nor the
    agarose a closing brings in; the rim of about a pixel that the in-plane
    smoothing spreads into the agarose is eroded away.
    """
    v = _smooth_in_plane(np.asarray(planes, np.float32), sigma)
    above = v > np.asarray(thresholds, np.float32)[:, None, None]
    # the smoothing carries tissue about a pixel into the agarose beside it: keep what is a pixel inside (an
    # erosion by the in-plane cross, border 1: the intersection of its two 3-voxel lines), plane by plane (a
    # plane's temporaries stay in cache)
    out = np.empty(above.shape, bool)
    for z in range(above.shape[0]):
        a = above[z:z + 1]
        np.logical_and(_line(a, 3, 1, False), _line(a, 3, 2, False), out=out[z:z + 1])
    return out


def _smoothing_halo(params: MaskParams) -> int:
    return int(4.0 * params.smoothing_sigma_z + 0.5)


def _threshold(smoothed_section, params: MaskParams):
    pos = smoothed_section[smoothed_section > 0]
    if pos.shape[0] < params.min_voxels:
        return -math.inf   # all tissue
    return otsu_threshold(pos)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _disk_rectangles(radius: int) -> list[tuple[int, int]]:
    """``(half-height, half-width)`` of centred rectangles whose union is :func:`_disk` exactly.

    For each distinct half-width ``w`` of the disk's rows, the tallest
    rectangle of that width that fits: disk(3) is 1 x 7, 5 x 5 and 7 x 1.
    """
    rows = [(abs(dr), math.isqrt(radius * radius - dr * dr)) for dr in range(-radius, radius + 1)]
    return sorted({(max(h for h, ww in rows if ww >= w), w) for _, w in rows})


def _line(a, size: int, axis: int, dilate: bool):
    """Binary dilation (``dilate``) or erosion of the bool ``a`` by a centred line of ``size`` along ``axis``.

    Outside the array counts as 0 for a dilation and 1 for an erosion
    (``binary_dilation``'s ``border_value=0``, ``binary_erosion``'s
    ``border_value=1``).  The padded array is OR-ed (AND-ed) with itself
    shifted by 1, 2, 4, ... voxels until the window covers ``size``: about
    ``log2(size)`` elementwise passes of slices, on any array library.
    """
    if size <= 1:
        return a
    xp = array_namespace(a)
    half = size // 2
    shape = list(a.shape)
    shape[axis] = half
    edge = xp.full(tuple(shape), not dilate, dtype=xp.bool)
    r = xp.concat([edge, a, edge], axis=axis)
    op = xp.logical_or if dilate else xp.logical_and
    cover = 1
    while cover < size:
        step = min(cover, size - cover)
        m = r.shape[axis] - step
        lo = [slice(None)] * a.ndim
        hi = [slice(None)] * a.ndim
        lo[axis], hi[axis] = slice(0, m), slice(step, step + m)
        r = op(r[tuple(lo)], r[tuple(hi)])
        cover += step
    return r


def _rect(a, half_h: int, half_w: int, dilate: bool):
    """Dilation or erosion of the bool ``a`` (k, Y, X) by a centred (2h+1) x (2w+1) rectangle in each plane."""
    return _line(_line(a, 2 * half_h + 1, 1, dilate), 2 * half_w + 1, 2, dilate)


def _disk_closing(mask, radius: int):
    """Closing of each Z plane by :func:`_disk` ``(radius)`` that does not erode at the array faces.

    Equal, voxel for voxel, to ``binary_dilation`` (border 0) then
    ``binary_erosion`` (border 1) with the disk: a dilation by a union of
    rectangles is the union of the dilations, an erosion the intersection of
    the erosions, and each rectangle is a line in Y then a line in X.
    """
    xp = array_namespace(mask)
    m = xp.astype(mask, xp.bool)
    rects = _disk_rectangles(radius)
    dil = None
    for h, w in rects:
        d = _rect(m, h, w, True)
        dil = d if dil is None else (dil | d)
    out = None
    for h, w in rects:
        e = _rect(dil, h, w, False)
        out = e if out is None else (out & e)
    return out


def _line_closing(mask, k: int, axis: int = 0):
    """Closing by a centred line of ``2k + 1`` voxels along ``axis``, not eroding at the faces (exact)."""
    xp = array_namespace(mask)
    return _line(_line(xp.astype(mask, xp.bool), 2 * k + 1, axis, True), 2 * k + 1, axis, False)


def _fill_holes_planewise(mask):
    """Fill holes in each Z plane: background components that do not touch the plane's border.

    Same result as ``binary_fill_holes`` with an in-plane cross on every
    plane, in one labelling of the whole slab whose structure has no
    neighbours across planes (so no component leaves its plane): one call,
    and on a GPU one host read (the label count), whatever the plane count.
    """
    ndi = ndimage_for(mask)
    xp = array_namespace(mask)
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    labels, n = ndi.label(~mask, structure=xp.asarray(cross))
    border = xp.concat([xp.reshape(a, (-1,)) for a in
                        (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])])
    outside = xp.zeros(int(n) + 1, dtype=xp.bool)
    outside[border] = True             # labels of background touching a border (index assignment: no unique)
    outside[0] = False
    return ~outside[labels]            # integer-array indexing: ~6x faster than take's checked gather on NumPy


def _planewise(mask, params: MaskParams):
    """Hole filling then disk closing, each Z plane on its own.

    On the host one plane at a time: a plane's temporaries stay in cache
    (3.3x on the closing, 1.3x on the filling of a 24 x 2048^2 slab against
    the whole slab at once); a device takes the slab in one go.
    """
    if is_numpy_array(mask) and mask.ndim == 3 and mask.shape[0] > 1:
        out = np.empty(mask.shape, bool)
        for z in range(mask.shape[0]):
            out[z] = _planewise(mask[z:z + 1], params)[0]
        return out
    m = _fill_holes_planewise(mask)
    if params.closing_radius > 0:
        m = _disk_closing(m, params.closing_radius)
    return m


def _z_closing(mask, params: MaskParams):
    k = params.z_closing_planes
    if k <= 0:
        return mask
    return _line_closing(mask, k, axis=0)


def tissue_mask(volume, bounds: Sequence[tuple[int, int]], *, params: MaskParams = MaskParams()):
    """Tissue mask of a volume held in memory.

    Parameters
    ----------
    volume : (Z, Y, X) array (NumPy or CuPy)
    bounds : list of (z0, z1)
        Section Z ranges covering the volume (see :func:`octn4.sections.section_bounds`).
    params : MaskParams

    Returns
    -------
    mask : (Z, Y, X) bool array on the volume's device
    """
    xp = array_namespace(volume)
    sm = _smooth(volume, params)
    if params.method == "depth":
        log_t = _log_plane_thresholds(sm, params)
        thr = xp.asarray(_depth_thresholds(log_t, bounds))
    else:
        thr = xp.empty(volume.shape[0], dtype=xp.float32)
        for z0, z1 in bounds:
            thr[z0:z1] = _threshold(sm[z0:z1], params)
    mask = _planewise(sm > thr[:, None, None], params)
    if len(bounds) > 1:
        mask = _z_closing(mask, params)
    return mask


def _forward(volume_reader, on_read=None):
    """A :class:`octn4.io.Volume` wrapped in a :class:`octn4.io.ForwardReader` (slabs read with halos that
    ascend through Z then decompress each stored chunk once, not once per slab that touches it; ``on_read``
    sees every run of planes decompressed); any other reader as it is."""
    from .io import ForwardReader, Volume

    return ForwardReader(volume_reader, on_read) if isinstance(volume_reader, Volume) else volume_reader


def _smoothed_slabs(volume_reader, z0: int, z1: int, params: MaskParams, xp, slab: int):
    """Smoothed planes of ``[z0, z1)`` in pieces of at most ``slab`` planes, each read with its halo."""
    g, depth = _smoothing_halo(params), volume_reader.shape[0]
    reader = _forward(volume_reader)
    for c0 in range(z0, z1, slab):
        c1 = min(z1, c0 + slab)
        r0, r1 = max(0, c0 - g), min(depth, c1 + g)
        yield c0, _smooth(xp.asarray(reader.read(r0, r1)), params, keep=(c0 - r0, c1 - r0))


def section_thresholds(volume_reader, bounds, *, params: MaskParams = MaskParams(), xp=np,
                       slab: int = 16, nbins: int = 256) -> list[float]:
    """Per-section Otsu thresholds, streaming each section in slabs of ``slab`` planes.

    Two passes per section (range of the positive smoothed values, then
    their histogram) give exactly :func:`otsu_threshold` of the whole section.
    ``volume_reader`` has ``shape`` and ``read(z0, z1)`` (see :class:`octn4.io.Volume`).
    """
    return [_otsu_of_slabs(lambda a=z0, b=z1: _smoothed_slabs(volume_reader, a, b, params, xp, slab), params, xp,
                           nbins) for z0, z1 in bounds]


def _otsu_of_slabs(slabs, params: MaskParams, xp, nbins: int = 256) -> float:
    """Otsu threshold of the positive voxels of the smoothed slabs that ``slabs()`` yields (twice: range,
    then histogram), or ``-inf`` (all tissue) below ``min_voxels`` of them."""
    lo, hi, n = math.inf, -math.inf, 0
    for _, sm in slabs():
        pos = sm[sm > 0]
        if pos.shape[0]:
            lo, hi, n = min(lo, float(xp.min(pos))), max(hi, float(xp.max(pos))), n + int(pos.shape[0])
    if n < params.min_voxels:
        return -math.inf   # all tissue
    if lo == hi:
        return lo
    hist = None
    for _, sm in slabs():
        h = _histogram(sm[sm > 0], lo, hi, nbins)
        hist = h if hist is None else hist + h
    return _otsu_from_histogram(hist, lo, hi)


def _log_plane_threshold(smoothed_plane, params: MaskParams) -> float:
    """Otsu threshold of the log of a smoothed plane's positive voxels (NaN when too few)."""
    xp = array_namespace(smoothed_plane)
    pos = smoothed_plane[smoothed_plane > 0]
    if pos.shape[0] < params.min_voxels:
        return math.nan
    return otsu_threshold(xp.log(xp.astype(pos, xp.float64)))


def _log_plane_thresholds(smoothed, params: MaskParams, nbins: int = 256) -> np.ndarray:
    """:func:`_log_plane_threshold` of every plane of ``smoothed`` (k, Y, X) at once, on its device.

    The same arithmetic, plane by plane, as :func:`otsu_threshold` (equal
    results to the last bit), batched: per-plane ranges and counts are
    reductions over the planes' axes, the histograms one keyed sum, Otsu's
    criterion cumulative sums along the bins.  The host reads the slab's
    results once (k numbers), not a few times per plane.
    """
    if is_numpy_array(smoothed):
        return _log_plane_thresholds_host(smoothed, params, nbins)
    xp = array_namespace(smoothed)
    k = smoothed.shape[0]
    pos = xp.reshape(smoothed > 0, (k, -1))
    v = xp.astype(xp.reshape(smoothed, (k, -1)), xp.float64)
    logv = xp.log(xp.where(pos, v, xp.ones_like(v)))
    count = xp.sum(xp.astype(pos, xp.int64), axis=1)
    lo = xp.min(xp.where(pos, logv, xp.full_like(logv, math.inf)), axis=1)
    hi = xp.max(xp.where(pos, logv, xp.full_like(logv, -math.inf)), axis=1)
    spread = (count > 0) & (hi > lo)
    lo_s = xp.where(spread, lo, xp.zeros_like(lo))
    width = xp.where(spread, (hi - lo) / nbins, xp.ones_like(lo))
    idx = xp.clip(xp.astype(xp.floor((logv - lo_s[:, None]) / width[:, None]), xp.int64), 0, nbins - 1)
    keys = xp.reshape(idx + xp.arange(k, dtype=xp.int64)[:, None] * nbins, (-1,))
    hist = xp.reshape(segment_sum(keys, xp.reshape(xp.astype(pos, xp.float64), (-1,)), k * nbins), (k, nbins))
    best = _otsu_rows(hist, lo_s, width)
    count_h, lo_h, best_h, spread_h = to_numpy(xp.stack([xp.astype(count, xp.float64), lo, best,
                                                         xp.astype(spread, xp.float64)]))   # the one host read
    out = np.where(spread_h > 0, best_h, lo_h)
    out[count_h < params.min_voxels] = math.nan
    return out


def _log_plane_thresholds_host(smoothed: np.ndarray, params: MaskParams, nbins: int = 256) -> np.ndarray:
    """:func:`_log_plane_thresholds` on the host, plane by plane on each plane's positive voxels only (the
    same values, bins and counts, so the same thresholds to the last bit), without full-plane temporaries."""
    k = smoothed.shape[0]
    hist = np.zeros((k, nbins))
    lo, width = np.zeros(k), np.ones(k)
    low = np.full(k, math.inf)                 # a plane's lowest log value (+inf without positive voxels)
    spread = np.zeros(k, bool)
    count = np.zeros(k, np.int64)
    for i in range(k):
        pos = smoothed[i][smoothed[i] > 0]
        count[i] = pos.size
        if pos.size == 0:
            continue
        logv = np.log(pos, dtype=np.float64)
        a, b = logv.min(), logv.max()
        low[i] = a
        if b > a:
            spread[i], lo[i], width[i] = True, a, (b - a) / nbins
            np.subtract(logv, lo[i], out=logv)        # floor((logv - lo) / width), in place: the same values
            np.divide(logv, width[i], out=logv)
            np.floor(logv, out=logv)
            np.clip(logv, 0, nbins - 1, out=logv)     # clipping before the cast to int64: the same integers
            hist[i] = np.bincount(logv.astype(np.int64), minlength=nbins)
    out = np.where(spread, _otsu_rows(hist, lo, width), low)
    out[count < params.min_voxels] = math.nan
    return out


def depth_trend(z, t, *, iterations: int = 10, c: float = 2.5) -> tuple[float, float]:
    """Huber-weighted straight line through ``t`` against ``z``: ``(slope, intercept)``.

    Residuals beyond ``c`` robust standard deviations (1.4826 MAD) get
    weight ``c*sigma/|r|``, so a few planes whose Otsu split something else
    (a plane of agarose only, a plane of tissue only) do not tilt the line.
    """
    z, t = np.asarray(z, np.float64), np.asarray(t, np.float64)
    zc = z.mean()
    a = np.stack([z - zc, np.ones_like(z)], axis=1)
    w = np.ones_like(t)
    coef = np.zeros(2)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(a * np.sqrt(w)[:, None], t * np.sqrt(w), rcond=None)
        r = t - a @ coef
        sigma = 1.4826 * float(np.median(np.abs(r)))
        if sigma <= 0:
            break
        w = np.minimum(1.0, c * sigma / np.maximum(np.abs(r), 1e-300))
    return float(coef[0]), float(coef[1] - coef[0] * zc)


def _depth_thresholds(log_t, bounds) -> np.ndarray:
    """Per-plane thresholds (intensity units) from per-plane log-Otsu thresholds, one line per section."""
    out = np.empty(len(log_t), np.float32)
    for z0, z1 in bounds:
        t = np.asarray(log_t[z0:z1], np.float64)
        ok = np.isfinite(t)
        z = np.arange(z0, z1)
        if ok.sum() >= 3:
            slope, intercept = depth_trend(z[ok], t[ok])
            out[z0:z1] = np.exp(slope * z + intercept)
        elif ok.any():
            out[z0:z1] = math.exp(float(t[ok].mean()))
        else:
            out[z0:z1] = -math.inf                    # all tissue
    return out


def kept_planes(bounds, i: int, depth: int, params: MaskParams, masked=None) -> tuple[int, int]:
    """Planes ``(s0, s1)`` whose smoothing section ``i``'s passes use: its own (thresholds) and the planes
    ``masked`` (default: its own) with, for more than one section, the ``2k`` planes each side that the Z
    closing reaches (``k = z_closing_planes``)."""
    z0, z1 = bounds[i]
    m0, m1 = (z0, z1) if masked is None else masked
    if m0 >= m1:
        return z0, z1
    h = 2 * params.z_closing_planes if len(bounds) > 1 else 0
    return max(0, min(z0, m0 - h)), min(depth, max(z1, m1 + h))


def sections_reached(bounds, planes, depth: int, params: MaskParams) -> range:
    """The sections whose thresholds the mask of ``planes = (a, b)`` uses: those that the Z closing's
    reach from them overlaps (neighbours, and further ones past a section thinner than that reach)."""
    a, b = planes
    h = 2 * params.z_closing_planes if len(bounds) > 1 else 0
    s0, s1 = max(0, a - h), min(depth, b + h)
    hit = [j for j, (z0, z1) in enumerate(bounds) if z0 < s1 and z1 > s0]
    return range(hit[0], hit[-1] + 1)


class KeptSection:
    """What the threshold pass of section ``i`` keeps on disk for the mask of the planes ``masked`` (default:
    the section's own), so that mask smooths and reads nothing: the smoothed planes :func:`kept_planes`
    (float32) and the raw planes ``masked``, as ``.npy`` files in ``directory`` (read back
    memory-mapped; the page cache usually still holds them)."""

    def __init__(self, directory, bounds, i: int, depth: int, params: MaskParams, masked=None):
        self.directory = Path(directory)
        self.own = tuple(bounds[i])
        self.masked = self.own if masked is None else tuple(int(v) for v in masked)
        self.planes = kept_planes(bounds, i, depth, params, self.masked)

    @property
    def smoothed_path(self):
        return self.directory / "smoothed.npy"

    @property
    def raw_path(self):
        return self.directory / "raw.npy"

    def smoothed(self, a: int, b: int) -> np.ndarray:
        """Smoothed planes ``[a, b)`` (volume Z indices, inside :attr:`planes`)."""
        s0, s1 = self.planes
        if not s0 <= a <= b <= s1:
            raise ValueError(f"planes [{a}, {b}) are not kept (kept: [{s0}, {s1}))")
        return np.load(self.smoothed_path, mmap_mode="r")[a - s0:b - s0]

    def raw(self, a: int, b: int) -> np.ndarray:
        """Raw planes ``[a, b)`` of the planes :attr:`masked`."""
        m0, m1 = self.masked
        if not m0 <= a <= b <= m1:
            raise ValueError(f"raw planes [{a}, {b}) are not kept (kept: [{m0}, {m1}))")
        return np.load(self.raw_path, mmap_mode="r")[a - m0:b - m0]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _keep_section(volume_reader, kept: KeptSection, params: MaskParams, xp, slab: int, on_read=None) -> None:
    """Smooth :attr:`KeptSection.planes` once, in slabs, into ``kept``'s files, with the raw planes masked
    (``on_read``: see :func:`_forward`).

    The files are not synced: another process reading them maps the same
    pages, and they are removed once the section's mask is written, usually
    before the kernel would write them back."""
    (s0, s1), (z0, z1) = kept.planes, kept.masked
    shape = tuple(volume_reader.shape[1:])
    kept.directory.mkdir(parents=True, exist_ok=True)
    sm_out = open_memmap(kept.smoothed_path, mode="w+", dtype=np.float32, shape=(s1 - s0, *shape))
    raw_out = None
    g, depth = _smoothing_halo(params), volume_reader.shape[0]
    reader = _forward(volume_reader, on_read)
    for c0 in range(s0, s1, slab):
        c1 = min(s1, c0 + slab)
        r0, r1 = max(0, c0 - g), min(depth, c1 + g)
        raw = reader.read(r0, r1)
        sm_out[c0 - s0:c1 - s0] = to_numpy(_smooth(xp.asarray(raw), params, keep=(c0 - r0, c1 - r0)))
        a, b = max(c0, z0), min(c1, z1)
        if a < b:
            if raw_out is None:
                raw_out = open_memmap(kept.raw_path, mode="w+", dtype=np.asarray(raw).dtype,
                                      shape=(z1 - z0, *shape))
            raw_out[a - z0:b - z0] = np.asarray(raw[a - r0:b - r0])
    del sm_out, raw_out


def section_plane_thresholds(volume_reader, bounds, i: int, *, params: MaskParams = MaskParams(), xp=np,
                             slab: int = 16, keep=None, scan=None, check=None) -> np.ndarray:
    """The per-plane thresholds of section ``i`` alone (its planes only are read): what
    :func:`plane_thresholds` gives on its planes, to the last bit (each section's thresholds depend on its
    own planes only), so sections can be thresholded in separate processes.

    ``keep``, a :class:`KeptSection`: also smooth the planes its mask pass needs (its own and the Z
    closing's reach into the neighbours, :func:`kept_planes`) and keep them, with the raw own planes, for
    :func:`write_section_mask` (``kept=``), which then smooths and reads nothing.  Every plane is smoothed
    with its own Z halo, so its bits do not depend on the slab it was smoothed in.

    ``scan``, a :class:`octn4.io.RowScan` (with ``keep``): fed the planes the
    smoothing decompresses, so the section's share of the input scan costs
    no read of its own; ``check(part)`` is then called with its
    :class:`octn4.io.ScanPart` before any threshold is computed (it may
    refuse the values).
    """
    z0, z1 = bounds[i]
    if scan is not None and keep is None:
        raise ValueError("a scan rides on the kept smoothing pass: give keep too")
    if keep is None:
        def slabs():
            return _smoothed_slabs(volume_reader, z0, z1, params, xp, slab)
    else:
        _keep_section(volume_reader, keep, params, xp, slab, on_read=None if scan is None else scan.feed)
        if scan is not None:
            part = scan.result()
            if check is not None:
                check(part)

        def slabs():
            for c0 in range(z0, z1, slab):
                yield c0, xp.asarray(keep.smoothed(c0, min(z1, c0 + slab)))
    if params.method == "depth":
        log_t = np.full(volume_reader.shape[0], math.nan)
        for c0, sm in slabs():
            log_t[c0:c0 + sm.shape[0]] = _log_plane_thresholds(sm, params)
        return _depth_thresholds(log_t, [(z0, z1)])[z0:z1]
    return np.full(z1 - z0, _otsu_of_slabs(slabs, params, xp), np.float32)


def plane_thresholds(volume_reader, bounds, *, params: MaskParams = MaskParams(), xp=np, slab: int = 16):
    """Per-plane thresholds (intensity units; ``-inf`` = all tissue), streaming in slabs.

    ``reference``: each section's Otsu threshold on all its planes
    (:func:`section_thresholds`); ``depth``: the per-section lines through
    the planes' log-Otsu thresholds.
    """
    return np.concatenate([section_plane_thresholds(volume_reader, bounds, i, params=params, xp=xp, slab=slab)
                           for i in range(len(bounds))])


def write_section_mask(volume_reader, bounds, i: int, thr_of_plane, writer, *, params: MaskParams = MaskParams(),
                       xp=np, slab: int = 16, plane_stats=None, kept: KeptSection | None = None,
                       planes=None) -> None:
    """The mask of section ``i`` (its halo planes read from the neighbours), written with ``writer.write``.

    ``thr_of_plane``: every plane's threshold (the halo needs the
    neighbours').  The result on its planes equals :func:`tissue_mask` on the
    whole volume; see :func:`write_tissue_mask` for ``plane_stats``.
    ``kept``: the section's smoothed and raw planes kept by its threshold
    pass (:func:`section_plane_thresholds`), used instead of reading and
    smoothing again (the same bits).  ``planes = (a, b)``: the mask of
    those planes instead of the section's (e.g. the chunk rows a part owns;
    with ``kept``, its :attr:`KeptSection.masked`); the slabs start at ``a``.
    Each plane is thresholded, hole-filled and closed once, though the Z
    closing's reach makes consecutive slabs share planes (those planes are
    kept from one slab to the next), and the input is read forward, each
    stored chunk decompressed once (:func:`_forward`).
    """
    depth = volume_reader.shape[0]
    reader = _forward(volume_reader)
    multi = len(bounds) > 1
    k = params.z_closing_planes if multi else 0
    g = _smoothing_halo(params)
    z0, z1 = (kept.masked if kept is not None else bounds[i]) if planes is None else planes
    closed = {}                       # plane -> its hole-filled, disk-closed binary plane (before the Z closing)
    for c0 in range(z0, z1, slab):
        c1 = min(z1, c0 + slab)
        m0, m1 = max(0, c0 - 2 * k), min(depth, c1 + 2 * k)     # binary planes needed
        lo = next((z for z in range(m0, m1) if z not in closed), m1)   # those lacking: the run lo .. m1
        raw = None
        if kept is None and (lo < m1 or plane_stats is not None):
            r0, r1 = max(0, min(c0, lo - g)), min(depth, max(c1, m1 + g))   # raw planes needed
            raw = reader.read(r0, r1)
        if lo < m1:
            if kept is None:
                sm = _smooth(xp.asarray(raw[max(0, lo - g) - r0:]), params,
                             keep=(lo - max(0, lo - g), m1 - max(0, lo - g)))
            else:
                sm = xp.asarray(kept.smoothed(lo, m1))
            new = _planewise(sm > xp.asarray(thr_of_plane[lo:m1])[:, None, None], params)
            for z in range(lo, m1):
                closed[z] = new[z - lo]
        m = xp.stack([closed[z] for z in range(m0, m1)])
        if multi:
            m = _z_closing(m, params)
        block = to_numpy(m[c0 - m0:c1 - m0]).astype(np.uint8)
        writer.write(c0, block)
        if plane_stats is not None:
            own = np.asarray(raw[c0 - r0:c1 - r0] if kept is None else kept.raw(c0, c1))
            plane_stats(c0, own, (block > 0) & above_in_plane(own, thr_of_plane[c0:c1], params.smoothing_sigma))
        for z in [z for z in closed if z < c1 - 2 * k]:        # the next slab needs planes from c1 - 2k on
            del closed[z]


def write_tissue_mask(volume_reader, bounds, writer, *, params: MaskParams = MaskParams(), xp=np,
                      slab: int = 16, progress=None, plane_stats=None, scratch=None, scans=None) -> np.ndarray:
    """Compute the tissue mask in Z slabs and write it with ``writer.write(z0, block)``.

    Holds ``slab`` planes plus a halo of ``4*sigma_z + 2k`` planes on each
    side at a time, whatever the section thickness; the result equals
    :func:`tissue_mask` on the whole volume.  Returns the per-plane
    thresholds (:func:`plane_thresholds`; ``-inf`` marks all tissue).
    ``plane_stats(z0, planes, tissue)``, when given, is called with every
    slab's raw planes and their tissue by intensity (mask voxels whose value,
    smoothed within its own plane, is above the plane's threshold: neither
    the agarose that the closings bring in nor tissue smoothed in from a
    neighbouring section counts; NumPy), so per-plane statistics cost no
    second read.  The two passes (thresholds, then masks) are per section
    (:func:`section_plane_thresholds`, :func:`write_section_mask`), so a
    caller may run the sections of each pass in parallel.

    ``scratch``, a directory: each section is smoothed once, its threshold
    pass keeping the smoothed planes for its mask pass (:class:`KeptSection`,
    under ``scratch``), and the sections go thresholds of ``i + 1`` then mask
    of ``i`` (of every section that ``i``'s Z closing reaches:
    :func:`sections_reached`), so about two sections' planes are on disk at
    a time.
    Without it the mask pass reads and smooths again.  The same mask either way.
    ``scans`` (with ``scratch``): ``scans.start(j)`` gives section ``j``'s
    :class:`octn4.io.RowScan` and ``scans.done(j, part)`` takes its result
    (see :func:`section_plane_thresholds`).
    """
    if scans is not None and scratch is None:
        raise ValueError("scans ride on the kept smoothing pass: give scratch too")
    if scratch is None:
        thr_of_plane = plane_thresholds(volume_reader, bounds, params=params, xp=xp, slab=slab)
        for i in range(len(bounds)):
            write_section_mask(volume_reader, bounds, i, thr_of_plane, writer, params=params, xp=xp, slab=slab,
                               plane_stats=plane_stats)
            if progress is not None:
                progress(i)
        return thr_of_plane
    depth = volume_reader.shape[0]
    thr_of_plane = np.empty(depth, np.float32)
    kept = {}

    def threshold(j):
        kept[j] = KeptSection(Path(scratch) / f"section_{j}", bounds, j, depth, params)
        z0, z1 = bounds[j]
        scan = None if scans is None else scans.start(j)
        thr_of_plane[z0:z1] = section_plane_thresholds(
            volume_reader, bounds, j, params=params, xp=xp, slab=slab, keep=kept[j], scan=scan,
            check=None if scans is None else (lambda part: scans.done(j, part)))

    done = 0                                      # sections thresholded: 0 .. done - 1
    try:
        for i in range(len(bounds)):
            while done <= sections_reached(bounds, bounds[i], depth, params)[-1]:
                threshold(done)
                done += 1
            write_section_mask(volume_reader, bounds, i, thr_of_plane, writer, params=params, xp=xp, slab=slab,
                               plane_stats=plane_stats, kept=kept[i])
            kept.pop(i).remove()
            if progress is not None:
                progress(i)
    finally:
        for k in kept.values():
            k.remove()
    return thr_of_plane
