"""The global stage: section gains, then one N4 pass over the whole stack; its result is the *solution*.

:func:`harmonise_gains` measures the step at every section boundary on
the planes that touch it and solves one gain per section
(:mod:`octn4.gains`); :func:`fit_global` fits one field to a shrunk copy of
``input / section_bias``, built one Z block at a time (in ``workers``
processes), so the stage reads a fit grid's worth of planes, never holds the
volume.  :func:`solve_global` returns the solution (``global.json``) that
every apply task and the finishing step read (:mod:`octn4.apply`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import defaults
from .apply import mask_plane_thresholds, section_fields, section_log_field
from .bspline import shrink_grid
from .errors import InputError
from .fit_result import FitResult
from .gains import (
    GainParams,
    boundary_steps_from_data,
    drift_correction,
    histogram_offsets,
    level_bridged_runs,
    solve_gains,
    touching_step,
)
from .io import Volume, open_mask, open_volume, read_attrs, write_json
from .mask import above_in_plane
from .n4 import fit_bias
from .params import N4Params, shrink_factors
from .progress import progress
from .provenance import provenance
from .section_stage import read_assembled
from .sections import section_bounds
from .shrink import block_indices, block_mean_grid
from .workers import worker_pool

if TYPE_CHECKING:
    from .pipeline import RunConfig

log = logging.getLogger("octn4")

__all__ = ["harmonise_gains", "fit_global", "solve_global", "stage_global_files", "stage_parameters"]


def harmonise_gains(vol: Volume, msk: Volume, records, *, params: GainParams,
                    mask_sigma: float = defaults.MASK.smoothing_sigma):
    """One gain per section from the tissue at each boundary (see :mod:`octn4.gains`).

    Reads the two planes that touch each boundary ('touching') or
    ``2 * boundary_planes`` planes ('planes').  Returns the records
    with ``gain_log`` set, and a per-boundary report.
    """
    fields = section_fields(records)
    k = params.boundary_planes if params.estimator == "planes" else 1
    thresholds = mask_plane_thresholds(msk)
    steps, report = [], []
    for (a0, a1, fa, _), (b0, b1, fb, _) in zip(fields[:-1], fields[1:]):
        ka, kb = min(k, a1 - a0), min(k, b1 - b0)
        raw_before, raw_after = vol.read(a1 - ka, a1), vol.read(b0, b0 + kb)
        before = raw_before / np.exp(fa.evaluate(np.arange(a1 - ka, a1) - a0))
        after = raw_after / np.exp(fb.evaluate(np.arange(kb)))
        last, first = msk.read(a1 - 1, a1)[0] > 0, msk.read(b0, b0 + 1)[0] > 0
        if thresholds is not None:
            # tissue by intensity in each touching plane: the mask's Z smoothing and closing can carry one
            # section's tissue into the neighbour's end plane (a damaged or missing slab)
            last &= above_in_plane(raw_before[-1:], thresholds[a1 - 1:a1], mask_sigma)[0]
            first &= above_in_plane(raw_after[:1], thresholds[b0:b0 + 1], mask_sigma)[0]
        if params.estimator == "touching":
            d, n = touching_step(before[-1], after[0], last, first, sigma=params.smoothing_px,
                                 min_shared=params.min_shared)
        else:
            d, n = boundary_steps_from_data(before, after, last, first, min_shared=params.min_shared)
        steps.append(d)
        report.append({"z": a1, "step_log": d, "shared_tissue_pixels": n, "bridged": d is None})
    weights = [r["fit"]["fit_voxels"] * math.prod(r["fit"]["shrink"]) for r in records]
    gains = solve_gains(steps, weights)
    anchor = None
    if params.anchor == "histogram":
        hists = [r.get("histogram") for r in records]
        if all(h is not None for h in hists):
            start = gains.copy()
            # sections joined only by bridged boundaries: the chain says nothing about their relative level,
            # so each run of measured boundaries is levelled as a whole by its sections' histograms
            gains = gains + level_bridged_runs(hists, gains, [d is None for d in steps], weights)
            offsets = histogram_offsets(hists, gains, max_offset=params.anchor_range)
            centres = [(r["z_start"] + r["z_stop"]) / 2 for r in records]
            gains = gains + drift_correction(offsets, centres, weights, sections_per_span=params.anchor_sections)
            anchor = [float(c) for c in gains - start]
        else:
            log.warning("gains: section records without histograms (made by an older octn4); gains not anchored")
    for rep in report:
        if rep["bridged"]:
            how = "levelled by the sections' histograms" if anchor is not None else "no step assumed"
            log.warning("gains: boundary at plane %d shares only %d tissue pixels; bridged (%s)",
                        rep["z"], rep["shared_tissue_pixels"], how)
    return [dict(r, gain_log=float(g), gain_anchor_log=None if anchor is None else anchor[i])
            for i, (r, g) in enumerate(zip(records, gains))], report


def _global_grid_task(job):
    input_path, mask_path, voxel_size, records, blocks, s = job
    vol = open_volume(input_path, voxel_size=voxel_size)
    fields = section_fields(records)
    return block_mean_grid(vol, open_mask(mask_path, vol), blocks, s,
                            log_field=lambda zb: section_log_field(fields, zb))


def _global_grid_in_parallel(vol: Volume, msk: Volume, records, blocks, s, workers: int, advance):
    """:func:`block_mean_grid` of the global pass over runs of consecutive Z blocks in ``workers``
    processes: each block's mean is computed alone, so the grid is the one-process grid, bit for bit."""
    runs = [r for r in np.array_split(np.arange(len(blocks)), min(len(blocks), 2 * workers)) if r.size]
    jobs = [(vol.path, msk.path, vol.voxel_size, records, blocks[r], s) for r in runs]
    imgs, fits = [], []
    with worker_pool(workers, f"a process reading the global fit grid was killed (most often out of memory: "
                              f"{workers} workers each held the chunk rows under one Z block); use fewer --workers "
                              "or more memory") as pool:
        for r, (img, fit) in zip(runs, pool.map(_global_grid_task, jobs)):
            imgs.append(img)
            fits.append(fit)
            advance(len(r))
    return np.concatenate(imgs), np.concatenate(fits)


