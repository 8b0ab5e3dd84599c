"""The global stage: section gains, then one N4 pass over the whole stack; its result is the *solution*.

Both read the sections' summaries (:mod:`octn4.global_summary`), which the
section tasks write in the workflow and :func:`section_summaries` makes
here, ``workers`` sections at a time, when none are given.
:func:`harmonise_gains` measures the step at every section boundary on the
end planes that touch it and solves one gain per section
(:mod:`octn4.gains`); :func:`fit_global` fits one field to the 'mean' fit
grid of ``input / section_bias`` combined from the summaries' block sums
with the gains (the 'subsample' grid is read from the volume plane by
plane), so given summaries the stage reads no voxel of the volume.
:func:`solve_global` returns the solution (``global.json``) that every apply
task and the finishing step read (:mod:`octn4.apply`).
"""

from __future__ import annotations

import logging
import math
import tempfile
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
from .global_summary import Summary, combined_grid, read_summaries, section_summary, write_summary
from .io import Volume, open_mask, open_volume, read_attrs, write_json
from .n4 import fit_bias
from .params import N4Params, shrink_factors
from .progress import progress
from .provenance import provenance
from .section_stage import read_assembled
from .sections import section_bounds
from .workers import worker_pool

if TYPE_CHECKING:
    from .pipeline import RunConfig

log = logging.getLogger("octn4")

__all__ = ["harmonise_gains", "section_summaries", "fit_global", "solve_global", "stage_global_files",
           "stage_parameters"]


def harmonise_gains(vol: Volume, msk: Volume, records, *, params: GainParams,
                    mask_sigma: float = defaults.MASK.smoothing_sigma, summaries=None):
    """One gain per section from the tissue at each boundary (see :mod:`octn4.gains`).

    Reads the two planes that touch each boundary ('touching') or
    ``2 * boundary_planes`` planes ('planes'), from the sections' summaries
    (:mod:`octn4.global_summary`) when given, else from the volume.  Returns
    the records with ``gain_log`` set, and a per-boundary report.
    """
    if summaries is None:
        thresholds = mask_plane_thresholds(msk)
        summaries = [section_summary(vol, msk, r, global_params=None, gains=params, mask_sigma=mask_sigma,
                                     thresholds=thresholds) for r in records]
    steps, report = [], []
    for r, a, b in zip(records[1:], summaries[:-1], summaries[1:]):
        before, after = np.asarray(a["tail"]), np.asarray(b["head"])
        last, first = np.asarray(a["tail_tissue"]), np.asarray(b["head_tissue"])
        if params.estimator == "touching":
            d, n = touching_step(before[-1], after[0], last, first, sigma=params.smoothing_px,
                                 min_shared=params.min_shared)
        else:
            d, n = boundary_steps_from_data(before, after, last, first, min_shared=params.min_shared)
        steps.append(d)
        report.append({"z": int(r["z_start"]), "step_log": d, "shared_tissue_pixels": n, "bridged": d is None})
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


def _summary_task(job):
    input_path, mask_path, voxel_size, record, global_params, gains, mask_sigma, out = job
    vol = open_volume(input_path, voxel_size=voxel_size)
    sm = section_summary(vol, open_mask(mask_path, vol), record, global_params=global_params, gains=gains,
                         mask_sigma=mask_sigma)
    return sm if out is None else str(write_summary(sm, out))


def section_summaries(vol: Volume, msk: Volume, records, *, global_params: N4Params, gains: GainParams,
                      mask_sigma: float = defaults.MASK.smoothing_sigma, workers: int = 1, out_dir=None):
    """Every section's summary (:mod:`octn4.global_summary`), ``workers`` sections at a time; written under
    ``out_dir`` and opened from there (memory-mapped) when given, else kept in memory."""
    out = None if out_dir is None else Path(out_dir)
    jobs = [(vol.path, msk.path, vol.voxel_size, r, global_params, gains, mask_sigma,
             None if out is None else out / f"section_{r['index']}") for r in records]
    done = []
    with progress(len(jobs), "global N4: section summaries") as advance:
        if workers > 1 and len(jobs) > 1 and "nifti" not in (vol.format, msk.format):
            with worker_pool(workers, f"a process summarising a section for the global pass was killed (most "
                                      f"often out of memory: {workers} workers each held the chunk rows under "
                                      "one Z block and a section's end planes); use fewer --workers or more "
                                      "memory") as pool:
                for got in pool.map(_summary_task, jobs):
                    done.append(got)
                    advance()
        else:
            thresholds = mask_plane_thresholds(msk)
            for job in jobs:
                sm = section_summary(vol, msk, job[3], global_params=global_params, gains=gains,
                                     mask_sigma=mask_sigma, thresholds=thresholds)
                done.append(sm if out is None else str(write_summary(sm, job[-1])))
                advance()
    return [Summary(d) if isinstance(d, str) else d for d in done]


