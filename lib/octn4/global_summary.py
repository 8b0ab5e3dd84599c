"""What the global stage needs from one section, in small form: a *section summary*.

The global stage needs two things from the volume: the tissue block means
of its fit grid (``input / section_bias``, :func:`octn4.shrink.block_mean_grid`)
and the section-corrected planes on each side of every boundary (the
gains, :mod:`octn4.gains`).  Both come from one section's planes and field
alone, except the section gains, which are one constant per section and are
applied when the summaries are combined.  So a section task writes, next to
its record, a folder that holds

``grid_sums.npy``, ``grid_counts.npy``
    for each Z block of the global pass's 'mean' fit grid that has planes in
    the section (``grid_blocks.npy``), the Y/X block sums of its tissue
    voxels divided by the section's field and their counts
    (:func:`octn4.shrink.block_tissue_sums`: float64, per pixel over the
    block's planes in order);
``head.npy``, ``tail.npy``, ``head_tissue.npy``, ``tail_tissue.npy``
    its first and last planes (``k`` each: 1 for the touching-plane gains,
    ``boundary_planes`` for the 'planes' estimator) divided by the field,
    and the tissue of the plane that touches the boundary (mask, and by
    intensity above the mask's plane threshold);
``summary.json``
    index, Z range, volume shape, the global grid's shrink factors and ``k``.

:func:`combined_grid` adds the block sums of a Z block that straddles two
sections in section order, each scaled by its section's gain, so the global
task reads megabytes (the fit grid's sums, two planes per boundary), not
the volume.  A block inside one section gets the one-process grid's mean;
a straddling block differs from it only by the order of float64 additions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import __version__, defaults
from .apply import mask_plane_thresholds
from .bspline import BSplineField
from .errors import InputError
from .gains import GainParams
from .io import ForwardReader, Volume
from .mask import above_in_plane
from .params import N4Params, shrink_factors
from .shrink import block_indices, block_mean_from_sums, block_tissue_sums

__all__ = ["end_planes", "section_summary", "write_summary", "read_summaries", "combined_grid", "Summary"]

_ARRAYS = ("grid_blocks", "grid_sums", "grid_counts", "head", "tail", "head_tissue", "tail_tissue")


def end_planes(gains: GainParams | None) -> int:
    """How many planes of each end the gains estimator reads (none without gains)."""
    if gains is None:
        return 0
    return gains.boundary_planes if gains.estimator == "planes" else 1


def _grid_shrink(vol_shape, voxel_size, params: N4Params):
    """The global grid's shrink factors, or None when the global pass does not fit block means."""
    return shrink_factors(tuple(vol_shape), voxel_size, params) if params.shrink_mode == "mean" else None


def section_summary(vol: Volume, msk: Volume, record: dict, *, global_params: N4Params | None,
                    gains: GainParams | None,
                    mask_sigma: float = defaults.MASK.smoothing_sigma, thresholds=None) -> dict:
    """One section's summary (arrays and meta, see the module docstring), read from its own planes.

    ``global_params`` None: no grid sums; ``gains`` None: no end planes.  ``thresholds``: the mask's plane
    thresholds (read from the mask's attributes when not given).
    """
    z0, z1 = int(record["z_start"]), int(record["z_stop"])
    field = BSplineField.from_dict(record["field"])
    out = {"meta": {"index": int(record["index"]), "z_start": z0, "z_stop": z1, "shape": list(vol.shape),
                    "shrink": None, "end_planes": end_planes(gains), "mask_sigma": float(mask_sigma),
                    "version": __version__}}
    s = None if global_params is None else _grid_shrink(vol.shape, vol.voxel_size, global_params)
    vol_rows, msk_rows = ForwardReader(vol), ForwardReader(msk, tissue=True)
    ids, sums, counts = [], [], []
    if s is not None:
        out["meta"]["shrink"] = [int(k) for k in s]
        for j, zb in enumerate(block_indices(vol.shape[0], s[0])):
            mine = zb[(zb >= z0) & (zb < z1)]
            if not mine.size:
                continue
            planes = vol_rows.read_planes(mine) / np.exp(field.evaluate(mine - z0))
            vs, ns = block_tissue_sums(planes, msk_rows.read_planes(mine), s[1:], vol.shape[1:])
            ids.append(j)
            sums.append(vs)
            counts.append(ns)
    my, mx = (sums[0].shape if sums else (0, 0))
    out["grid_blocks"] = np.asarray(ids, np.int64)
    out["grid_sums"] = np.asarray(sums, np.float64).reshape(len(ids), my, mx)
    out["grid_counts"] = np.asarray(counts, np.int64).reshape(len(ids), my, mx)
    k = min(end_planes(gains), z1 - z0)
    if k and thresholds is None:
        thresholds = mask_plane_thresholds(msk)
    for name, a in (("head", z0), ("tail", z1 - k)):
        if not k:
            out[name] = np.zeros((0,) + tuple(vol.shape[1:]), np.float32)
            out[f"{name}_tissue"] = np.zeros(tuple(vol.shape[1:]), bool)
            continue
        raw = vol.read(a, a + k)
        out[name] = (raw / np.exp(field.evaluate(np.arange(a, a + k) - z0))).astype(np.float32)
        t = z0 if name == "head" else z1 - 1          # the plane that touches the boundary
        i = t - a
        tissue = msk.read_tissue(t, t + 1)[0]
        if thresholds is not None:
            # tissue by intensity: the mask's Z smoothing and closing can carry a neighbour's tissue into
            # this section's end plane (a damaged or missing slab)
            tissue &= above_in_plane(raw[i:i + 1], thresholds[t:t + 1], mask_sigma)[0]
        out[f"{name}_tissue"] = tissue
    return out


