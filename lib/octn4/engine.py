"""octn4's own N4 engine: ITK's algorithm, written once against the array API.

Implements ``N4BiasFieldCorrectionImageFilter`` as specified in the octn4 design
notes (N4_ALGORITHM.md §3-§7): every iteration sharpens the histogram of the
current log residual (linear splatting, centred zero padding, Wiener
deconvolution of a Gaussian, linear lookup of E[u|v]), fits the residual
with a single-level Lee B-spline approximation, adds it to the running
control lattice and re-evaluates the field; a level ends when the CV of
``exp(f_old - f_new)`` over the mask is at or below the threshold; between
levels the lattice is refined ``m <- 2m - p``.

On a regular grid Lee's approximation is exactly separable (§7): the fit is
two chains of per-axis contractions with small dense basis matrices, so the
whole loop is a handful of tensordots, masked reductions, one scatter-add
and a 512-point FFT per iteration.

Arrays.  The loop is written against the array API standard: the namespace
``xp`` comes from the input (NumPy, CuPy, or any conforming library such as
``array_api_strict``), and the one operation the standard lacks (a keyed
sum, for the histograms) goes through :mod:`octn4._backend`.  Everything
runs on the input's device: ranges, histograms, the batched FFTs of the
sharpening, the B-spline fit and the convergence measure.  The host sees
one small array per iteration (every member's CV) and none when the
threshold is 0; no reduction depends on thread order, so two runs on one
device give the same lattice bit for bit.  Dense fit-grid arrays are
float32 and the lattice and all sums float64 (N4_ALGORITHM.md §7).

Batches.  Every array carries a leading batch axis: ``fit_lattice_batch``
fits many equal-shaped images (the sections of a stack) in one loop, each
with its own histogram, convergence test and iteration count, so a GPU is
not left idle by small sections.  A member that has converged keeps its
lattice while the others go on.

Parity with SimpleITK (``tests/test_engine.py``, ``parity=True``): ~1e-8
while both take the same histogram decisions, iteration counts per level
identical, quirk Q1 reproduced.  The one divergence no re-implementation can
follow: ITK counts the brightest voxel fully when it sits exactly on the
last bin centre in float32 and drops it when rounding puts it a hair above;
which happens depends on the last bit of ITK's own arithmetic.  On small
grids that one voxel can move the field by ~1e-4 over a few levels;
``benchmarks/parity_survey.py`` shows that flipping that decision at one or
two iterations removes every difference it found (to <= 7e-7).  By default
(``parity=False``) the engine fixes both quirks: the true minimum, and the
brightest voxel always counted in the top bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._backend import array_namespace, from_numpy, nonzero_flat, scatter, segment_sum, to_numpy
from .bspline import basis_matrix

__all__ = ["EngineFit", "fit_lattice", "fit_lattice_batch", "fit_memory_bytes", "sharpen", "refinement_matrix"]

#: ITK sets a control point's update to 0 where its weight sum Omega "almost equals" 0:
#: ``itk::Math::AlmostEquals`` on floats accepts an absolute difference of 0.1 * FLT_EPSILON.
OMEGA_ZERO = 0.1 * float(np.finfo(np.float32).eps)

#: Peak bytes a fit allocates per fit-grid voxel and per tissue voxel (members x the largest member's count),
#: measured by ``benchmarks/fit_memory.py`` on the array API path a GPU takes (55.9 and 107.7, largest misfit
#: 12 %), rounded up.  They size batches on a device (:func:`fit_memory_bytes`).
FIT_BYTES_PER_GRID_VOXEL = 64
FIT_BYTES_PER_TISSUE_VOXEL = 128

#: Storage of the dense fit-grid arrays (field, residual, basis); the lattice and all sums stay float64.
DENSE = "float32"


@dataclass
class EngineFit:
    coeffs: np.ndarray                      # final control lattice (z, y, x), float64, host
    iterations: list[int] = field(default_factory=list)
    convergence: list[float] = field(default_factory=list)


def fit_memory_bytes(grid_voxels: int, tissue_voxels: int | None = None) -> int:
    """Peak bytes of a fit whose members hold ``grid_voxels`` fit-grid voxels in all and ``tissue_voxels``
    masked ones (members x the largest member's count; all of the grid when not given)."""
    tissue = grid_voxels if tissue_voxels is None else tissue_voxels
    return FIT_BYTES_PER_GRID_VOXEL * int(grid_voxels) + FIT_BYTES_PER_TISSUE_VOXEL * int(tissue)


def _grid_basis(n: int, m: int, order: int) -> np.ndarray:
    """Basis of an ``n``-voxel fit axis: ``t = S*i/(n-1)`` with ITK's end clamp."""
    spans = m - order
    return basis_matrix(spans * np.arange(n) / (n - 1.0), m, order, 1e-3 * spans / (n - 1.0))


def refinement_matrix(m: int, order: int) -> np.ndarray:
    """``R`` (m' x m, m' = 2m - p) with ``fine = R @ coarse``: exact B-spline subdivision (§6.5)."""
    fine = 2 * m - order
    r = np.zeros((fine, m))
    for c in range(m):
        for o in (0, 1):
            if 2 * c + o >= fine:
                continue
            for k in range(order + 1):
                n = 2 * k + 1 - o
                if c + k < m and 0 <= n <= order + 1:
                    r[2 * c + o, c + k] = math.comb(order + 1, n) / 2 ** order
    return r


def _contract(a, mats, xp, first: int = 0):
    """``a ×_first M0 ×_first+1 M1 ×_first+2 M2``, each ``M_d`` of shape (out, in).

    Each step contracts axis ``first`` and appends the new axis at the end, so
    after the last one the axes are back in order and the result is
    contiguous (no copy when it is flattened next).
    """
    for m in mats:
        a = xp.tensordot(a, m, axes=([first], [1]))
    return a


def _minimum_q1_host(vals: np.ndarray) -> float:
    """ITK <= 5.4's range scan (quirk Q1) over ``vals`` in raster order, on the host.

    ``if (x > max) max = x; else if (x < min) min = x``: the first voxel, and
    every later record-breaking maximum, never lowers the minimum.
    """
    vals = np.asarray(vals, dtype=np.float32)
    cummax = np.maximum.accumulate(vals)
    later = vals[1:][vals[1:] <= cummax[:-1]]
    return float(later.min()) if later.size else float(np.finfo(np.float32).max)


def _row_ranges(v, lengths, q1: bool):
    """Per-row ``(lo, hi)`` of the float32 rows ``v`` (na, L), on their device.

    A row holds one member's voxels in raster order, padded after its
    ``lengths[j]`` voxels with copies of its first voxel, which changes
    neither extreme: two reductions, no host round trip.  Only ``q1``
    (parity mode, a reference for comparisons with SimpleITK) brings each
    row to the host, to replay ITK's minimum scan where its first voxel is
    the strict minimum.
    """
    xp = array_namespace(v)
    lo, hi = xp.min(v, axis=1), xp.max(v, axis=1)
    if q1:
        lo_h, host = np.array(to_numpy(lo), np.float32), to_numpy(v)
        for j, n in enumerate(lengths):
            vals = host[j, :n]
            if n > 1 and vals[0] < vals[1:].min():
                lo_h[j] = _minimum_q1_host(vals)
        lo = from_numpy(lo_h, like=v)
    return lo, hi


def _sharpen_rows(v, weight, lengths, *, bins, fwhm, noise, parity):
    """N3 histogram sharpening (§4) of each row of the float32 ``v`` (na, L), on its device.

    ``weight`` (na, L) float64 is 1 on a row's voxels and 0 on its padding;
    ``lengths`` (host ints) the voxels per row.  ITK's rules: bin ``k`` is
    centred at ``lo + k*h``; a voxel splats linearly onto its two bins (onto
    one when it sits exactly on a centre).  Two ITK quirks are reproduced
    only with ``parity``: Q1 (the minimum scan; a first voxel below the
    recorded minimum is dropped from the histogram and mapped to the top
    entry) and the top-bin rule (the brightest voxel is dropped when float32
    rounding puts ``(v - lo) / h`` a hair above the last bin centre).
    Without ``parity`` the minimum is the true one and the brightest voxel
    always counts in the top bin.

    Both splat weights of a voxel go to one key, its lower bin, and the
    upper sums are shifted up a bin afterwards: one keyed sum per weight,
    each deterministic (:func:`octn4._backend.segment_sum`).
    """
    xp = array_namespace(v)
    na = v.shape[0]
    lo, hi = _row_ranges(v, lengths, parity)
    h = (hi - lo) / float(bins - 1)
    # A row whose values are all equal has a one-point histogram: nothing to sharpen, so its sharpened
    # values are the values themselves (bin width 1, every entry of E[u|v] the constant).
    flat = ~(h > 0)
    h = xp.where(flat, xp.ones_like(h), h)
    c = (v - lo[:, None]) / h[:, None]
    i = xp.astype(xp.floor(c), xp.int64)
    frac = c - xp.astype(i, xp.float32)
    inner = (i >= 0) & (i < bins - 1)
    top = ((i == bins - 1) & (frac == 0)) if parity else (i >= bins - 1)
    frac64 = xp.astype(frac, xp.float64)
    lower = xp.where(inner, 1 - frac64, xp.astype(top, xp.float64)) * weight
    upper = xp.where(inner, frac64, xp.zeros_like(frac64)) * weight
    base = xp.arange(na, dtype=xp.int64)[:, None] * bins
    key = xp.reshape(base + xp.clip(i, 0, bins - 1), (-1,))
    low = xp.reshape(segment_sum(key, xp.reshape(lower, (-1,)), na * bins), (na, bins))
    up = xp.reshape(segment_sum(key, xp.reshape(upper, (-1,)), na * bins), (na, bins))
    hist = low + xp.concat([xp.zeros((na, 1), dtype=up.dtype), up[:, :bins - 1]], axis=1)
    e = _expected_intensity(hist, lo, h, bins=bins, fwhm=fwhm, noise=noise)
    e = xp.astype(xp.where(flat[:, None], xp.astype(lo, xp.float64)[:, None], e), xp.float32)
    e_flat = xp.reshape(e, (-1,))
    k = xp.reshape(base + xp.clip(i, 0, bins - 2), (-1,))
    e0 = xp.reshape(xp.take(e_flat, k), v.shape)
    e1 = xp.reshape(xp.take(e_flat, k + 1), v.shape)
    return xp.where(inner, e0 + (e1 - e0) * frac, e[:, bins - 1:bins])


def sharpen(v, inside, *, bins=200, fwhm=0.15, noise=0.01, parity=False):
    """N3 histogram sharpening of one image ``v`` over ``inside`` (§4); 0 outside the mask."""
    xp = array_namespace(v)
    flat = xp.reshape(xp.astype(v, xp.float32), (-1,))
    idx = nonzero_flat(xp.reshape(xp.astype(inside, xp.bool), (-1,)))
    vals = xp.take(flat, idx)[None, :]
    s = _sharpen_rows(vals, xp.ones(vals.shape, dtype=xp.float64), [int(vals.shape[1])], bins=bins, fwhm=fwhm,
                      noise=noise, parity=parity)
    return xp.reshape(scatter(int(flat.shape[0]), idx, s[0, :]), v.shape)


def _expected_intensity(hist, lo, h, *, bins, fwhm, noise):
    """E[u | v] per bin (§4 steps 4-7) for each row of ``hist`` (na, bins), float64, on its device.

    The P-point FFTs of all rows run as one batched transform along the last axis.
    """
    xp = array_namespace(hist)
    na = hist.shape[0]
    e = math.ceil(float(np.log(np.float32(bins)) / np.log(np.float32(2.0)))) + 1
    p = 2 ** e
    o = (p - bins) // 2
    zeros = xp.zeros
    V = xp.concat([zeros((na, o), dtype=xp.float64), hist, zeros((na, p - bins - o), dtype=xp.float64)], axis=1)
    lo64, h64 = xp.astype(lo, xp.float64)[:, None], xp.astype(h, xp.float64)[:, None]
    w = fwhm / h64
    n = xp.arange(p, dtype=xp.float64)
    d = xp.minimum(n, p - n)[None, :]
    F = (2 / w) * math.sqrt(math.log(2) / math.pi) * xp.exp(-4 * math.log(2) * d * d / (w * w))

    def fft(a):
        return xp.fft.fft(xp.astype(a, xp.complex128), axis=-1)

    def ifft_real(a):
        return xp.real(xp.fft.ifft(a, axis=-1))

    Fh = fft(F)
    G = xp.conj(Fh) / (xp.conj(Fh) * Fh + noise)
    U = ifft_real(fft(V) * xp.astype(xp.real(G), xp.complex128))
    U = xp.where(U > 0, U, xp.zeros_like(U))
    X = lo64 + (n - o)[None, :] * h64
    num = ifft_real(fft(X * U) * Fh)
    den = ifft_real(fft(U) * Fh)
    nonzero = den != 0
    E = xp.where(nonzero, num / xp.where(nonzero, den, xp.ones_like(den)), xp.zeros_like(den))
    return E[:, o:o + bins]


def fit_lattice(image, mask, **kw) -> EngineFit:
    """Run N4 on one ``image`` (Z, Y, X), the already shrunk fit grid; see :func:`fit_lattice_batch`."""
    xp = array_namespace(image)
    return fit_lattice_batch(image[None, ...], xp.asarray(mask)[None, ...], **kw)[0]


class _Voxels:
    """Every member's masked voxels, gathered once: rows ``(nb, L)`` in raster order.

    ``L`` is the largest member's voxel count; a shorter row is padded with
    copies of its first voxel (neutral for the range, weight 0 everywhere
    else).  ``cols`` are the voxels' flat indices within their member's
    grid; ``logv`` their log intensities (ITK logs positive voxels only).
    Two host round trips, both here: the counts (they size the rows) and
    the one ``nonzero``.
    """

    def __init__(self, xp, img, inside):
        nb = img.shape[0]
        self.n_vox = math.prod(img.shape[1:])
        self.inside = xp.reshape(inside, (nb, self.n_vox))
        self.counts = to_numpy(xp.sum(xp.astype(self.inside, xp.int64), axis=1)).astype(np.int64)
        if (self.counts < 2).any():
            j = int(np.argmax(self.counts < 2))
            raise ValueError(f"every image needs at least 2 voxels in its mask; member {j} has {self.counts[j]}")
        self.width = int(self.counts.max())
        idx = nonzero_flat(xp.reshape(inside, (-1,)))
        start_count = from_numpy(np.stack([np.cumsum(self.counts) - self.counts, self.counts]), like=idx)
        k = xp.arange(self.width, dtype=xp.int64)[None, :]
        self.valid = k < start_count[1, :][:, None]
        pos = start_count[0, :][:, None] + xp.where(self.valid, k, xp.zeros_like(k))
        cols = xp.reshape(xp.take(idx, xp.reshape(pos, (-1,))), (nb, self.width))
        v = xp.reshape(xp.take(xp.reshape(img, (-1,)), xp.reshape(cols, (-1,))), (nb, self.width))
        self.logv = xp.where(v > 0, xp.log(xp.where(v > 0, v, xp.ones_like(v))), v)
        self.cols = cols - xp.arange(nb, dtype=xp.int64)[:, None] * self.n_vox


class _Working:
    """The members still iterating in a level: their dense fields (na, Z, Y, X) and voxel rows (na, L).

    ``gather`` reads a dense array at the members' voxels; ``dense`` puts
    rows back on the grid (0 off the mask) as a gather through ``inv``,
    each grid voxel's position in the rows: no scatter, so every backend
    runs it, deterministically, on its device.
    """

    def __init__(self, xp, vox: _Voxels, ids, phi, f, omega_all):
        self.xp, self.ids = xp, list(ids)
        na, width = len(self.ids), vox.width
        if self.ids == list(range(vox.counts.shape[0])):
            def pick(a):
                return a
        else:
            rows = from_numpy(np.array(self.ids, np.int64), like=phi)

            def pick(a):
                return xp.take(a, rows, axis=0)
        self.phi, self.f = phi, f
        self.grid = tuple(f.shape[1:])
        omega = pick(omega_all)
        self.solvable = omega > OMEGA_ZERO                  # ITK: no update where Omega almost equals 0
        self.omega = xp.where(self.solvable, omega, xp.ones_like(omega))
        self.logv = pick(vox.logv)
        self.weight = xp.astype(pick(vox.valid), xp.float64)
        self.count = xp.sum(self.weight, axis=1)
        self.lengths = [int(vox.counts[j]) for j in self.ids]
        offset = xp.arange(na, dtype=xp.int64)[:, None]
        self.cols = xp.reshape(pick(vox.cols) + offset * vox.n_vox, (-1,))
        inside = pick(vox.inside)
        rank = xp.cumulative_sum(xp.astype(inside, xp.int64), axis=1)
        self.inv = xp.reshape(xp.where(inside, offset * width + rank - 1, xp.full_like(rank, na * width)), (-1,))
        self.rows = (na, width)

    def gather(self, dense):
        xp = self.xp
        return xp.reshape(xp.take(xp.reshape(dense, (-1,)), self.cols), self.rows)

    def dense(self, rows):
        xp = self.xp
        ext = xp.concat([xp.reshape(rows, (-1,)), xp.zeros((1,), dtype=rows.dtype)])
        return xp.reshape(xp.take(ext, self.inv), (self.rows[0], *self.grid))


def _cv(e, weight, count):
    """Per row: the coefficient of variation (sample sigma) of ``e`` over its weighted entries (§5)."""
    xp = array_namespace(e)
    mu = xp.sum(e * weight, axis=1) / count
    var = xp.sum(((e - mu[:, None]) * weight) ** 2, axis=1) / (count - 1)
    return xp.sqrt(var) / mu


def fit_lattice_batch(images, masks, *, m0, levels_iterations, threshold=1e-3, order=3, bins=200, fwhm=0.15,
                      noise=0.01, parity=False) -> list[EngineFit]:
    """Run N4 on each of ``images`` (B, Z, Y, X) over ``masks`` and return the final lattices.

    Parameters
    ----------
    images, masks : (B, Z, Y, X) arrays of one namespace (NumPy, CuPy, ...)
        Shrunk fit grids and the voxels to fit (non-positive voxels inside
        the mask are left unlogged, as ITK does).
    m0 : (z, y, x) ints
        Level-0 control points; every level refines ``m <- 2m - order``.
    levels_iterations : ints
        Maximum iterations per level.
    parity : bool
        Reproduce two SimpleITK quirks that the default fixes (see
        :func:`_sharpen_rows`): quirk Q1 of the minimum scan and the
        top-bin rounding rule.  With it the engine matches SimpleITK to ~1e-7
        except where the top-bin decision falls differently in the last bit
        of float32 arithmetic (``benchmarks/parity_survey.py``).

    Each member stops a level on its own when its CV reaches ``threshold``
    and leaves the working set; the others go on without it.

    Layout: the masked voxels are gathered once into rows (:class:`_Voxels`);
    per iteration the field is gathered at them, the histogram work runs on
    the rows only, and the residual goes back to the dense grid for the two
    separable contractions of the B-spline fit.  Dense arrays are float32
    (``DENSE``), the lattice and every sum float64.

    Host round trips: per iteration one, the CV of every member, and none
    when ``threshold <= 0`` (nothing can stop early; the CVs are read once
    at the end of the level); besides those, two at the start and the
    basis matrices copied to the device per level.  ``parity`` adds the
    Q1 scan's copy of the rows.  ``tests/test_engine.py`` counts them.
    """
    xp = array_namespace(images)
    img = xp.astype(images, xp.float32)
    inside = xp.astype(masks, xp.bool)
    if img.ndim != 4 or inside.shape != img.shape:
        raise ValueError(f"images and masks must be equal (B, Z, Y, X) arrays; got {img.shape}, {inside.shape}")
    nb, n = img.shape[0], tuple(img.shape[1:])
    dense = getattr(xp, DENSE)
    vox = _Voxels(xp, img, inside)
    w = xp.astype(inside, dense)
    m = list(m0)
    phi = xp.zeros((nb, *m), dtype=xp.float64)
    f = xp.zeros((nb, *n), dtype=dense)
    iters = np.zeros((len(levels_iterations), nb), int)
    conv = np.full((len(levels_iterations), nb), np.inf)
    for level, cap in enumerate(levels_iterations):
        b = [xp.astype(from_numpy(_grid_basis(nn, mm, order), like=img), dense) for nn, mm in zip(n, m)]
        sig = [xp.sum(bb * bb, axis=1) for bb in b]
        wsum = sig[0][:, None, None] * sig[1][None, :, None] * sig[2][None, None, :]
        omega_all = xp.astype(_contract(w, [xp.permute_dims(bb ** 2, (1, 0)) for bb in b], xp, first=1), xp.float64)
        b3t = [xp.permute_dims(bb ** 3, (1, 0)) for bb in b]
        done_phi, done_f = {}, {}
        work = _Working(xp, vox, range(nb), phi, f, omega_all)
        f_in = work.gather(work.f)
        while work.ids:
            resid = xp.astype(work.logv, dense, copy=False) - f_in
            s = _sharpen_rows(xp.astype(resid, xp.float32, copy=False), work.weight, work.lengths, bins=bins,
                              fwhm=fwhm, noise=noise, parity=parity)
            r = work.dense(resid - xp.astype(s, dense, copy=False))
            delta = xp.astype(_contract(r / wsum, b3t, xp, first=1), xp.float64)
            work.phi = work.phi + xp.where(work.solvable, delta / work.omega, xp.zeros_like(delta))
            work.f = _contract(xp.astype(work.phi, dense), b, xp, first=1)
            f_new = work.gather(work.f)
            cv = _cv(xp.exp(xp.astype(f_in, xp.float64) - xp.astype(f_new, xp.float64)), work.weight, work.count)
            f_in = f_new
            ids = np.array(work.ids)
            iters[level, ids] += 1
            if threshold > 0:                                   # the one host round trip of an iteration
                cv_h = to_numpy(cv)
                conv[level, ids] = cv_h
                going = (iters[level, ids] < cap) & (cv_h > threshold)
            else:                                               # nothing stops early: read the CVs at the end
                going = iters[level, ids] < cap
                if not going.any():
                    conv[level, ids] = to_numpy(cv)
            if going.all():
                continue
            for p in np.flatnonzero(~going):
                done_phi[work.ids[p]] = work.phi[int(p), ...]
                done_f[work.ids[p]] = work.f[int(p), ...]
            keep = [int(p) for p in np.flatnonzero(going)]
            if not keep:
                break
            sel = from_numpy(np.array(keep, np.int64), like=work.phi)
            work = _Working(xp, vox, [work.ids[p] for p in keep], xp.take(work.phi, sel, axis=0),
                            xp.take(work.f, sel, axis=0), omega_all)
            f_in = xp.take(f_in, sel, axis=0)
        phi = xp.stack([done_phi[j] for j in range(nb)])
        f = xp.stack([done_f[j] for j in range(nb)])
        if level != len(levels_iterations) - 1:
            phi = _contract(phi, [from_numpy(refinement_matrix(mm, order), like=img) for mm in m], xp, first=1)
            m = [2 * mm - order for mm in m]
    coeffs = np.asarray(to_numpy(phi), dtype=np.float64)
    return [EngineFit(coeffs=coeffs[j], iterations=[int(v) for v in iters[:, j]],
                      convergence=[float(v) for v in conv[:, j]]) for j in range(nb)]
