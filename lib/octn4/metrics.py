"""Per-plane and per-section statistics of tissue intensity, before and after correction.

All statistics come from one streaming pass (:class:`PlaneStats` is fed Z
tiles) and are summarised per section from the per-plane profile, so their
memory does not grow with the volume.  Step and slope figures are in
natural-log units: a boundary step of 0.1 is a 10.5 % jump.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["PlaneStats", "median_in_place", "section_summary", "log_bias_error", "boundary_steps", "BOUNDARY_PLANES"]

#: Planes on each side of a boundary used for the step.
BOUNDARY_PLANES = 3


def median_in_place(v: np.ndarray) -> float:
    """``np.median(v)`` of a 1-D array of finite values, to the last bit, reordering ``v`` in place: one
    partition (no copy) and, for an even count, the largest value below the middle, averaged with the
    middle one as ``np.median`` averages them (in ``v``'s precision)."""
    n = v.size
    h = n // 2
    v.partition(h)
    if n % 2:
        return float(v[h])
    return float(np.mean(np.array([v[:h].max(), v[h]], dtype=v.dtype)))


class PlaneStats:
    """Accumulates per-plane tissue statistics of one or more named volumes."""

    def __init__(self, depth: int, names=("before", "after")):
        self.depth = depth
        self.count = np.zeros(depth, np.int64)
        self.area = 0
        self.median = {n: np.full(depth, np.nan) for n in names}
        self.sum = {n: np.zeros(depth) for n in names}
        self.sumsq = {n: np.zeros(depth) for n in names}

    def add(self, z0: int, tissue: np.ndarray, **volumes: np.ndarray) -> None:
        self.area = tissue.shape[1] * tissue.shape[2]
        for k in range(tissue.shape[0]):
            t = tissue[k]
            self.count[z0 + k] = int(t.sum())
            for name, vol in volumes.items():
                v = vol[k][t & (vol[k] > 0)]
                if v.size:                  # the sums before the median reorders v (their order is v's)
                    self.sum[name][z0 + k] = float(v.sum(dtype=np.float64))
                    self.sumsq[name][z0 + k] = float(np.square(v, dtype=np.float64).sum())
                    self.median[name][z0 + k] = median_in_place(v)

    def part(self, z0: int, z1: int) -> dict:
        """The statistics of planes ``z0..z1`` (JSON-ready, exact), for :meth:`merge`."""
        def values(a):
            return [None if not np.isfinite(v) else float(v) for v in a[z0:z1]]

        return {"planes": [int(z0), int(z1)], "area": int(self.area), "count": self.count[z0:z1].tolist(),
                **{f"{key}_{name}": values(getattr(self, key)[name])
                   for key in ("median", "sum", "sumsq") for name in self.median}}

    def merge(self, part: dict) -> None:
        """Take the planes of a :meth:`part` (one apply task's) into these statistics."""
        z0, z1 = part["planes"]
        self.area = max(self.area, int(part["area"]))
        self.count[z0:z1] = part["count"]
        for key, missing in (("median", np.nan), ("sum", 0.0), ("sumsq", 0.0)):
            for name in self.median:
                getattr(self, key)[name][z0:z1] = [missing if v is None else v for v in part[f"{key}_{name}"]]

    def profile(self) -> dict:
        """Per-plane tissue voxel counts and median intensities (JSON-ready)."""
        out = {"tissue_voxels": self.count.tolist()}
        for name, med in self.median.items():
            out[f"median_{name}"] = [None if not np.isfinite(v) else float(v) for v in med]
        return out


def _nanmedian(a):
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else math.nan


def _slope(log_med, dz_mm):
    ok = np.isfinite(log_med)
    if ok.sum() < 3:
        return math.nan
    z = np.arange(log_med.size)[ok] * dz_mm
    return float(np.polyfit(z, log_med[ok], 1)[0])


def boundary_steps(log_profile: np.ndarray, bounds, k: int = BOUNDARY_PLANES) -> list[float]:
    """``log`` step at each section boundary: first planes of s+1 minus last planes of s.

    ``log_profile`` is a per-plane log intensity (e.g. log of the plane
    medians); each side uses the median over ``k`` planes (fewer when a
    section is thinner).
    """
    steps = []
    for (a0, a1), (b0, b1) in zip(bounds[:-1], bounds[1:]):
        ka, kb = min(k, a1 - a0), min(k, b1 - b0)
        steps.append(_nanmedian(log_profile[b0:b0 + kb]) - _nanmedian(log_profile[a1 - ka:a1]))
    return steps


#: The flag of a section whose mask found no tissue threshold (too few positive voxels): the mask
#: takes its whole slab, agarose included, as tissue, so its correction is not to be trusted.
NEAR_EMPTY_FLAG = "near-empty: no tissue threshold, whole slab taken as tissue"


def section_summary(stats: PlaneStats, bounds, voxel_size, fits=None, near_empty=()) -> list[dict]:
    """Per-section figures before/after from the per-plane statistics; ``near_empty``: section indices
    whose mask found no tissue threshold (flagged)."""
    rows = []
    names = list(stats.median)
    logs = {n: np.log(stats.median[n]) for n in names}
    steps = {n: boundary_steps(logs[n], bounds) + [None] for n in names}
    for i, (z0, z1) in enumerate(bounds):
        n = int(stats.count[z0:z1].sum())
        row = {"index": i, "z_start": z0, "z_stop": z1, "planes": z1 - z0,
               "tissue_fraction": n / max(1, (z1 - z0) * stats.area)}
        for name in names:
            s, ss = stats.sum[name][z0:z1].sum(), stats.sumsq[name][z0:z1].sum()
            mean = s / n if n else math.nan
            var = (ss / n - mean * mean) if n else math.nan
            row[f"median_{name}"] = _nanmedian(stats.median[name][z0:z1])
            row[f"cv_{name}"] = math.sqrt(max(var, 0.0)) / mean if n and mean > 0 else math.nan   # no intensity: no CV
            row[f"depth_slope_per_mm_{name}"] = _slope(logs[name][z0:z1], voxel_size[0])
            row[f"step_to_next_{name}"] = steps[name][i]
        if fits is not None:
            row["n4"] = fits[i]
        flags = []
        if "cv_after" in row and row["cv_after"] > row["cv_before"] * 1.05:
            flags.append("cv increased")
        for key, label in (("step_to_next", "step increased"), ("depth_slope_per_mm", "depth slope increased")):
            b, a = row.get(f"{key}_before"), row.get(f"{key}_after")
            if b is not None and a is not None and np.isfinite(a) and abs(a) > abs(b) * 1.05 + 0.01:
                flags.append(label)
        if i in near_empty:
            flags.append(NEAR_EMPTY_FLAG)
        if z1 - z0 < 3:
            flags.append("fewer than 3 planes: depth slope not measured")
        if fits is not None and fits[i].get("status") != "fitted":
            flags.append(fits[i].get("status", "not fitted"))
        elif fits is not None and not fits[i].get("converged", True) and _still_changing(fits[i]):
            flags.append("n4 still changing")
        row["flags"] = flags
        rows.append(_clean(row))
    return rows


#: A fit that used all its iterations is flagged when its last CV (the field's change at the last
#: iteration) is above this, ITK's default convergence threshold.  octn4's defaults end each level by
#: its iteration count (docs/QUALITY.md), with a last CV of 1e-4 to 7e-4 on the benchmark stacks.
STILL_CHANGING_CV = 1e-3


def _still_changing(fit: dict) -> bool:
    conv = [c for c in fit.get("convergence") or [] if c is not None and math.isfinite(c)]
    return not conv or conv[-1] > STILL_CHANGING_CV


def _clean(d):
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def log_bias_error(est_bias, true_bias, where) -> float:
    """RMS of ``log est - log true`` over ``where`` after removing its mean (a constant gain)."""
    e = np.log(np.asarray(est_bias, np.float64)[where]) - np.log(np.asarray(true_bias, np.float64)[where])
    return float(np.sqrt(np.mean((e - e.mean()) ** 2)))
