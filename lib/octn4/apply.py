"""The apply stage: ``corrected = input / bias`` one section at a time, and the step that finishes the outputs.

The global stage ends with a *solution* (``global.json``): every section's
record with its gain, the global field, the gain report and the stage's
provenance, a few hundred kB.  From it and the input, :func:`apply_part`
computes the corrected volume and the bias of one section's planes and
writes them as an output *part*; :func:`finish` takes every part into the
final stores, builds their pyramids, and writes ``fields.json`` and
``metrics.json``.  The apply is one task per section in the Nextflow
workflow (``APPLY_SECTION``, then ``FINISH``) and in ``octn4 run`` (a
process pool): the same functions either way.

Ownership.  The outputs are stored in shards of ``CHUNKS[0]`` planes (a
chunk row, whole planes), and section boundaries rarely fall on them. A
section's part holds the chunk rows whose first plane lies in the section
(:func:`owned_planes`); the few planes of the next section that such a row
takes in are computed from that section's field, which the solution holds.
So no two parts write one file, and the parts can be written at once by
any number of processes or nodes, in any order; their files are then hard
links away from the output.  Tiles are cut on one grid of the whole volume
(:func:`part_tiles`), so every plane is computed in a tile of the same
planes whatever the order and the number of tasks: the result is the same
bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .bias import bias_planes, section_fields, section_log_field
from .bspline import BSplineField
from .errors import InputError
from .io import (
    CHUNKS,
    ForwardReader,
    PartWriter,
    Volume,
    atomic_dir,
    create_writer,
    keeps_level1,
    open_mask,
    open_volume,
    part_files,
    read_attrs,
    take_parts,
    write_json,
)
from .metrics import PlaneStats, boundary_steps, section_summary
from .progress import progress
from .workers import worker_pool

log = logging.getLogger("octn4")

__all__ = ["bias_level0", "owned_planes", "tile_planes_for", "part_tiles", "section_fields", "section_log_field",
           "apply_part", "apply_parts", "finish", "read_solution", "mask_plane_thresholds", "near_empty_sections",
           "PART_OUTPUTS", "stage_apply_files", "stage_finish_files"]

#: The volumes every part holds, and the output each becomes.
PART_OUTPUTS = ("corrected", "bias")


def owned_planes(bounds, index: int, depth: int, rows: int = CHUNKS[0]) -> tuple[int, int]:
    """Planes ``(z0, z1)`` of the output that section ``index``'s part writes: the chunk rows of ``rows``
    planes whose first plane lies in the section (empty for a section inside one row)."""
    def edge(z):
        return min(depth, -(-z // rows) * rows)

    a, b = bounds[index]
    return edge(a), (depth if index == len(bounds) - 1 else edge(b))


def tile_planes_for(shape, tile_mib: int, input_chunk_planes: int = 1) -> int:
    """Planes per apply tile: about 6 float32 buffers of the tile fit in ``tile_mib``.

    A whole number of the outputs' chunk rows (whole shards: each written
    once) and, where ``tile_mib`` allows, of the input's Z chunks too.
    Thinner tiles are read through a :class:`octn4.io.ForwardReader` (in
    :func:`apply_part`), which keeps the input chunk row under the last
    read, so no input chunk is decompressed twice either way.
    """
    per_plane = shape[1] * shape[2] * 4 * 6
    n = max(1, int(tile_mib * 2 ** 20 // per_plane))
    for unit in (math.lcm(CHUNKS[0], max(1, input_chunk_planes)), CHUNKS[0]):
        if n >= unit:
            return n // unit * unit
    return n


def part_tiles(z0: int, z1: int, tile_planes: int):
    """The tiles ``(a, b)`` of planes ``z0..z1``: the whole volume's grid of ``tile_planes`` planes, cut at
    ``z0`` and ``z1``."""
    t = max(1, int(tile_planes))
    return [(max(z0, k * t), min(z1, (k + 1) * t)) for k in range(z0 // t, -(-z1 // t))] if z1 > z0 else []


def read_solution(path) -> dict:
    """The global stage's solution (``global.json``), checked for what the apply needs."""
    try:
        sol = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"not an octn4 global solution ({exc})", path) from None
    missing = [k for k in ("sections", "global", "shape") if not isinstance(sol, dict) or k not in sol]
    if missing:
        raise InputError(f"not an octn4 global solution (no {', '.join(missing)})", path)
    return sol


