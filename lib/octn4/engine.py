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
whole loop is a handful of tensordots, reductions, one scatter-add and a
512-point FFT per iteration.

Status: the fit loop is checked against SimpleITK in ``tests/test_engine.py``
(to ~1e-8 while both take the same histogram decisions; iteration counts per
level identical).  Known divergence: ITK counts the brightest voxel fully when
it sits exactly on the last bin centre in float32 and drops it when rounding
puts it a hair above; which happens depends on the last ulp of
``log(v) - f``, so a re-implementation cannot follow it bit for bit.  On a
14-plane grid that one voxel makes a ~1e-4 difference after 3 levels; near
the convergence threshold it can change a level's iteration count.  Not yet
selectable from the pipeline; run on NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._backend import array_namespace, bincount, to_numpy
from .bspline import basis_matrix

__all__ = ["EngineFit", "fit_lattice", "sharpen", "refinement_matrix"]

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


def _contract(a, mats, xp):
    """``a ×_0 M0 ×_1 M1 ×_2 M2`` where each ``M_d`` maps axis d (shape (out, in))."""
    for d, m in enumerate(mats):
        a = xp.moveaxis(xp.tensordot(m, a, axes=([1], [d])), 0, d)
    return a


def _minimum_q1(v, inside, xp) -> float:
    """ITK <= 5.4's range scan (quirk Q1): the first included voxel never lowers the minimum.

    Differs from the true minimum only when the first included voxel (raster
    order) is the strict minimum; then the minimum of the rest that ITK's
    ``if (x > max) ... else if (x < min)`` scan records is returned.
    """
    vals = v[inside]
    true_min = float(xp.min(vals))
    if vals.shape[0] < 2 or not float(vals[0]) < float(xp.min(vals[1:])):
        return true_min
    vals = np.asarray(vals, dtype=np.float32)
    cummax = np.maximum.accumulate(vals)
    later = vals[1:][vals[1:] <= cummax[:-1]]
    return float(later.min()) if later.size else float(np.float32(np.finfo(np.float32).max))


def sharpen(v, inside, *, bins=200, fwhm=0.15, noise=0.01, q1=True):
    """N3 histogram sharpening of ``v`` over ``inside`` (§4); returns the sharpened image (0 outside).

    Follows ITK's rules: bin ``k`` is centred at ``lo + k*h``; a voxel splats
    linearly onto its two bins (onto one when it sits exactly on a centre);
    values below bin 0 (possible only under quirk Q1) are dropped from the
    histogram and mapped to the top entry, as ITK's unsigned index does.
    """
    xp = array_namespace(v)
    vals = v[inside]
    lo = np.float32(_minimum_q1(v, inside, xp) if q1 else float(xp.min(vals)))
    hi = np.float32(float(xp.max(vals)))
    h = np.float32((hi - lo) / np.float32(bins - 1))
    c = (xp.astype(vals, xp.float32) - lo) / h
    i = xp.astype(xp.floor(c), xp.int64)
    frac = c - xp.astype(i, xp.float32)
    inner = (i >= 0) & (i < bins - 1)
    lower = xp.where(inner, 1 - frac, xp.where((i == bins - 1) & (frac == 0), 1.0, 0.0))
    upper = xp.where(inner, frac, 0.0)
    hist = (bincount(xp.clip(i, 0, bins - 1), weights=xp.astype(lower, xp.float64), minlength=bins)
            + bincount(xp.clip(i + 1, 0, bins - 1), weights=xp.astype(upper, xp.float64), minlength=bins))
    e = xp.asarray(_expected_intensity(to_numpy(hist), float(lo), float(h), bins, fwhm, noise).astype(np.float32))
    k = xp.clip(i, 0, bins - 2)
    out = xp.zeros_like(v)
    out[inside] = xp.where(inner, e[k] + (e[k + 1] - e[k]) * frac, e[bins - 1])
    return out


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


def fit_lattice(image, mask, *, m0, levels_iterations, threshold=1e-3, order=3, bins=200, fwhm=0.15,
                noise=0.01, q1=True) -> EngineFit:
    """Run N4 on ``image`` (the already shrunk fit grid) and return the final lattice.

    ``image`` and ``mask`` are (Z, Y, X) arrays (NumPy; CuPy once the seam
    covers it); ``m0`` are the level-0 control points (z, y, x).
    """
    xp = array_namespace(image)
    img = xp.astype(image, xp.float32)
    inside = xp.astype(mask, xp.bool)
    logv = xp.where(inside & (img > 0), xp.log(xp.where(img > 0, img, 1)), img)
    n = img.shape
    m = list(m0)
    phi = None
    f = xp.zeros(n, dtype=xp.float64)
    w = xp.astype(inside, xp.float64)
    out = EngineFit(coeffs=None)
    for level, cap in enumerate(levels_iterations):
        b = [xp.asarray(_grid_basis(nn, mm, order)) for nn, mm in zip(n, m)]
        sig = [xp.sum(bb * bb, axis=1) for bb in b]
        wsum = sig[0][:, None, None] * sig[1][None, :, None] * sig[2][None, None, :]
        omega = _contract(w, [xp.permute_dims(bb ** 2, (1, 0)) for bb in b], xp)
        b3t = [xp.permute_dims(bb ** 3, (1, 0)) for bb in b]
        k, cv = 0, math.inf
        while k < cap and cv > threshold:
            k += 1
            resid_in = xp.astype(logv, xp.float64) - f
            s = sharpen(xp.astype(resid_in, xp.float32), inside, bins=bins, fwhm=fwhm, noise=noise, q1=q1)
            r = resid_in - xp.astype(s, xp.float64)
            delta = _contract(w * r / wsum, b3t, xp)
            dphi = xp.where(omega > OMEGA_ZERO, delta / xp.where(omega > OMEGA_ZERO, omega, 1), 0.0)
            phi = dphi if phi is None else phi + dphi
            f_new = _contract(phi, b, xp)
            e = xp.exp((f - f_new)[inside])
            mu = xp.mean(e)
            cv = float(xp.sqrt(xp.sum((e - mu) ** 2) / (e.shape[0] - 1)) / mu)
            f = f_new
        out.iterations.append(k)
        out.convergence.append(cv)
        if level != len(levels_iterations) - 1:
            rm = [xp.asarray(refinement_matrix(mm, order)) for mm in m]
            phi = _contract(phi, rm, xp)
            m = [2 * mm - order for mm in m]
    out.coeffs = np.asarray(to_numpy(phi), dtype=np.float64)
    return out
