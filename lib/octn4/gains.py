"""Section gain harmonisation: one multiplicative gain per section, from the tissue at each boundary.

N4's field is one smooth spline per fit, so it cannot represent the gain jump
at a section boundary (N4_ALGORITHM.md §9, item 10).  After per-section N4,
octn4 measures at each boundary ``s | s+1`` a log step ``d_s`` of the
section-corrected intensity ``c``, over the pixels that are tissue on both
sides of the boundary (the mask's last plane of ``s`` and first plane of
``s+1``), with one of two estimators:

``touching`` (octn4's default, :data:`octn4.defaults.GAINS`)
    the two planes that touch the boundary, each smoothed in-plane by a
    Gaussian against speckle; ``d_s`` is the median of the per-pixel log
    ratios.  Tissue is continuous across the cut, so each pixel compares the
    same anatomy on both sides (:func:`touching_step`);
``planes``
    ``median log c(first k planes of s+1) - median log c(last k planes of
    s)``, which also takes a change of the tissue's make-up over those
    ``2k`` planes for gain (:func:`boundary_steps_from_data`).

It then solves, jointly and in log space,

    minimise  sum_s w_s (g_{s+1} - g_s - d_s)^2,   subject to  sum_s n_s g_s = 0,

where ``n_s`` is the tissue voxel count of section ``s`` (so the overall
level is kept).  A boundary with fewer than ``min_shared`` shared tissue
pixels gives no measurement: it is *bridged* with a weak ``g_{s+1} = g_s``
prior instead of a guess, and reported as such.  Section ``s`` is then
divided by ``exp(g_s)``.

Boundary steps are precise but local: a systematic error at the section
ends (the same at every boundary) is integrated by the chain into a ramp.
So the chained gains are then *anchored* (``anchor='histogram'``, octn4's
default): each section task also records the histogram of its
section-corrected log intensities (on its fit grid of tissue block means,
where speckle is averaged down), and after the chain each section's
histogram is aligned, by cross-correlation within ``+-anchor_range``, with
the pooled histogram of all the others (:func:`histogram_offsets`).  Those
offsets are whole-section, globally anchored measurements; they are
composition-robust (a peak is matched to the same peak) but less precise
than the steps, so only their slow part is used: a robust fit of the
offsets against the sections' depth, a straight line for up to
``anchor_sections`` sections and a cubic B-spline with one span per
``anchor_sections`` sections beyond (:func:`drift_correction`), is added to
the chained gains (shrunk where the offsets cannot tell it from their own
scatter).  The chain then decides every boundary's step and the
histograms decide the drift: gains cannot drift further than the
histograms allow.  Where boundaries are bridged, the runs of sections
between them are first levelled against each other by their histograms
(:func:`level_bridged_runs`), since the chain relates nothing across a
bridge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = ["GAIN_ESTIMATORS", "GAIN_ANCHORS", "GainParams", "boundary_steps_from_data", "solve_gains",
           "touching_step", "log_histogram", "histogram_offsets", "drift_correction", "level_bridged_runs", "HIST_BIN",
           "BRIDGED_RANGE"]

#: Weight of the no-jump prior on a bridged boundary, relative to a measured one.
BRIDGE_WEIGHT = 1e-3


#: How a boundary's step is measured (see the module docstring).
GAIN_ESTIMATORS = ("touching", "planes")

#: What anchors the chained gains against drift: the sections' histograms, or nothing.
GAIN_ANCHORS = ("histogram", "none")

#: Bin width (log intensity) of the section histograms.
HIST_BIN = 0.01

#: Largest offset (log) searched when a run of sections joined only by bridged boundaries is levelled: gain
#: jumps of SD 0.2-0.3 log are common, and grey and white matter peaks lie 0.75 log apart.
BRIDGED_RANGE = 0.5


@dataclass(frozen=True)
class GainParams:
    enabled: bool = True
    estimator: str = "planes"     # 'touching' or 'planes'
    smoothing_px: float = 8.0     # 'touching': Gaussian sigma (pixels) applied to each touching plane
    boundary_planes: int = 3      # 'planes': k planes on each side of a boundary
    min_shared: int = 200         # shared tissue pixels below which a boundary is bridged
    anchor: str = "none"          # 'histogram' or 'none'
    anchor_range: float = 0.3     # 'histogram': largest offset searched (log)
    anchor_sections: int = 8      # 'histogram': sections per span of the drift correction

    def __post_init__(self):
        if self.estimator not in GAIN_ESTIMATORS:
            raise InputError(f"gain estimator must be one of {GAIN_ESTIMATORS}; got {self.estimator!r}")
        if self.anchor not in GAIN_ANCHORS:
            raise InputError(f"gain anchor must be one of {GAIN_ANCHORS}; got {self.anchor!r}")
        if not self.anchor_range > 0 or self.anchor_sections < 2:
            raise InputError(f"anchor range must be > 0 and anchor sections >= 2; got {self.anchor_range}, "
                             f"{self.anchor_sections}")
        if not self.smoothing_px >= 0:
            raise InputError(f"smoothing_px must be >= 0; got {self.smoothing_px}")
        if self.boundary_planes < 1:
            raise InputError(f"boundary_planes must be >= 1; got {self.boundary_planes}")

    def as_dict(self) -> dict:
        return asdict(self)


def boundary_steps_from_data(planes_before, planes_after, mask_last, mask_first, *, min_shared: int):
    """Log step across one boundary, or ``None`` when too little tissue is shared.

    ``planes_before`` / ``planes_after`` : (k, Y, X) section-corrected planes
    on each side; ``mask_last`` / ``mask_first`` : (Y, X) tissue masks of the
    two planes that touch the boundary.
    """
    shared = mask_last & mask_first
    a = planes_before[:, shared]
    b = planes_after[:, shared]
    a, b = a[a > 0], b[b > 0]
    n = int(shared.sum())
    if n < min_shared or a.size == 0 or b.size == 0:
        return None, n
    return float(np.median(np.log(b)) - np.median(np.log(a))), n


def touching_step(plane_before, plane_after, mask_last, mask_first, *, sigma: float, min_shared: int):
    """Log step across one boundary from the two planes that touch it, or ``None``.

    Each section-corrected plane is smoothed (Gaussian, ``sigma`` pixels)
    against speckle; the step is the median, over the pixels that are tissue
    in both planes, of the per-pixel log ratio ``after / before``.  Tissue
    is continuous across a cut, so each pixel compares the same anatomy on
    both sides.
    """
    shared = mask_last & mask_first
    n = int(shared.sum())
    if n < min_shared:
        return None, n
    a = np.asarray(plane_before, np.float32)     # float32: a plane of a whole brain can be 100 M pixels
    b = np.asarray(plane_after, np.float32)
    if sigma > 0:
        a, b = ndi.gaussian_filter(a, sigma), ndi.gaussian_filter(b, sigma)
    ok = shared & (a > 0) & (b > 0)
    if ok.sum() < min_shared:
        return None, n
    return float(np.median(np.log(b[ok]) - np.log(a[ok]), overwrite_input=True)), n


def solve_gains(steps, tissue_voxels) -> np.ndarray:
    """Log gains ``g`` (one per section) from the boundary steps (``None`` = bridged).

    Least squares over all boundaries at once, anchored so that the
    tissue-weighted mean log gain is 0.
    """
    n = len(tissue_voxels)
    rows, rhs, w = [], [], []
    for s, d in enumerate(steps):
        r = np.zeros(n)
        r[s], r[s + 1] = -1.0, 1.0
        rows.append(r)
        rhs.append(0.0 if d is None else d)
        w.append(BRIDGE_WEIGHT if d is None else 1.0)
    weights = np.asarray(tissue_voxels, float)
    anchor = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1.0 / n)
    a = np.vstack(rows + [anchor]) if rows else anchor[None]
    b = np.asarray(rhs + [0.0])
    sw = np.sqrt(np.asarray(w + [1.0]))
    g, *_ = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)
    return g


def log_histogram(log_values) -> dict:
    """A histogram of log intensities on the fixed grid of :data:`HIST_BIN` (JSON-ready, a few kB)."""
    v = np.asarray(log_values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"first_bin": 0, "width": HIST_BIN, "counts": []}
    idx = np.floor(v / HIST_BIN).astype(np.int64)
    lo = int(idx.min())
    return {"first_bin": lo, "width": HIST_BIN, "counts": np.bincount(idx - lo).astype(int).tolist()}


def _dense(hists, sigma_bins: float = 2.0):
    """The histograms on one common bin grid, each normalised and smoothed: ``(first_bin, (S, bins))``."""
    used = [h for h in hists if h and h["counts"]]
    lo = min(h["first_bin"] for h in used)
    hi = max(h["first_bin"] + len(h["counts"]) for h in used)
    pad = 64
    out = np.zeros((len(hists), hi - lo + 2 * pad))
    for i, h in enumerate(hists):
        if h and h["counts"]:
            c = np.asarray(h["counts"], np.float64)
            out[i, h["first_bin"] - lo + pad:h["first_bin"] - lo + pad + c.size] = c / c.sum()
    return lo - pad, ndi.gaussian_filter1d(out, sigma_bins, axis=1, mode="constant")


def _shift(row: np.ndarray, bins: float) -> np.ndarray:
    """``row`` moved by ``bins`` (fractional, linear interpolation; zeros come in)."""
    x = np.arange(row.size)
    return np.interp(x - bins, x, row, left=0.0, right=0.0)


def histogram_offsets(hists, gains, *, max_offset: float = 0.3, passes: int = 3) -> np.ndarray:
    """Log offset of each section's histogram (after dividing by ``exp(gains)``) from the others' pool.

    Positive: the section is brighter than the rest.  Each section is
    cross-correlated with the pooled histogram of all the other sections
    (each shifted by its gain and current offset) within ``+-max_offset``,
    with a parabola through the peak for the sub-bin part; ``passes``
    rounds re-pool with the offsets found.  Sections without a histogram
    get NaN.
    """
    n = len(hists)
    offsets = np.full(n, np.nan)
    have = [i for i, h in enumerate(hists) if h and h["counts"] and sum(h["counts"]) > 0]
    if len(have) < 2:
        return offsets
    _, dense = _dense(hists)
    g = np.asarray(gains, np.float64) / HIST_BIN
    cur = np.zeros(n)
    m = int(np.ceil(max_offset / HIST_BIN))
    for _ in range(passes):
        moved = np.array([_shift(dense[i], -(g[i] + cur[i])) if i in have else np.zeros(dense.shape[1])
                          for i in range(n)])
        pool = moved.sum(axis=0)
        new = cur.copy()
        for i in have:
            ref = pool - moved[i]
            own = _shift(dense[i], -g[i])
            lags = np.arange(-m, m + 1)
            score = np.array([np.dot(_shift(own, -k), ref) for k in lags])
            j = int(np.argmax(score))
            frac = 0.0
            if 0 < j < len(lags) - 1:
                a, b, c = score[j - 1], score[j], score[j + 1]
                den = a - 2 * b + c
                frac = 0.5 * (a - c) / den if den < 0 else 0.0
            new[i] = lags[j] + frac
        if np.allclose(new, cur, atol=1e-3):
            cur = new
            break
        cur = new
    offsets[have] = cur[have] * HIST_BIN
    return offsets


def drift_correction(offsets, centres, weights, *, sections_per_span: int = 8, iterations: int = 10) -> np.ndarray:
    """The slow part of the histogram offsets, as a log gain correction per section (tissue-weighted mean 0).

    A Huber-weighted least-squares fit of ``offsets`` against the sections'
    centres: a straight line for up to ``sections_per_span`` sections, a
    cubic B-spline with ``len / sections_per_span`` spans beyond.  Sections
    without an offset (NaN) take the fitted curve.  The correction is then
    shrunk by ``max(0, 1 - 9 / z^2)``, with ``z^2`` its weighted energy over
    what the residual scatter would give its free coefficients: a drift the
    offsets show at less than about 3 sigma (the sections' composition
    moves their histograms too) is left alone, a clear one is corrected.
    """
    from .bspline import basis_matrix

    o = np.asarray(offsets, np.float64)
    c = np.asarray(centres, np.float64)
    w = np.asarray(weights, np.float64)
    n = o.size
    ok = np.isfinite(o) & (w > 0)
    if ok.sum() < 3:
        return np.zeros(n)
    t = (c - c.min()) / max(c.max() - c.min(), 1e-12)
    spans = n // sections_per_span
    if spans <= 1:
        basis = np.stack([np.ones(n), t - 0.5], axis=1)
    else:
        basis = basis_matrix(t * spans, spans + 3, 3)
    wt = w / w[ok].max()
    robust = np.ones(n)
    coef = np.zeros(basis.shape[1])
    for _ in range(iterations):
        ww = np.where(ok, wt * robust, 0.0)
        a = basis * np.sqrt(ww)[:, None]
        coef, *_ = np.linalg.lstsq(a, np.where(ok, o, 0.0) * np.sqrt(ww), rcond=None)
        r = np.where(ok, o - basis @ coef, 0.0)
        sigma = 1.4826 * float(np.median(np.abs(r[ok])))
        if sigma <= 0:
            break
        robust = np.minimum(1.0, 2.5 * sigma / np.maximum(np.abs(r), 1e-300))
    corr = basis @ coef
    wsum = np.where(ok, wt, 0.0)
    corr = corr - np.average(corr, weights=wsum)
    # keep only as much of the drift as the offsets can tell from their own scatter: the correction's
    # weighted energy against what noise of the residuals' size would give its free coefficients (z^2
    # summed), shrunk by max(0, 1 - 9 / z^2) (nothing below 3 sigma, nearly all well above)
    dof = int(ok.sum()) - basis.shape[1]
    if dof < 1:
        return np.zeros(n)
    r = np.where(ok, o - basis @ coef, 0.0)
    ww = wsum * robust
    sigma2 = float(np.sum(ww * r ** 2)) / dof          # residual variance per unit weight
    free = basis.shape[1] - 1                         # the constant is the anchor's, not the drift's
    z2 = float(np.sum(ww * corr ** 2)) / max(sigma2 * free, 1e-300)
    return corr * max(0.0, 1.0 - 9.0 / z2) if z2 > 0 else corr * 0.0


def level_bridged_runs(hists, gains, bridged, weights) -> np.ndarray:
    """Log gain shifts that level the runs of sections a bridged boundary separates, by their histograms.

    A bridged boundary has no measured step (too little shared tissue: a
    damaged or missing slab), so the chain fixes only the gains *within*
    each run of measured boundaries.  Each run is moved as a whole by the
    tissue-weighted mean of its sections' histogram offsets (searched within
    ``+-BRIDGED_RANGE``), the largest run staying where it is.  Zero when no
    boundary is bridged.
    """
    n = len(hists)
    run = np.concatenate([[0], np.cumsum(np.asarray(bridged, bool))]).astype(int) if n > 1 else np.zeros(1, int)
    shift = np.zeros(n)
    if run.max() == 0:
        return shift
    w = np.asarray(weights, np.float64)
    offsets = histogram_offsets(hists, gains, max_offset=BRIDGED_RANGE)
    level = np.zeros(run.max() + 1)
    for k in range(run.max() + 1):
        sel = (run == k) & np.isfinite(offsets) & (w > 0)
        if sel.any():
            level[k] = np.average(offsets[sel], weights=w[sel])
    sizes = np.bincount(run, weights=w)
    level -= level[int(np.argmax(sizes))]
    return level[run]
