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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["GAIN_ESTIMATORS", "GainParams", "boundary_steps_from_data", "solve_gains", "touching_step"]

#: Weight of the no-jump prior on a bridged boundary, relative to a measured one.
BRIDGE_WEIGHT = 1e-3


#: How a boundary's step is measured (see the module docstring).
GAIN_ESTIMATORS = ("touching", "planes")


@dataclass(frozen=True)
class GainParams:
    enabled: bool = True
    estimator: str = "planes"     # 'touching' or 'planes'
    smoothing_px: float = 8.0     # 'touching': Gaussian sigma (pixels) applied to each touching plane
    boundary_planes: int = 3      # 'planes': k planes on each side of a boundary
    min_shared: int = 200         # shared tissue pixels below which a boundary is bridged

    def __post_init__(self):
        if self.estimator not in GAIN_ESTIMATORS:
            raise ValueError(f"gain estimator must be one of {GAIN_ESTIMATORS}; got {self.estimator!r}")
        if not self.smoothing_px >= 0:
            raise ValueError(f"smoothing_px must be >= 0; got {self.smoothing_px}")
        if self.boundary_planes < 1:
            raise ValueError(f"boundary_planes must be >= 1; got {self.boundary_planes}")

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
