"""The octn4 pipeline: mask -> N4 per section -> gains + global N4 -> apply per section -> finish.

Each stage is a function with file-in / file-out contracts, called both by
the local runner :func:`run` and by the ``bin/`` scripts that the Nextflow
processes run:

==============  ===========================================  ==========================
stage           reads                                        writes
==============  ===========================================  ==========================
mask            input volume                                 ``mask.ome.zarr``
section *i*     its own Z slab of input and mask             ``section_i.json`` (lattice)
assemble        all ``section_*.json``                       ``sections.json``
global          input, mask, ``sections.json``               ``global.json`` (the solution)
apply *i*       its chunk rows of input and mask, solution   ``part_i/`` (:mod:`octn4.apply`)
finish          every part, the solution                     ``corrected``, ``bias``,
                                                             ``fields.json``, ``metrics.json``
==============  ===========================================  ==========================

Fields travel as B-spline control lattices (a few kB), never as volumes:
the global fit builds its shrunk copy of ``input / section_bias`` one Z
block at a time (:mod:`octn4.shrink`), and each apply task evaluates
``bias = section_bias * global_bias`` tile by tile while writing
``corrected = input / bias`` for the chunk rows it owns.  Memory is bounded
by one section (per-section stage), the shrunk fit grid (global fit) and one
tile (apply), whatever the volume size.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__, defaults
from ._backend import DEVICES
from .apply import (
    apply_part,
    finish,
    mask_plane_thresholds,
    peak_rss_mib,
    read_solution,
    section_fields,
    section_log_field,
    tile_planes_for,
)
from .bspline import shrink_grid
from .depth import fit_depth_profiles
from .errors import InputError
from .gains import (
    GainParams,
    boundary_steps_from_data,
    drift_correction,
    histogram_offsets,
    level_bridged_runs,
    log_histogram,
    solve_gains,
    touching_step,
)
from .io import (
    ForwardReader,
    Volume,
    atomic_dir,
    open_volume,
    replace_path,
    scan_volume,
    validate_scan,
    write_json,
)
from .mask import (
    MaskParams,
    above_in_plane,
)
from .mask_stage import copy_mask, stage_mask
from .n4 import ENGINES, FitResult, N4Params, choose_device, fit_bias, fit_bias_batch, shrink_factors
from .progress import progress
from .sections import section_bounds
from .shrink import block_indices, block_mean_plane
from .workers import worker_pool

log = logging.getLogger("octn4")

__all__ = [
    "RunConfig", "run", "open_input", "stage_mask", "fit_section", "stage_section",
    "assemble_sections", "fit_global", "solve_global", "apply_parts", "stage_global", "provenance", "atomic_dir",
    "write_json", "stage_global_files", "stage_apply_files", "stage_finish_files", "volume_sections",
    "read_records",
]

#: Share of a GPU's free memory that one batch of section fits may plan to use (the rest: the section data
#: being read, CuPy's kernels and FFT plans, fragmentation).
BATCH_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline run depends on (recorded in every output)."""

    n_sections: int | None = None
    planes: tuple[int, ...] | None = None
    voxel_size: tuple[float, float, float] | None = None
    mask_path: str | None = None     # a tissue mask to use instead of computing one
    mask: MaskParams = defaults.MASK
    section_n4: N4Params = defaults.SECTION_N4
    global_n4: N4Params = defaults.GLOBAL_N4
    gains: GainParams = defaults.GAINS
    workers: int = 1
    threads: int = 0                 # total CPU threads; 0 = all cores
    output_format: str = "ome-zarr"  # or 'nifti'
    overwrite: bool = False
    check_log_scale: bool = True
    tile_mib: int = 1024
    engine: str = "octn4"
    device: str = "cpu"              # 'cpu', 'cuda' or 'auto'; resolved to 'cpu' or 'cuda' on creation
    batch_sections: int = 0          # sections per batched fit (octn4 engine); 0 = auto
    device_requested: str = field(default="cpu", init=False)   # what was asked for ('auto' included)
    device_choice: str | None = field(default=None, init=False)  # why 'auto' chose what it did

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {ENGINES}; got {self.engine!r}")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {DEVICES}; got {self.device!r}")
        # fail now, naming what is missing, rather than after the mask stage
        object.__setattr__(self, "device_requested", self.device)
        device, why = choose_device(self.device, self.engine)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "device_choice", why)
        if self.batch_sections < 0:
            raise InputError(f"batch_sections must be >= 0 (0 = auto); got {self.batch_sections}")
        if self.batch_sections > 1 and self.engine != "octn4":
            raise InputError("batched section fits need --engine octn4")
        if self.output_format not in ("ome-zarr", "nifti"):
            raise InputError(f"output format must be 'ome-zarr' or 'nifti'; got {self.output_format!r}")
        if self.workers < 1:
            raise InputError(f"workers must be >= 1; got {self.workers}")

    @property
    def total_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def section_batch(self, fit_grid_voxels: int) -> int:
        """Sections fitted together: as given, else 1 on the CPU (workers run sections in parallel) and,
        on a GPU, as many as fit in ``BATCH_MEMORY_SHARE`` of its free memory by the engine's measured
        memory model (:func:`octn4.engine.fit_memory_bytes`, every voxel counted as tissue)."""
        if self.batch_sections:
            return self.batch_sections
        if self.engine != "octn4" or self.device == "cpu":
            return 1
        from ._backend import device_free_bytes
        from .engine import fit_memory_bytes

        return max(1, int(BATCH_MEMORY_SHARE * device_free_bytes()) // fit_memory_bytes(max(1, fit_grid_voxels)))

    def bounds(self, vol: Volume):
        return volume_sections(vol, n_sections=self.n_sections, planes=self.planes)

    def as_dict(self) -> dict:
        return {
            "n_sections": self.n_sections if self.planes is None else len(self.planes),
            "planes": None if self.planes is None else list(self.planes),
            "voxel_size_override_mm": None if self.voxel_size is None else list(self.voxel_size),
            "mask_path": None if self.mask_path is None else os.path.abspath(self.mask_path),
            "mask": self.mask.as_dict(), "section_n4": self.section_n4.as_dict(),
            "global_n4": self.global_n4.as_dict(), "gains": self.gains.as_dict(),
            "workers": self.workers, "threads": self.total_threads,
            "output_format": self.output_format, "check_log_scale": self.check_log_scale,
            "engine": self.engine, "device": self.device, "device_requested": self.device_requested,
            "device_choice": self.device_choice, "batch_sections": self.batch_sections,
        }


# --------------------------------------------------------------------------- provenance


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "scikit-image", "SimpleITK", "zarr", "ome-zarr", "nibabel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def provenance(stage: str, vol: Volume, parameters: dict, *, engine=None, device=None, extra=None) -> dict:
    """What made an output: octn4 version, stage, input, parameters, engine, device, libraries."""
    d = {
        "octn4_version": __version__,
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "input": os.path.abspath(vol.path),
        "input_format": vol.format,
        "shape": list(vol.shape),
        "voxel_size_mm": list(vol.voxel_size),
        "voxel_size_source": vol.voxel_size_source,
        "engine": engine,
        "device": device,
        "parameters": parameters,
        "versions": library_versions(),
    }
    if extra:
        d.update(extra)
    return d


# --------------------------------------------------------------------------- stages


def volume_sections(vol: Volume, *, n_sections=None, planes=None):
    """Section Z ranges of ``vol``; errors name the volume's file."""
    try:
        return section_bounds(vol.shape[0], n_sections=n_sections, planes=planes)
    except InputError as exc:
        raise InputError(exc.problem, vol.path) from None


def open_input(path, *, voxel_size=None, check_log_scale=True, with_scan=False, workers: int = 1):
    """Open and validate the input (one streaming pass, ``workers`` processes); raise :class:`InputError` on
    bad data.

    Returns the volume, or ``(volume, scan)`` with ``with_scan`` (the scan's digest identifies the content).
    """
    vol = open_volume(path, voxel_size=voxel_size)
    scan = scan_volume(vol, workers=workers)
    validate_scan(scan, vol.path, check_log_scale=check_log_scale)
    return (vol, scan) if with_scan else vol


def _open_mask(path, vol: Volume) -> Volume:
    m = open_volume(path, voxel_size=vol.voxel_size)
    if m.shape != vol.shape:
        raise InputError(f"mask shape {m.shape} does not match the volume shape {vol.shape}", path)
    return m


def _section_sampling(vol: Volume, bounds, index: int, params: N4Params):
    """Where a section's fit grid samples the volume: ``(shape, shrink, zs, ys, xs)`` (nothing is read)."""
    if not 0 <= index < len(bounds):
        raise InputError(f"section index {index} is out of range (0..{len(bounds) - 1})")
    z0, z1 = bounds[index]
    shape = (z1 - z0,) + vol.shape[1:]
    if shape[0] < 2:
        raise InputError(f"section {index} has {shape[0]} plane; N4 needs at least 2 per section", vol.path)
    s = shrink_factors(shape, vol.voxel_size, params)
    (oz, mz), (oy, my), (ox, mx) = (shrink_grid(n, k) for n, k in zip(shape, s))
    ys, xs = slice(oy, oy + s[1] * my, s[1]), slice(ox, ox + s[2] * mx, s[2])
    return shape, s, z0 + oz + s[0] * np.arange(mz), ys, xs


def section_fit_grid(vol: Volume, msk: Volume, bounds, index: int, params: N4Params, profile=None):
    """The shrunk fit grid of one section, read from its own Z slab only.

    Returns ``(shape, shrink, image, mask)``: the section's full-resolution
    shape, the shrink factors, and the fit grid's image and mask
    (``params.shrink_mode``: sampled voxels, or tissue block means read one
    Z block at a time).  ``profile`` (one log value per plane of the
    section), when given, is divided out of the planes first.
    """
    shape, s, zs, ys, xs = _section_sampling(vol, bounds, index, params)
    z0 = bounds[index][0]
    if params.shrink_mode == "subsample":
        img = vol.read_planes(zs, ys, xs)
        if profile is not None:
            img = (img / np.exp(np.asarray(profile)[zs - z0])[:, None, None]).astype(np.float32)
        return shape, s, img, msk.read_planes(zs, ys, xs) > 0
    log_field = None if profile is None else (lambda zb: np.asarray(profile, np.float32)[zb - z0][:, None, None])
    return shape, s, *_block_mean_grid(vol, msk, z0 + block_indices(shape[0], s[0]), s, log_field=log_field)


def stack_depth_profile(msk: Volume, bounds, params: N4Params):
    """The depth model's per-plane log profile of the whole stack (:mod:`octn4.depth`), or None.

    Fitted to the per-plane statistics the mask stage stored with the mask;
    every section task computes the same profile from them.
    """
    if params.depth_model == "none":
        return None
    from .io import read_attrs

    attrs = read_attrs(msk.path)
    med, pix = attrs.get("plane_log_median"), attrs.get("plane_tissue_pixels")
    if med is None or pix is None or len(med) != msk.shape[0]:
        raise InputError("the mask has no per-plane statistics for the depth model (it was not made by this "
                         "octn4's mask stage); remake it, or pass --depth-model none", msk.path)
    med = np.array([np.nan if v is None else v for v in med], np.float64)
    fit = fit_depth_profiles(med, np.asarray(pix, np.int64), bounds, spans=params.depth_spans,
                             prior=params.depth_prior)
    return fit["profile"]


def _with_profile(fit: FitResult, profile) -> FitResult:
    """Attach the depth model's profile (divided out before the fit) to a section's field."""
    if profile is not None:
        fit.field = fit.field.with_z_profile(profile)
        fit.depth_profile_range = float(np.max(profile) - np.min(profile))
    return fit


def _block_mean_grid(vol: Volume, msk: Volume, z_blocks, s, log_field=None, advance=None):
    """Tissue block means of ``vol`` (divided by ``exp(log_field(planes))`` when given), one Z block at a time
    (``advance()`` after each); every stored chunk of input and mask is decompressed once."""
    img = np.empty((len(z_blocks),) + tuple(shrink_grid(n, k)[1] for n, k in zip(vol.shape[1:], s[1:])), np.float32)
    fit = np.empty(img.shape, bool)
    vol_rows, msk_rows = ForwardReader(vol), ForwardReader(msk)
    for j, zb in enumerate(z_blocks):
        planes = vol_rows.read_planes(zb)
        if log_field is not None:
            planes = planes / np.exp(log_field(zb))
        img[j], fit[j] = block_mean_plane(planes, msk_rows.read_planes(zb) > 0, s[1:], vol.shape[1:])
        if advance is not None:
            advance()
    return img, fit


def _corrected_histogram(vol: Volume, bounds, index: int, params: N4Params, fit: FitResult, grid, grid_mask):
    """Histogram of the section-corrected log intensities of a fit grid (before the profile is attached).

    ``grid`` is the fit grid the field was fitted on (the profile already
    divided out), so ``log(grid) - lattice`` is the section-corrected value
    at each fit voxel; the gains stage aligns these histograms
    (:func:`octn4.gains.histogram_offsets`).
    """
    z0 = bounds[index][0]
    _, _, zs, ys, xs = _section_sampling(vol, bounds, index, params)
    iy, ix = np.arange(vol.shape[1])[ys], np.arange(vol.shape[2])[xs]
    ok = np.asarray(grid_mask, bool) & (np.asarray(grid) > 0)
    if fit.status != "fitted" or not ok.any():
        return log_histogram([])
    lattice = fit.field.evaluate(np.asarray(zs) - z0, iy, ix)
    return log_histogram(np.log(np.asarray(grid, np.float64)[ok]) - lattice[ok])


def _section_record(bounds, index: int, fit: FitResult, histogram=None) -> dict:
    z0, z1 = bounds[index]
    rec = {"index": index, "z_start": int(z0), "z_stop": int(z1), "fit": fit.summary(),
           "field": fit.field.to_dict()}
    if histogram is not None:
        rec["histogram"] = histogram
    return rec


def fit_section(input_path, mask_path, bounds, index: int, *, params: N4Params, voxel_size=None,
                threads: int = 1, engine: str = "octn4", device: str = "cpu") -> dict:
    """N4 on one section; reads only that section's Z slab of input and mask.

    Returns a JSON-ready record: index, Z range, fit summary and the field
    (lattice) on the section's own full-resolution grid.
    """
    vol = open_volume(input_path, voxel_size=voxel_size)
    msk = _open_mask(mask_path, vol)
    stack = stack_depth_profile(msk, bounds, params)
    profile = None if stack is None else stack[bounds[index][0]:bounds[index][1]]
    shape, s, sub, sub_mask = section_fit_grid(vol, msk, bounds, index, params, profile)
    fit = fit_bias(sub, sub_mask, full_shape=shape, shrink=s, voxel_size=vol.voxel_size,
                   params=params, threads=threads, engine=engine, device=device)
    hist = _corrected_histogram(vol, bounds, index, params, fit, sub, sub_mask)
    return _section_record(bounds, index, _with_profile(fit, profile), hist)


def fit_sections_batched(vol: Volume, msk: Volume, bounds, *, params: N4Params, batch: int, device: str = "cpu",
                         progress_step=None, indices=None, on_record=None) -> list[dict]:
    """N4 on every section (or those in ``indices``) with octn4's engine, equal-shaped sections fitted
    ``batch`` at a time; ``on_record(record)`` is called as each batch finishes.

    Gives the records :func:`fit_section` gives one by one (same fit grids,
    same lattices); only the loop is shared.  Returns them ordered by index.
    """
    groups: dict[tuple, list[int]] = {}
    for i in range(len(bounds)) if indices is None else indices:
        z0, z1 = bounds[i]
        groups.setdefault((z1 - z0,), []).append(i)
    records = []
    stack = stack_depth_profile(msk, bounds, params)
    prof = [None if stack is None else stack[a:b] for a, b in bounds]
    for members in groups.values():
        for k in range(0, len(members), batch):
            chunk = members[k:k + batch]
            grids = [section_fit_grid(vol, msk, bounds, i, params, prof[i]) for i in chunk]
            shape, s = grids[0][0], grids[0][1]
            fits = fit_bias_batch([g[2] for g in grids], [g[3] for g in grids], full_shape=shape, shrink=s,
                                  voxel_size=vol.voxel_size, params=params, device=device)
            hists = [_corrected_histogram(vol, bounds, i, params, f, g[2], g[3]) for i, f, g in zip(chunk, fits, grids)]
            done = [_section_record(bounds, i, _with_profile(f, prof[i]), h) for i, f, h in zip(chunk, fits, hists)]
            for rec in done:
                if on_record is not None:
                    on_record(rec)
            records += done
            if progress_step is not None:
                progress_step(len(chunk))
    if indices is None:
        return assemble_sections(records, len(bounds))
    return sorted(records, key=lambda r: r["index"])


def stage_section(input_path, mask_path, bounds, index, out_json, *, params: N4Params, voxel_size=None,
                  threads=1, engine="octn4", device="cpu", attrs=None, overwrite=False) -> dict:
    """:func:`fit_section`, written to ``out_json``."""
    out_json = Path(out_json)
    if out_json.exists() and not overwrite:
        raise InputError("output already exists; pass --overwrite to replace it", out_json)
    rec = fit_section(input_path, mask_path, bounds, index, params=params, voxel_size=voxel_size,
                      threads=threads, engine=engine, device=device)
    rec["provenance"] = attrs or {}
    write_json(rec, out_json)
    return rec


def assemble_sections(records, n_expected: int | None = None) -> list[dict]:
    """Order per-section records by their index (never by arrival) and check the set is complete."""
    by_index = {}
    for r in records:
        if r["index"] in by_index:
            raise InputError(f"section {r['index']} was given twice")
        by_index[r["index"]] = r
    n = len(by_index) if n_expected is None else n_expected
    missing = sorted(set(range(n)) - set(by_index))
    extra = sorted(set(by_index) - set(range(n)))
    if missing or extra:
        raise InputError(f"sections incomplete: missing {missing}, unexpected {extra} (expected 0..{n - 1})")
    out = [by_index[i] for i in range(n)]
    for a, b in zip(out[:-1], out[1:]):
        if a["z_stop"] != b["z_start"]:
            raise InputError(f"sections {a['index']} and {b['index']} are not contiguous "
                             f"({a['z_stop']} != {b['z_start']})")
    return out


def read_records(paths) -> list[dict]:
    """Load per-section JSON records (as written by :func:`stage_section`)."""
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read section record ({exc})", p) from None
    return out


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
    return _block_mean_grid(vol, _open_mask(mask_path, vol), blocks, s,
                            log_field=lambda zb: section_log_field(fields, zb))


def _global_grid_in_parallel(vol: Volume, msk: Volume, records, blocks, s, workers: int, advance):
    """:func:`_block_mean_grid` of the global pass over runs of consecutive Z blocks in ``workers``
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
            sub, sub_mask = _block_mean_grid(vol, msk, blocks, s,
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


def _apply_task(job):
    input_path, mask_path, voxel_size, solution, index, out_dir, tile_planes = job
    vol = open_volume(input_path, voxel_size=voxel_size)
    return apply_part(vol, _open_mask(mask_path, vol), solution, index, out_dir, tile_planes=tile_planes,
                      overwrite=True, show_progress=False)


def apply_parts(vol: Volume, msk: Volume, solution: dict, part_dir: Path, *, tile_mib: int, workers: int = 1,
                order=None) -> list[Path]:
    """Every section's output part (:func:`octn4.apply.apply_part`) in ``part_dir``, ``workers`` at a time,
    in ``order`` (default: by index).  Returns the part folders by index."""
    n = len(solution["sections"])
    order = list(range(n)) if order is None else list(order)
    tile_planes = tile_planes_for(vol.shape, tile_mib, vol.chunk_planes)
    paths = [Path(part_dir) / f"part_{i}" for i in range(n)]
    jobs = [(vol.path, msk.path, vol.voxel_size, solution, i, paths[i], tile_planes) for i in order]
    workers = max(1, min(workers, n))
    with progress(len(jobs), "apply bias field") as advance:
        if workers == 1:
            for j in jobs:
                _apply_task(j)
                advance()
            return paths
        with worker_pool(workers, f"an apply worker process was killed (most often out of memory: {workers} "
                                  f"workers each held one tile of {tile_planes} planes); use fewer --workers or a "
                                  "smaller --tile-mib") as pool:
            for _ in pool.map(_apply_task, jobs):
                advance()
    return paths


def stage_global(vol: Volume, msk: Volume, records, outdir: Path, *, config: RunConfig, attrs: dict,
                 timings: dict) -> dict:
    """Gains, global fit, the apply one part per section, then the outputs ``corrected``, ``bias``,
    ``fields.json``, ``metrics.json`` in ``outdir`` (a private temporary folder)."""
    solution = solve_global(vol, msk, records, config=config, attrs=attrs, timings=timings)
    t0 = time.perf_counter()
    parts = apply_parts(vol, msk, solution, outdir / ".work" / "parts", tile_mib=config.tile_mib,
                        workers=1 if config.device == "cuda" else config.workers)
    timings["apply"] = time.perf_counter() - t0
    return finish(vol, msk, solution, parts, outdir, output_format=config.output_format, timings=timings)

# --------------------------------------------------------------------------- local runner


def _read_records(sections_json, vol: Volume) -> list[dict]:
    try:
        records = json.loads(Path(sections_json).read_text())["sections"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read assembled sections ({exc})", sections_json) from None
    records = assemble_sections(records, len(records))
    if records[-1]["z_stop"] != vol.shape[0] or records[0]["z_start"] != 0:
        raise InputError(f"sections cover planes {records[0]['z_start']}..{records[-1]['z_stop']} but the "
                         f"volume has {vol.shape[0]}", sections_json)
    return records


def stage_global_files(input_path, mask_path, sections_json, out_json, *, config: RunConfig) -> dict:
    """The global stage from files: input, mask, assembled section records -> the solution ``out_json``."""
    t_start = time.perf_counter()
    out_json = Path(out_json)
    if out_json.exists() and not config.overwrite:
        raise InputError("output already exists; pass --overwrite to replace it", out_json)
    vol = open_volume(input_path, voxel_size=config.voxel_size)
    msk = _open_mask(mask_path, vol)
    records = _read_records(sections_json, vol)
    bounds = [[r["z_start"], r["z_stop"]] for r in records]
    attrs = provenance("global", vol, stage_parameters(config, msk, records), engine=config.engine,
                       device=config.device, extra={"sections": bounds, "stages": _stage_records(msk, records)})
    timings: dict[str, float] = {}
    solution = solve_global(vol, msk, records, config=config, attrs=attrs, timings=timings)
    solution["timings_s"]["global_total"] = round(time.perf_counter() - t_start, 3)
    write_json(solution, out_json)
    return solution


def stage_apply_files(input_path, mask_path, solution_json, index: int, out_dir, *, voxel_size=None,
                      tile_mib: int = 1024, overwrite: bool = False) -> dict:
    """One section's output part from files: input, mask, the global solution -> ``out_dir``."""
    vol = open_volume(input_path, voxel_size=voxel_size)
    msk = _open_mask(mask_path, vol)
    return apply_part(vol, msk, read_solution(solution_json), index, out_dir,
                      tile_planes=tile_planes_for(vol.shape, tile_mib, vol.chunk_planes), overwrite=overwrite)


def stage_finish_files(input_path, mask_path, solution_json, part_dirs, outdir, *, voxel_size=None,
                       output_format: str = "ome-zarr", overwrite: bool = False) -> dict:
    """The outputs from files: the parts of every section and the global solution -> ``outdir``."""
    t_start = time.perf_counter()
    vol = open_volume(input_path, voxel_size=voxel_size)
    msk = _open_mask(mask_path, vol)
    solution = read_solution(solution_json)
    with atomic_dir(outdir, overwrite=overwrite) as tmp:
        metrics = finish(vol, msk, solution, part_dirs, tmp, output_format=output_format)
        metrics["timings_s"]["finish_total"] = round(time.perf_counter() - t_start, 3)
        write_json(metrics, tmp / "metrics.json")
    return metrics


def stage_parameters(config: RunConfig, msk: Volume, records) -> dict:
    """The parameters the run's stages really used, for the global stage's outputs.

    ``config`` holds only the global stage's own options (gains, global N4,
    output); the mask's and the sections' come from the records those stages
    wrote (the mask's attributes, each section record's provenance), and the
    section layout from the records themselves.
    """
    from .io import read_attrs

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
    from .io import read_attrs

    keys = ("octn4_version", "created", "command", "engine", "device")
    try:
        m = read_attrs(msk.path)
    except (OSError, ValueError):
        m = {}
    return {"mask": {k: m.get(k) for k in keys[:3]},
            "sections": [dict({k: r.get("provenance", {}).get(k) for k in keys}, index=r["index"]) for r in records]}


def _section_task(args):
    input_path, mask_path, bounds, index, params, voxel_size, threads, engine, device = args
    return fit_section(input_path, mask_path, bounds, index, params=params, voxel_size=voxel_size,
                       threads=threads, engine=engine, device=device)


def _ingest(vol: Volume, path: Path) -> Volume:
    """Copy a NIfTI input to a plane-chunked Zarr so sections can be read at random (its octn4 attributes too)."""
    import zarr

    from .io import read_attrs

    arr = zarr.open_array(str(path), mode="w", shape=vol.shape, chunks=(1,) + vol.shape[1:],
                          dtype=np.float32, zarr_format=3)
    try:
        attrs = read_attrs(vol.path)
    except (OSError, ValueError):
        attrs = {}
    if attrs:
        arr.attrs["octn4"] = attrs
    with progress(vol.shape[0], "reading NIfTI input") as advance:
        for z0 in range(0, vol.shape[0], 16):
            block = vol.read(z0, z0 + 16)
            arr[z0:z0 + block.shape[0]] = block
            advance(block.shape[0])
    return open_volume(path, voxel_size=vol.voxel_size)


@contextmanager
def run_folder(outdir, *, overwrite: bool, resume: bool):
    """The folder a local run builds ``outdir`` in: ``.<name>.partial`` beside it, renamed when complete.

    It has a fixed name, so that a run that died (killed, out of memory)
    leaves its finished stages where ``resume`` finds them; it is locked
    while a run uses it.  Without ``resume`` an earlier run's leftovers are
    discarded.  On a bad input it is removed; on any other failure it is
    kept (it does not look like an output: hidden, no final name) and a
    warning says how to reuse it.
    """
    outdir = Path(outdir)
    if outdir.exists() and not overwrite:
        raise InputError("output directory already exists; pass --overwrite to replace it", outdir)
    tmp = outdir.with_name(f".{outdir.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    lock = open(tmp / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise InputError("another octn4 run is writing this output now (its partial folder is locked)", tmp) from None
    leftovers = [p for p in tmp.iterdir() if p.name != ".lock"]
    if leftovers and not resume:
        log.warning("discarding the partial results of an earlier run in %s (pass --resume to reuse them)", tmp)
    for p in leftovers:   # without resume everything goes; with it, what a killed writer left half-written
        if not resume or ".partial-" in p.name:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    try:
        yield tmp
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        lock.close()
        (tmp / ".lock").unlink()
        replace_path(tmp, outdir)
    except InputError:
        lock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        lock.close()
        log.warning("the run stopped; its finished stages are kept in %s: run the same command with --resume to "
                    "reuse them", tmp)
        raise


def _resume_keys(scan, vol: Volume, bounds, config: RunConfig, mask_digest=None) -> dict:
    """What each resumable stage's result depends on: the input's content, its geometry, the layout, the
    stage's parameters, octn4's version.  A stored result is reused only when its key is equal."""
    base = {"octn4_version": __version__, "input_digest": scan.digest, "shape": list(vol.shape),
            "voxel_size_mm": list(vol.voxel_size), "sections": [list(b) for b in bounds]}
    mask = dict(base, mask=config.mask.as_dict(), mask_digest=mask_digest)
    sec = dict(base, mask_key=mask, section_n4=config.section_n4.as_dict(), engine=config.engine,
               device=config.device)
    return json.loads(json.dumps({"mask": mask, "sections": [dict(sec, index=i) for i in range(len(bounds))]}))


def _reusable_mask(path: Path, key: dict) -> bool:
    from .io import read_attrs

    if not path.exists():
        return False
    try:
        return read_attrs(path).get("resume_key") == key
    except (OSError, ValueError):
        return False


def run(input_path, outdir, config: RunConfig, *, resume: bool = False) -> dict:
    """Correct ``input_path`` into ``outdir`` (created complete, or not at all).

    Writes ``corrected``, ``bias`` and ``mask`` (OME-Zarr by default, NIfTI
    on request), ``fields.json`` (every fitted lattice) and ``metrics.json``
    (per-section statistics before/after, timings, peak memory, provenance).
    Returns the metrics.

    ``resume``: reuse what an interrupted run of the same job finished in
    ``.<outdir>.partial`` (:func:`run_folder`): its mask and each section
    record whose key (:func:`_resume_keys`: input content digest, geometry,
    layout, parameters, engine, device, octn4 version) equals this run's.
    Anything else is recomputed; the global fit and the apply always are.
    """
    outdir = Path(outdir)
    if outdir.exists() and not config.overwrite:
        raise InputError("output directory already exists; pass --overwrite to replace it", outdir)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    vol, scan = open_input(input_path, voxel_size=config.voxel_size, check_log_scale=config.check_log_scale,
                           with_scan=True, workers=config.workers)
    bounds = config.bounds(vol)
    timings["validate"] = time.perf_counter() - t_start
    with run_folder(outdir, overwrite=config.overwrite, resume=resume) as tmp:
        attrs = provenance("run", vol, config.as_dict(), engine=config.engine, device=config.device,
                           extra={"sections": [list(b) for b in bounds], "input_digest": scan.digest})
        work = _ingest(vol, tmp / ".work" / "input.zarr") if vol.format == "nifti" else vol
        ext = ".nii.gz" if config.output_format == "nifti" else ".ome.zarr"
        mask_path = tmp / f"mask{ext}"
        t0 = time.perf_counter()
        reused = {"mask": False, "sections": []}
        if config.mask_path is None:
            keys = _resume_keys(scan, vol, bounds, config)
            if resume and _reusable_mask(mask_path, keys["mask"]):
                reused["mask"] = True
                log.info("resume: the tissue mask in %s matches this run; reused", mask_path)
            else:
                stage_mask(work, bounds, mask_path, params=config.mask, overwrite=True, workers=config.workers,
                           attrs=dict(attrs, output="mask", resume_key=keys["mask"]))
        else:   # a user's mask is copied again (its content may have changed); its digest keys the sections
            digest = copy_mask(_open_mask(config.mask_path, vol), mask_path, attrs=dict(attrs, output="mask"),
                               vol=work, overwrite=True)
            keys = _resume_keys(scan, vol, bounds, config, mask_digest=digest)
        timings["mask"] = time.perf_counter() - t0
        msk = open_volume(mask_path, voxel_size=vol.voxel_size)
        if msk.format == "nifti":   # sections read the mask at random: keep a Zarr copy for the run
            msk = _ingest(msk, tmp / ".work" / "mask.zarr")
        t0 = time.perf_counter()
        records = _fit_sections(work, msk, bounds, config, record_dir=tmp / ".work" / "sections",
                                keys=keys["sections"], resume=resume, reused=reused["sections"])
        timings["sections"] = time.perf_counter() - t0
        attrs = dict(attrs, resumed=reused if resume else None)
        metrics = stage_global(work, msk, records, tmp, config=config, attrs=attrs, timings=timings)
        timings["total"] = time.perf_counter() - t_start
        metrics["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        metrics["peak_rss_mib"] = peak_rss_mib()
        metrics["input"] = os.path.abspath(vol.path)
        write_json(metrics, tmp / "metrics.json")
        from .report import build_report

        build_report(tmp, tmp / "report", name=outdir.name, overwrite=True)
    log.info("wrote %s (%.1f s)", outdir, timings["total"])
    return metrics


def _stored_records(record_dir: Path, keys, reused: list) -> dict[int, dict]:
    """Section records of an interrupted run whose keys equal this run's (the others are left to be redone)."""
    done = {}
    for i, key in enumerate(keys):
        path = record_dir / f"section_{i}.json"
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("resume_key") == key and rec.get("index") == i:
            done[i] = rec
    if done:
        log.info("resume: %d of %d section fits match this run; reused (%s)", len(done), len(keys),
                 ", ".join(map(str, sorted(done))))
    reused.extend(sorted(done))
    return done


def _fit_sections(vol: Volume, msk: Volume, bounds, config: RunConfig, *, record_dir: Path | None = None,
                  keys=None, resume: bool = False, reused: list | None = None) -> list[dict]:
    """Every section's record: those stored in ``record_dir`` with equal keys when resuming, the others fitted
    (each written to ``record_dir`` with its key as soon as it is done)."""
    done = _stored_records(record_dir, keys, reused if reused is not None else []) if resume and record_dir else {}
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)

    def keep(rec):
        if record_dir is not None:
            rec = dict(rec, resume_key=keys[rec["index"]])
            write_json(rec, record_dir / f"section_{rec['index']}.json")
        done[rec["index"]] = rec

    todo = [i for i in range(len(bounds)) if i not in done]
    if todo:
        _fit_missing_sections(vol, msk, bounds, config, todo, keep)
    return assemble_sections(list(done.values()), len(bounds))


def _fit_missing_sections(vol: Volume, msk: Volume, bounds, config: RunConfig, todo, keep) -> None:
    _, _, zs, ys, xs = _section_sampling(vol, bounds, 0, config.section_n4)
    fit_voxels = len(zs) * len(range(vol.shape[1])[ys]) * len(range(vol.shape[2])[xs])
    batch = min(config.section_batch(fit_voxels), len(todo))
    if batch > 1:
        log.info("N4 per section: batches of up to %d equal-shaped sections on %s", batch, config.device)
        with progress(len(todo), "N4 per section") as advance:
            fit_sections_batched(vol, msk, bounds, params=config.section_n4, batch=batch, device=config.device,
                                 progress_step=advance, indices=todo, on_record=keep)
        return
    workers = 1 if config.device == "cuda" else min(config.workers, len(todo))
    threads = max(1, config.total_threads // workers)
    jobs = [(vol.path, msk.path, bounds, i, config.section_n4, vol.voxel_size, threads, config.engine,
             config.device) for i in todo]
    with progress(len(jobs), "N4 per section") as advance:
        if workers == 1:
            for j in jobs:
                keep(_section_task(j))
                advance()
        else:
            with worker_pool(workers, f"a section worker process was killed (most often out of memory: "
                                      f"{workers} workers each held one section's fit); the sections finished so "
                                      "far are kept for --resume; use fewer --workers or more memory") as pool:
                for rec in pool.map(_section_task, jobs):
                    keep(rec)
                    advance()