def fit_global(vol: Volume, msk: Volume, records, *, params: N4Params, threads: int = 1,
               engine: str = "octn4", device: str = "cpu", workers: int = 1) -> FitResult:
    """Global N4 on a shrunk copy of ``input / section_bias``, read plane by plane (the 'mean' grid's Z
    blocks in ``workers`` processes when the input and mask are Zarr)."""
    fields = section_fields(records)
    s = shrink_factors(vol.shape, vol.voxel_size, params)
    (oz, mz), (oy, my), (ox, mx) = (shrink_grid(n, k) for n, k in zip(vol.shape, s))
    iy, ix = oy + s[1] * np.arange(my), ox + s[2] * np.arange(mx)
    ys, xs = slice(oy, oy + s[1] * my, s[1]), slice(ox, ox + s[2] * mx, s[2])
    with progress(mz, "global N4: reading shrunk copy") as advance:
        blocks = block_indices(vol.shape[0], s[0])
        if params.shrink_mode == "mean" and workers > 1 and mz > 1 and "nifti" not in (vol.format, msk.format):
            sub, sub_mask = _global_grid_in_parallel(vol, msk, records, blocks, s, workers, advance)
        elif params.shrink_mode == "mean":
            sub, sub_mask = block_mean_grid(vol, msk, blocks, s,
                                             log_field=lambda zb: section_log_field(fields, zb), advance=advance)
        else:
            sub, sub_mask = np.empty((mz, my, mx), np.float32), np.empty((mz, my, mx), bool)
            for j in range(mz):
                z = oz + s[0] * j
                f = section_log_field(fields, [z], iy, ix)
                sub[j] = vol.read(z, z + 1, ys, xs)[0] / np.exp(f[0])
                sub_mask[j] = msk.read(z, z + 1, ys, xs)[0] > 0
                advance()
    log.info("global N4: fitting on a %s grid (shrink %s), %d tissue voxels", sub.shape, s, int(sub_mask.sum()))
    return fit_bias(sub, sub_mask, full_shape=vol.shape, shrink=s, voxel_size=vol.voxel_size,
                    params=params, threads=threads, engine=engine, device=device)