def write_summary(summary: dict, path) -> Path:
    """Write a summary folder under a temporary name, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", summary[name])
        (tmp / "summary.json").write_text(json.dumps(summary["meta"], indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class Summary:
    """A summary on disk; its arrays are memory-mapped when first used (a whole brain's plane is 100s of MB)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "summary.json").read_text())
            missing = [n for n in _ARRAYS if not (self.path / f"{n}.npy").is_file()]
        except (OSError, ValueError) as exc:
            raise InputError(f"not an octn4 section summary ({exc})", self.path) from None
        if missing or not isinstance(self.meta, dict) or "index" not in self.meta:
            raise InputError(f"not an octn4 section summary (no {', '.join(missing) or 'index'})", self.path)

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy", mmap_mode="r")


def read_summaries(paths, records, *, vol_shape, voxel_size, global_params: N4Params, gains: GainParams,
                   mask_sigma: float = defaults.MASK.smoothing_sigma):
    """The summaries of every section, in index order, checked against the records and the global pass's
    parameters (a summary made for another grid or gains estimator is refused, naming its folder)."""
    by_index = {}
    for p in paths:
        sm = Summary(p)
        if sm.meta["index"] in by_index:
            raise InputError(f"two summaries of section {sm.meta['index']}", sm.path)
        by_index[sm.meta["index"]] = sm
    s = _grid_shrink(vol_shape, voxel_size, global_params)
    want = {"shrink": None if s is None else [int(k) for k in s], "shape": list(vol_shape)}
    out = []
    for r in records:
        sm = by_index.pop(r["index"], None)
        if sm is None:
            raise InputError(f"no summary of section {r['index']} among {len(paths)} given", paths[0] if paths else
                             "summaries")
        got = {"z": [sm.meta.get("z_start"), sm.meta.get("z_stop")], "shrink": sm.meta.get("shrink"),
               "shape": sm.meta.get("shape")}
        if got["z"] != [r["z_start"], r["z_stop"]] or any(got[k] != v for k, v in want.items()):
            raise InputError(f"section summary made for another stack or global grid ({got}; expected planes "
                             f"{[r['z_start'], r['z_stop']]}, {want})", sm.path)
        if len(records) > 1 and sm.meta.get("mask_sigma") != float(mask_sigma):
            raise InputError(f"section summary's end-plane tissue smoothed by {sm.meta.get('mask_sigma')} "
                             f"pixels; the gains expect {float(mask_sigma)}", sm.path)
        if sm.meta.get("end_planes") != end_planes(gains) and len(records) > 1:
            raise InputError(f"section summary holds {sm.meta.get('end_planes')} end planes; the gains "
                             f"estimator {gains.estimator!r} reads {end_planes(gains)}", sm.path)
        out.append(sm)
    if by_index:
        raise InputError(f"summaries of sections the records lack: {sorted(by_index)}", paths[0])
    return out


def combined_grid(summaries, gains_log, vol_shape, s):
    """The global pass's fit grid ``(image, fitted)`` from the sections' summaries and gains."""
    blocks = block_indices(vol_shape[0], s[0])
    sy, sx = (block_indices(n, k).shape[1] for n, k in zip(vol_shape[1:], s[1:]))
    total = counts = None
    for sm, g in zip(summaries, gains_log):
        ids, sums, cnt = (np.asarray(sm[n]) for n in ("grid_blocks", "grid_sums", "grid_counts"))
        if total is None:
            shape = (len(blocks),) + sums.shape[1:]
            total, counts, seen = np.zeros(shape), np.zeros(shape, np.int64), np.zeros(len(blocks), bool)
        scale = np.exp(-np.float64(g))
        for row, j in enumerate(ids):
            part = sums[row] * scale if g else sums[row]
            if seen[j]:
                total[j] += part
            else:
                total[j] = part
            counts[j] += cnt[row]
            seen[j] = True
    if total is None or not seen.all():
        raise InputError("the section summaries do not cover the global fit grid's Z blocks", "summaries")
    return block_mean_from_sums(total, counts, blocks.shape[1] * sy * sx)
