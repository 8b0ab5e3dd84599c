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
``array_api_strict``), and the two operations the standard lacks (a weighted
``bincount`` and a host copy) go through :mod:`octn4._backend`.  The few
hundred numbers of each histogram go to the host for the FFTs.

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

from ._backend import array_namespace, bincount, from_numpy, nonzero_flat, scatter, to_numpy
from .bspline import basis_matrix

__all__ = ["EngineFit", "fit_lattice", "fit_lattice_batch", "sharpen", "refinement_matrix"]

#: ITK sets a control point's update to 0 where its weight sum Omega "almost equals" 0:
#: ``itk::Math::AlmostEquals`` on floats accepts an absolute difference of 0.1 * FLT_EPSILON.
OMEGA_ZERO = 0.1 * float(np.finfo(np.float32).eps)


@dataclass
class EngineFit:
    coeffs: np.ndarray                      # final control lattice (z, y, x), float64, host
    iterations: list[int] = field(default_factory=list)
    convergence: list[float] = field(default_factory=list)


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


def _ranges(v, segments, xp, q1: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment (lo, hi) of the compact float32 ``v`` (members' voxels in raster order); ``lo`` by Q1.

    Q1 changes the minimum only when a member's first voxel is its strict minimum.
    """
    lo, hi = np.empty(len(segments), np.float32), np.empty(len(segments), np.float32)
    for j, (a, b) in enumerate(segments):
        vals = v[a:b]
        lo[j], hi[j] = float(xp.min(vals)), float(xp.max(vals))
        if q1 and b - a > 1 and float(vals[0]) < float(xp.min(vals[1:])):
            lo[j] = _minimum_q1_host(to_numpy(vals))
    return lo, hi


def _sharpen_compact(v, seg, segments, *, bins, fwhm, noise, parity):
    """N3 histogram sharpening (§4) of the compact float32 ``v``; ``seg`` gives each value's member.

    ITK's rules: bin ``k`` is centred at ``lo + k*h``; a voxel splats
    linearly onto its two bins (onto one when it sits exactly on a centre).
    Two ITK quirks are reproduced only with ``parity``: Q1 (the minimum scan;
    a first voxel below the recorded minimum is dropped from the histogram
    and mapped to the top entry) and the top-bin rule (the brightest voxel is
    dropped when float32 rounding puts ``(v - lo) / h`` a hair above the last
    bin centre).  Without ``parity`` the minimum is the true one and the
    brightest voxel always counts in the top bin.
    """
    xp = array_namespace(v)
    nb = len(segments)
    lo_h, hi_h = _ranges(v, segments, xp, parity)
    h_h = ((hi_h - lo_h) / np.float32(bins - 1)).astype(np.float32)
    # A member whose values are all equal has a one-point histogram: nothing to sharpen, so its
    # sharpened values are the values themselves (bin width 1, every entry of E[u|v] the constant).
    flat = ~(h_h > 0)
    h_h[flat] = 1
    lo = xp.take(from_numpy(lo_h, like=v), seg)
    h = xp.take(from_numpy(h_h, like=v), seg)
    c = (v - lo) / h
    i = xp.astype(xp.floor(c), xp.int64)
    frac = c - xp.astype(i, xp.float32)
    inner = (i >= 0) & (i < bins - 1)
    top = ((i == bins - 1) & (frac == 0)) if parity else (i >= bins - 1)
    frac64 = xp.astype(frac, xp.float64)
    lower = xp.where(inner, 1 - frac64, xp.astype(top, xp.float64))
    upper = xp.where(inner, frac64, xp.zeros_like(frac64))
    base = seg * bins
    hist = (bincount(base + xp.clip(i, 0, bins - 1), weights=lower, minlength=nb * bins)
            + bincount(base + xp.clip(i + 1, 0, bins - 1), weights=upper, minlength=nb * bins))
    hist = to_numpy(hist).reshape(nb, bins)
    e = np.stack([np.full(bins, lo_h[j], np.float64) if flat[j] else
                  _expected_intensity(hist[j], float(lo_h[j]), float(h_h[j]), bins, fwhm, noise)
                  for j in range(nb)]).astype(np.float32)
    e_flat = from_numpy(e.reshape(-1), like=v)
    k = base + xp.clip(i, 0, bins - 2)
    e0, e1 = xp.take(e_flat, k), xp.take(e_flat, k + 1)
    e_top = xp.take(from_numpy(e[:, bins - 1].copy(), like=v), seg)
    return xp.where(inner, e0 + (e1 - e0) * frac, e_top)


def sharpen(v, inside, *, bins=200, fwhm=0.15, noise=0.01, parity=False):
    """N3 histogram sharpening of one image ``v`` over ``inside`` (§4); 0 outside the mask."""
    xp = array_namespace(v)
    flat = xp.reshape(xp.astype(v, xp.float32), (-1,))
    idx = nonzero_flat(xp.reshape(xp.astype(inside, xp.bool), (-1,)))
    vals = xp.take(flat, idx)
    seg = xp.zeros(vals.shape, dtype=xp.int64)
    s = _sharpen_compact(vals, seg, [(0, int(vals.shape[0]))], bins=bins, fwhm=fwhm, noise=noise, parity=parity)
    return xp.reshape(scatter(int(flat.shape[0]), idx, s), v.shape)


def _expected_intensity(hist, lo, h, bins, fwhm, noise) -> np.ndarray:
    """E[u | v] per bin (§4 steps 4-7), on the host (a few hundred points)."""
    e = math.ceil(float(np.log(np.float32(bins)) / np.log(np.float32(2.0)))) + 1
    p = 2 ** e
    o = (p - bins) // 2
    V = np.zeros(p)
    V[o:o + bins] = hist
    w = fwhm / h
    n = np.arange(p)
    d = np.minimum(n, p - n).astype(np.float64)
    F = (2 / w) * math.sqrt(math.log(2) / math.pi) * np.exp(-4 * math.log(2) * d * d / (w * w))
    Fh = np.fft.fft(F)
    G = np.conj(Fh) / (np.conj(Fh) * Fh + noise)
    U = np.maximum(np.real(np.fft.ifft(np.fft.fft(V) * np.real(G))), 0)
    X = lo + (n - o) * h
    num = np.real(np.fft.ifft(np.fft.fft(X * U) * Fh))
    den = np.real(np.fft.ifft(np.fft.fft(U) * Fh))
    E = np.where(den != 0, num / np.where(den != 0, den, 1), 0)
    return E[o:o + bins]


def fit_lattice(image, mask, **kw) -> EngineFit:
    """Run N4 on one ``image`` (Z, Y, X), the already shrunk fit grid; see :func:`fit_lattice_batch`."""
    xp = array_namespace(image)
    return fit_lattice_batch(image[None, ...], xp.asarray(mask)[None, ...], **kw)[0]


class _Working:
    """The members still iterating in a level, packed: dense fields (A, Z, Y, X), compact voxel data."""

    def __init__(self, xp, members, phi, f, per_member, n_vox, omega_all):
        self.members = list(members)
        self.phi, self.f = phi, f
        omega = omega_all if len(self.members) == omega_all.shape[0] else \
            xp.take(omega_all, from_numpy(np.array(self.members), like=phi), axis=0)
        self.solvable = omega > OMEGA_ZERO                  # ITK: no update where Omega almost equals 0
        self.omega = xp.where(self.solvable, omega, xp.ones_like(omega))
        idx, seg, logv, segments, start = [], [], [], [], 0
        for p, j in enumerate(self.members):
            local, lv = per_member[j]
            idx.append(local + p * n_vox)
            seg.append(xp.full(local.shape, p, dtype=xp.int64))
            logv.append(lv)
            segments.append((start, start + int(local.shape[0])))
            start += int(local.shape[0])
        self.idx, self.seg, self.logv = xp.concat(idx), xp.concat(seg), xp.concat(logv)
        self.segments = segments
        self.count = from_numpy(np.array([b - a for a, b in segments], np.float64), like=phi)


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
        :func:`_sharpen_compact`): quirk Q1 of the minimum scan and the
        top-bin rounding rule.  With it the engine matches SimpleITK to ~1e-7
        except where the top-bin decision falls differently in the last bit
        of float32 arithmetic (``benchmarks/parity_survey.py``).

    Each member stops a level on its own when its CV reaches ``threshold``
    and leaves the working set; the others go on without it.

    Layout: the masked voxels are kept compact (gathered once); per
    iteration the field is gathered at them, the histogram work runs on the
    compact values only, and the residual is scattered back to a dense grid
    for the two separable contractions of the B-spline fit.
    """
    xp = array_namespace(images)
    img = xp.astype(images, xp.float32)
    inside = xp.astype(masks, xp.bool)
    if img.ndim != 4 or inside.shape != img.shape:
        raise ValueError(f"images and masks must be equal (B, Z, Y, X) arrays; got {img.shape}, {inside.shape}")
    nb, n = img.shape[0], tuple(img.shape[1:])
    n_vox = math.prod(n)
    per_member = []
    for j in range(nb):
        local = nonzero_flat(xp.reshape(inside[j, ...], (-1,)))
        if local.shape[0] < 2:
            raise ValueError(f"every image needs at least 2 voxels in its mask; member {j} has {local.shape[0]}")
        v = xp.take(xp.reshape(img[j, ...], (-1,)), local)
        logv = xp.where(v > 0, xp.log(xp.where(v > 0, v, xp.ones_like(v))), v)   # ITK logs positive voxels only
        per_member.append((local, xp.astype(logv, xp.float64)))
    w = xp.astype(inside, xp.float64)
    m = list(m0)
    phi = xp.zeros((nb, *m), dtype=xp.float64)
    f = xp.zeros((nb, *n), dtype=xp.float64)
    iters = np.zeros((len(levels_iterations), nb), int)
    conv = np.full((len(levels_iterations), nb), np.inf)
    for level, cap in enumerate(levels_iterations):
        b = [from_numpy(_grid_basis(nn, mm, order), like=img) for nn, mm in zip(n, m)]
        sig = [xp.sum(bb * bb, axis=1) for bb in b]
        wsum = sig[0][:, None, None] * sig[1][None, :, None] * sig[2][None, None, :]
        omega_all = _contract(w, [xp.permute_dims(bb ** 2, (1, 0)) for bb in b], xp, first=1)
        b3t = [xp.permute_dims(bb ** 3, (1, 0)) for bb in b]
        done_phi, done_f = {}, {}
        work = _Working(xp, range(nb), phi, f, per_member, n_vox, omega_all)
        while work.members:
            na = len(work.members)
            f_in = xp.take(xp.reshape(work.f, (-1,)), work.idx)
            resid = work.logv - f_in
            s = _sharpen_compact(xp.astype(resid, xp.float32), work.seg, work.segments, bins=bins, fwhm=fwhm,
                                 noise=noise, parity=parity)
            r = xp.reshape(scatter(na * n_vox, work.idx, resid - xp.astype(s, xp.float64)), (na, *n))
            delta = _contract(r / wsum, b3t, xp, first=1)
            work.phi = work.phi + xp.where(work.solvable, delta / work.omega, xp.zeros_like(delta))
            work.f = _contract(work.phi, b, xp, first=1)
            e = xp.exp(f_in - xp.take(xp.reshape(work.f, (-1,)), work.idx))
            mu = bincount(work.seg, weights=e, minlength=na) / work.count
            var = bincount(work.seg, weights=(e - xp.take(mu, work.seg)) ** 2, minlength=na) / (work.count - 1)
            cv = to_numpy(xp.sqrt(var) / mu)
            ids = np.array(work.members)
            iters[level, ids] += 1
            conv[level, ids] = cv
            going = (iters[level, ids] < cap) & (cv > threshold)
            if not going.all():
                for p in np.flatnonzero(~going):
                    done_phi[work.members[p]] = work.phi[int(p), ...]
                    done_f[work.members[p]] = work.f[int(p), ...]
                keep = [int(p) for p in np.flatnonzero(going)]
                if keep:
                    sel = from_numpy(np.array(keep), like=work.idx)
                    work = _Working(xp, [work.members[p] for p in keep], xp.take(work.phi, sel, axis=0),
                                    xp.take(work.f, sel, axis=0), per_member, n_vox, omega_all)
                else:
                    work.members = []
        phi = xp.stack([done_phi[j] for j in range(nb)])
        f = xp.stack([done_f[j] for j in range(nb)])
        if level != len(levels_iterations) - 1:
            phi = _contract(phi, [from_numpy(refinement_matrix(mm, order), like=img) for mm in m], xp, first=1)
            m = [2 * mm - order for mm in m]
    coeffs = np.asarray(to_numpy(phi), dtype=np.float64)
    return [EngineFit(coeffs=coeffs[j], iterations=[int(v) for v in iters[:, j]],
                      convergence=[float(v) for v in conv[:, j]]) for j in range(nb)]