def fit_global(vol: Volume, msk: Volume, records, *, params: N4Params, threads: int = 1,
               engine: str = "octn4", device: str = "cpu", workers: int = 1, summaries=None) -> FitResult:
    """Global N4 on a shrunk copy of ``input / section_bias``: the 'mean' grid combined from the sections'
    summaries (made here, in ``workers`` processes, when not given), the 'subsample' grid read plane by
    plane."""
    fields = section_fields(records)
    s = shrink_factors(vol.shape, vol.voxel_size, params)
    (oz, mz), (oy, my), (ox, mx) = (shrink_grid(n, k) for n, k in zip(vol.shape, s))
    iy, ix = oy + s[1] * np.arange(my), ox + s[2] * np.arange(mx)
    ys, xs = slice(oy, oy + s[1] * my, s[1]), slice(ox, ox + s[2] * mx, s[2])
    if params.shrink_mode == "mean":
        if summaries is None:
            summaries = section_summaries(vol, msk, records, global_params=params, gains=None, workers=workers)
        sub, sub_mask = combined_grid(summaries, [f[3] for f in fields], vol.shape, s)
    else:
        sub, sub_mask = np.empty((mz, my, mx), np.float32), np.empty((mz, my, mx), bool)
        with progress(mz, "global N4: reading shrunk copy") as advance:
            for j in range(mz):
                z = oz + s[0] * j
                f = section_log_field(fields, [z], iy, ix)
                sub[j] = vol.read(z, z + 1, ys, xs)[0] / np.exp(f[0])
                sub_mask[j] = msk.read(z, z + 1, ys, xs)[0] > 0
                advance()
    log.info("global N4: fitting on a %s grid (shrink %s), %d tissue voxels", sub.shape, s, int(sub_mask.sum()))
    return fit_bias(sub, sub_mask, full_shape=vol.shape, shrink=s, voxel_size=vol.voxel_size,
                    params=params, threads=threads, engine=engine, device=device)


def solve_global(vol: Volume, msk: Volume, records, *, config: RunConfig, attrs: dict, timings: dict,
                 summaries=None, work_dir=None) -> dict:
    """Section gains and the global fit: the *solution* every apply task and the finishing step read
    (:mod:`octn4.apply`): the records with their gains, the global field, the gain report, the provenance.

    Both read the sections' summaries (:mod:`octn4.global_summary`, one per record, in order); those not
    given (``summaries`` None, or None in its place) are made here from the volume (under ``work_dir``
    when given), ``config.workers`` sections at a time.
    """
    have = list(summaries) if summaries is not None else [None] * len(records)
    todo = [r for r, sm in zip(records, have) if sm is None]
    if todo:
        t0 = time.perf_counter()
        made = iter(section_summaries(vol, msk, todo, global_params=config.global_n4, gains=config.gains,
                                      mask_sigma=config.mask.smoothing_sigma, workers=config.workers,
                                      out_dir=work_dir))
        have = [sm if sm is not None else next(made) for sm in have]
        timings["summaries"] = time.perf_counter() - t0
    summaries = have
    gain_report = []
    if config.gains.enabled and len(records) > 1:
        t0 = time.perf_counter()
        records, gain_report = harmonise_gains(vol, msk, records, params=config.gains,
                                               mask_sigma=config.mask.smoothing_sigma, summaries=summaries)
        timings["gains"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gfit = fit_global(vol, msk, records, params=config.global_n4, threads=config.total_threads,
                      engine=config.engine, device=config.device, workers=config.workers, summaries=summaries)
    timings["global_fit"] = time.perf_counter() - t0
    attrs = dict(attrs, global_fit=gfit.summary(), gain_boundaries=gain_report,
                 section_fits=[dict(r["fit"], index=r["index"], gain_log=r.get("gain_log", 0.0),
                                    gain_anchor_log=r.get("gain_anchor_log")) for r in records])
    return {"shape": list(vol.shape), "sections": records, "global": gfit.field.to_dict(),
            "global_fit": gfit.summary(), "gain_boundaries": gain_report, "provenance": attrs,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}


def stage_global_files(input_path, mask_path, sections_json, out_json, *, config: RunConfig,
                       summaries=None) -> dict:
    """The global stage from files: input, mask, assembled section records -> the solution ``out_json``.

    With ``summaries`` (the sections' summary folders) neither the gains nor the 'mean' fit grid read the
    volume; without, they are made from it first.
    """
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
    if summaries:
        summaries = read_summaries(summaries, records, vol_shape=vol.shape, voxel_size=vol.voxel_size,
                                   global_params=config.global_n4, gains=config.gains,
                                   mask_sigma=config.mask.smoothing_sigma)
    with tempfile.TemporaryDirectory(prefix=".octn4-summaries-", dir=out_json.parent) as work:
        solution = solve_global(vol, msk, records, config=config, attrs=attrs, timings=timings,
                                summaries=summaries or None, work_dir=Path(work))
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