def solve_global(vol: Volume, msk: Volume, records, *, config: RunConfig, attrs: dict, timings: dict) -> dict:
    """Section gains and the global fit: the *solution* every apply task and the finishing step read
    (:mod:`octn4.apply`): the records with their gains, the global field, the gain report, the provenance."""
    gain_report = []
    if config.gains.enabled and len(records) > 1:
        t0 = time.perf_counter()
        records, gain_report = harmonise_gains(vol, msk, records, params=config.gains,
                                               mask_sigma=config.mask.smoothing_sigma)
        timings["gains"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gfit = fit_global(vol, msk, records, params=config.global_n4, threads=config.total_threads,
                      engine=config.engine, device=config.device, workers=config.workers)
    timings["global_fit"] = time.perf_counter() - t0
    attrs = dict(attrs, global_fit=gfit.summary(), gain_boundaries=gain_report,
                 section_fits=[dict(r["fit"], index=r["index"], gain_log=r.get("gain_log", 0.0),
                                    gain_anchor_log=r.get("gain_anchor_log")) for r in records])
    return {"shape": list(vol.shape), "sections": records, "global": gfit.field.to_dict(),
            "global_fit": gfit.summary(), "gain_boundaries": gain_report, "provenance": attrs,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}


def stage_global_files(input_path, mask_path, sections_json, out_json, *, config: RunConfig) -> dict:
    """The global stage from files: input, mask, assembled section records -> the solution ``out_json``."""
    t_start = time.perf_counter()
    out_json = Path(out_json)
    if out_json.exists() and not config.overwrite:
        raise InputError("output already exists; pass --overwrite to replace it", out_json)
    vol = open_volume(input_path, voxel_size=config.voxel_size)
    msk = open_mask(mask_path, vol)
    records = read_assembled(sections_json, vol)
    bounds = [[r["z_start"], r["z_stop"]] for r in records]
    attrs = provenance("global", vol, stage_parameters(config, msk, records), engine=config.engine,
                       device=config.device, extra={"sections": bounds, "stages": _stage_records(msk, records)})
    timings: dict[str, float] = {}
    solution = solve_global(vol, msk, records, config=config, attrs=attrs, timings=timings)
    solution["timings_s"]["global_total"] = round(time.perf_counter() - t_start, 3)
    write_json(solution, out_json)
    return solution


def stage_parameters(config: RunConfig, msk: Volume, records) -> dict:
    """The parameters the run's stages really used, for the global stage's outputs.

    ``config`` holds only the global stage's own options (gains, global N4,
    output); the mask's and the sections' come from the records those stages
    wrote (the mask's attributes, each section record's provenance), and the
    section layout from the records themselves.
    """

    d = config.as_dict()
    sizes = [r["z_stop"] - r["z_start"] for r in records]
    equal = section_bounds(msk.shape[0], n_sections=len(records)) == [(r["z_start"], r["z_stop"]) for r in records]
    d.update(n_sections=len(records), planes=None if equal else sizes, workers=None)
    try:
        mask_params = read_attrs(msk.path).get("parameters", {}).get("mask")
    except (OSError, ValueError):
        mask_params = None
    d["mask"] = mask_params          # None: a mask made elsewhere, without octn4's record
    per_section = [r.get("provenance", {}).get("parameters", {}).get("section_n4") for r in records]
    d["section_n4"] = per_section[0] if all(p == per_section[0] for p in per_section) else per_section
    sec = [r.get("provenance", {}) for r in records]
    d["section_engine"] = _common([p.get("engine") for p in sec])
    d["section_device"] = _common([p.get("device") for p in sec])
    return d


def _common(values):
    """The one value all entries share, else the list."""
    return values[0] if all(v == values[0] for v in values) else values


def _stage_records(msk: Volume, records) -> dict:
    """Who made the mask and each section record: version, time, command (from their own provenance)."""

    keys = ("octn4_version", "created", "command", "engine", "device")
    try:
        m = read_attrs(msk.path)
    except (OSError, ValueError):
        m = {}
    return {"mask": {k: m.get(k) for k in keys[:3]},
            "sections": [dict({k: r.get("provenance", {}).get(k) for k in keys}, index=r["index"]) for r in records]}