def _check_geometry(vol: Volume, solution: dict, where) -> None:
    if tuple(solution["shape"]) != tuple(vol.shape):
        raise InputError(f"the solution is for a volume of shape {tuple(solution['shape'])}, this input has "
                         f"{vol.shape}", where)


def bias_level0(shape, voxel_size, full_bias: bool) -> bool:
    """Whether the bias output stores level 0: on request (``full_bias``), or where the shape has no first
    pyramid level for it to start at (:func:`octn4.io.keeps_level1`)."""
    return bool(full_bias) or not keeps_level1(shape, voxel_size)


def apply_part(vol: Volume, msk: Volume, solution: dict, index: int, out_dir, *, tile_planes: int,
               overwrite: bool = False, show_progress: bool = True, full_bias: bool = False) -> dict:
    """Write section ``index``'s part of the outputs to ``out_dir`` (made complete, or not at all).

    ``out_dir`` gets one :class:`octn4.io.PartWriter` store per output
    (``corrected.zarr``, ``bias.zarr``: the planes of :func:`owned_planes`;
    the bias's first pyramid level only, unless ``full_bias``:
    :func:`bias_level0`) and ``part.json``: the planes, the per-plane tissue
    statistics of input and corrected volume there
    (:meth:`octn4.metrics.PlaneStats.part`), and the time taken.  Returns
    ``part.json``'s content.
    """
    t0 = time.perf_counter()
    records = solution["sections"]
    if not 0 <= index < len(records):
        raise InputError(f"section index {index} is out of range (0..{len(records) - 1})")
    _check_geometry(vol, solution, vol.path)
    bounds = [(r["z_start"], r["z_stop"]) for r in records]
    z0, z1 = owned_planes(bounds, index, vol.shape[0])
    fields = section_fields(records)
    global_field = BSplineField.from_dict(solution["global"])
    stats = PlaneStats(vol.shape[0])
    tiles = part_tiles(z0, z1, tile_planes)
    rows = ForwardReader(vol)          # tiles thinner than the input's Z chunks decompress each chunk once
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        level0 = {"corrected": True, "bias": bias_level0(vol.shape, vol.voxel_size, full_bias)}
        writers = {name: PartWriter(tmp / f"{name}.zarr", vol.shape, owned=(z0, z1), chunks=CHUNKS,
                                    voxel_size=vol.voxel_size, level0=level0[name])
                   for name in PART_OUTPUTS}
        shown = progress(len(tiles), f"apply: section {index}") if show_progress else nullcontext(lambda n=1: None)
        with shown as advance:
            for a, b in tiles:
                bias = bias_planes(fields, global_field, np.arange(a, b))
                raw = rows.read(a, b)
                corrected = raw / np.maximum(bias, np.float32(1e-6))
                writers["corrected"].write(a, corrected)
                writers["bias"].write(a, bias)
                stats.add(a, msk.read_tissue(a, b), before=raw, after=corrected)
                advance()
        for w in writers.values():
            w.commit()
        part = {"index": index, "planes": [z0, z1], "section": list(bounds[index]), "stats": stats.part(z0, z1),
                "seconds": round(time.perf_counter() - t0, 3),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        write_json(part, tmp / "part.json")
    return part


def read_part(path, n_sections: int) -> dict:
    """The ``part.json`` of an output part (an apply task's or a mask task's), with its ``path``; checked."""
    try:
        part = json.loads((Path(path) / "part.json").read_text())
        index = int(part["index"])
        part["planes"] = [int(v) for v in part["planes"]][:2]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not an octn4 output part ({exc})", path) from None
    if not 0 <= index < n_sections:
        raise InputError(f"part of section {index}, but the solution has {n_sections} sections", path)
    part["path"] = Path(path)
    return part


def ordered_parts(paths, bounds, depth: int) -> list[dict]:
    """The parts by section index, checked: one per section, each owning the planes the layout gives it."""
    parts = {}
    for p in paths:
        part = read_part(p, len(bounds))
        if part["index"] in parts:
            raise InputError(f"section {part['index']}'s part was given twice", p)
        expected = list(owned_planes(bounds, part["index"], depth))
        if part["planes"] != expected:
            raise InputError(f"part of section {part['index']} holds planes {part['planes']}, the layout gives it "
                             f"{expected}", p)
        parts[part["index"]] = part
    missing = sorted(set(range(len(bounds))) - set(parts))
    if missing:
        raise InputError(f"parts missing for sections {missing} (expected one per section, 0..{len(bounds) - 1})")
    return [parts[i] for i in range(len(bounds))]


def _stores_level0(store) -> bool:
    try:
        meta = json.loads((Path(store) / "zarr.json").read_text())["attributes"]["octn4_part"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not an octn4 output part ({exc})", store) from None
    return bool(meta.get("level0", True))


def _level0_of(stores, name: str) -> bool:
    """Whether the parts' stores of output ``name`` hold level 0 (all of them, or none: checked)."""
    level0 = [_stores_level0(s) for s in stores]
    if len(set(level0)) > 1:
        raise InputError(f"the parts of {name} disagree on storing level 0 (made with and without --full-bias)",
                         stores[level0.index(False)])
    return level0[0] if level0 else True


def _assemble(name: str, parts, outdir: Path, vol: Volume, attrs: dict, output_format: str, solution: dict) -> int:
    """Output ``name`` from the parts: shards adopted by link (OME-Zarr), or streamed in Z order (NIfTI).
    Returns the number of files linked or copied (0 for NIfTI).

    Parts that hold no level 0 (the bias, :func:`bias_level0`) make an
    OME-Zarr stored from level 1 down; a NIfTI output, which has one
    resolution, gets those planes evaluated from the solution's lattices
    instead (:func:`octn4.bias.bias_planes`: the apply's own values).
    """
    ext = ".nii.gz" if output_format == "nifti" else ".ome.zarr"
    stores = [(part["path"] / f"{name}.zarr", part["planes"]) for part in parts]
    full = _level0_of([s for s, _ in stores], name)
    with create_writer(outdir / f"{name}{ext}", vol.shape, vol.voxel_size, attrs=dict(attrs, output=name),
                       chunks=CHUNKS, overwrite=True, affine=vol.affine,
                       **({} if full or output_format == "nifti" else {"level0": False})) as w:
        if full or output_format != "nifti":
            taken = take_parts(w, stores)
        else:
            taken = 0
            fields, global_field = section_fields(solution["sections"]), BSplineField.from_dict(solution["global"])
            for z0 in range(0, vol.shape[0], CHUNKS[0]):
                w.write(z0, bias_planes(fields, global_field, np.arange(z0, min(vol.shape[0], z0 + CHUNKS[0]))))
        w.commit()
    return taken


def mask_plane_thresholds(msk: Volume):
    """The per-plane thresholds the mask stage stored with the mask (``-inf``: all tissue), or None."""
    try:
        thr = read_attrs(msk.path).get("plane_thresholds")
    except (OSError, ValueError):
        return None
    if thr is None or len(thr) != msk.shape[0]:
        return None
    return np.array([-np.inf if t is None else t for t in thr], np.float32)


def near_empty_sections(msk: Volume, bounds) -> list[int]:
    """Sections in which the mask stage found no tissue threshold on any plane (the whole slab is tissue)."""
    thr = mask_plane_thresholds(msk)
    if thr is None:                   # a user's mask: it says what tissue is
        return []
    out = [i for i, (z0, z1) in enumerate(bounds) if np.all(np.isneginf(thr[z0:z1]))]
    for i in out:
        log.warning("section %d: the mask found too few positive voxels for a tissue threshold and took the whole "
                    "slab as tissue; its correction is flagged", i)
    return out


def finish(vol: Volume, msk: Volume, solution: dict, part_paths, outdir, *, output_format: str = "ome-zarr",
           timings: dict | None = None, threads: int = 1) -> dict:
    """The outputs in ``outdir`` (an existing private folder): ``corrected`` and ``bias`` from the parts,
    ``fields.json`` and ``metrics.json``.  Returns the metrics.  ``threads > 1``: the two outputs are
    assembled at once, in threads (their codecs and reductions release the GIL); the same files."""
    t0 = time.perf_counter()
    _check_geometry(vol, solution, vol.path)
    records = solution["sections"]
    bounds = [(r["z_start"], r["z_stop"]) for r in records]
    parts = ordered_parts(part_paths, bounds, vol.shape[0])
    for part in parts:                   # every part checked before any output is made
        for name in PART_OUTPUTS:
            part_files(part["path"] / f"{name}.zarr", CHUNKS[0])
    for name in PART_OUTPUTS:
        _level0_of([part["path"] / f"{name}.zarr" for part in parts], name)
    outdir = Path(outdir)
    attrs = solution.get("provenance", {})
    taken = 0
    with progress(len(PART_OUTPUTS), "finish: outputs and pyramids") as advance:
        if threads > 1:
            with ThreadPoolExecutor(min(threads, len(PART_OUTPUTS))) as pool:
                jobs = [pool.submit(_assemble, name, parts, outdir, vol, attrs, output_format, solution)
                        for name in PART_OUTPUTS]
                for job in as_completed(jobs):
                    taken += job.result()
                    advance()
        else:
            for name in PART_OUTPUTS:
                taken += _assemble(name, parts, outdir, vol, attrs, output_format, solution)
                advance()
    stats = PlaneStats(vol.shape[0])
    for part in parts:
        stats.merge(part["stats"])
    timings = {} if timings is None else timings          # the caller's, updated in place
    timings.update({k: v for k, v in solution.get("timings_s", {}).items() if k not in timings})
    timings.setdefault("apply", sum(p["seconds"] for p in parts))   # task seconds, summed over the parts
    timings["finish"] = time.perf_counter() - t0
    write_json({"sections": [{k: r.get(k, 0.0) for k in ("index", "z_start", "z_stop", "gain_log", "field")}
                             for r in records],
                "global": solution["global"]}, outdir / "fields.json")
    metrics = _metrics(vol, stats, bounds, records, solution, timings, near_empty_sections(msk, bounds))
    metrics["apply_parts"] = [{"index": p["index"], "planes": p["planes"], "seconds": p["seconds"],
                               "peak_rss_mib": p.get("peak_rss_mib")} for p in parts]
    metrics["files_adopted"] = taken
    write_json(metrics, outdir / "metrics.json")
    return metrics


def peak_rss_mib() -> dict:
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _finite_mean(a, *, root=False):
    """Mean of the finite values of ``a`` (its square root with ``root``); None when there are none."""
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    if not a.size:
        return None
    m = float(np.mean(a))
    return math.sqrt(m) if root else m


def _metrics(vol, stats, bounds, records, solution, timings, near_empty=()) -> dict:
    attrs = solution.get("provenance", {})
    rows = section_summary(stats, bounds, vol.voxel_size, near_empty=near_empty,
                           fits=[dict(r["fit"], gain_log=r.get("gain_log", 0.0),
                                      gain_anchor_log=r.get("gain_anchor_log")) for r in records])
    summary = {}
    for name in ("before", "after"):
        steps = np.array(boundary_steps(np.log(stats.median[name]), bounds), float)
        slopes = np.array([np.nan if r[f"depth_slope_per_mm_{name}"] is None else r[f"depth_slope_per_mm_{name}"]
                           for r in rows], float)
        cvs = np.array([np.nan if r[f"cv_{name}"] is None else r[f"cv_{name}"] for r in rows], float)
        summary[f"boundary_step_rms_{name}"] = _finite_mean(steps ** 2, root=True)
        summary[f"depth_slope_abs_mean_{name}"] = _finite_mean(np.abs(slopes))   # None: no section has 3 planes
        summary[f"cv_median_{name}"] = float(np.median(cvs[np.isfinite(cvs)])) if np.isfinite(cvs).any() else None
    summary["sections_flagged"] = [r["index"] for r in rows if r["flags"]]
    summary["sections_near_empty"] = list(near_empty)
    summary["gain_boundaries"] = gb = attrs.get("gain_boundaries", [])
    summary["all_boundaries_bridged"] = bool(gb) and all(b["bridged"] for b in gb)
    params = attrs.get("parameters", {})
    summary["device_choice"] = params.get("device_choice")
    summary["device_fallback"] = params.get("device_choice") if params.get("device_requested") == "auto" and \
        params.get("device") == "cpu" else None
    if summary["all_boundaries_bridged"]:
        log.warning("gains: every section boundary was bridged; the section gains were not measured")
    return {
        "input": os.path.abspath(vol.path),
        "shape": list(vol.shape),
        "voxel_size_mm": list(vol.voxel_size),
        "summary": summary,
        "sections": rows,
        "global_fit": solution.get("global_fit"),
        "profile": stats.profile(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": peak_rss_mib(),
        "provenance": attrs,
    }


def _apply_task(job):
    input_path, mask_path, voxel_size, solution, index, out_dir, tile_planes, full_bias = job
    vol = open_volume(input_path, voxel_size=voxel_size)
    return apply_part(vol, open_mask(mask_path, vol), solution, index, out_dir, tile_planes=tile_planes,
                      overwrite=True, show_progress=False, full_bias=full_bias)


def apply_parts(vol: Volume, msk: Volume, solution: dict, part_dir: Path, *, tile_mib: int, workers: int = 1,
                order=None, full_bias: bool = False) -> list[Path]:
    """Every section's output part (:func:`octn4.apply.apply_part`) in ``part_dir``, ``workers`` at a time,
    in ``order`` (default: by index).  Returns the part folders by index."""
    n = len(solution["sections"])
    order = list(range(n)) if order is None else list(order)
    tile_planes = tile_planes_for(vol.shape, tile_mib, vol.chunk_planes)
    paths = [Path(part_dir) / f"part_{i}" for i in range(n)]
    jobs = [(vol.path, msk.path, vol.voxel_size, solution, i, paths[i], tile_planes, full_bias) for i in order]
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


def stage_apply_files(input_path, mask_path, solution_json, index: int, out_dir, *, voxel_size=None,
                      tile_mib: int = 1024, overwrite: bool = False, full_bias: bool = False) -> dict:
    """One section's output part from files: input, mask, the global solution -> ``out_dir``."""
    vol = open_volume(input_path, voxel_size=voxel_size)
    msk = open_mask(mask_path, vol)
    return apply_part(vol, msk, read_solution(solution_json), index, out_dir,
                      tile_planes=tile_planes_for(vol.shape, tile_mib, vol.chunk_planes), overwrite=overwrite,
                      full_bias=full_bias)


def stage_finish_files(input_path, mask_path, solution_json, part_dirs, outdir, *, voxel_size=None,
                       output_format: str = "ome-zarr", overwrite: bool = False, threads: int = 1) -> dict:
    """The outputs from files: the parts of every section and the global solution -> ``outdir``."""
    t_start = time.perf_counter()
    vol = open_volume(input_path, voxel_size=voxel_size)
    msk = open_mask(mask_path, vol)
    solution = read_solution(solution_json)
    with atomic_dir(outdir, overwrite=overwrite) as tmp:
        metrics = finish(vol, msk, solution, part_dirs, tmp, output_format=output_format, threads=threads)
        metrics["timings_s"]["finish_total"] = round(time.perf_counter() - t_start, 3)
        write_json(metrics, tmp / "metrics.json")
    return metrics

