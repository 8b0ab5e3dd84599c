"""The octn4 pipeline: mask -> N4 per section -> gains + global N4 -> apply per section -> finish.

Each stage is a module of functions with file-in / file-out contracts,
called both by the local runner :func:`run` (this module) and by the ``bin/``
scripts that the Nextflow processes run:

==============  ===========================================  ==========================
stage           reads                                        writes
==============  ===========================================  ==========================
mask            input volume                                 ``mask.ome.zarr`` (:mod:`octn4.mask_stage`)
section *i*     its own Z slab of input and mask             ``section_i.json`` (:mod:`octn4.section_stage`)
assemble        all ``section_*.json``                       ``sections.json``
global          input, mask, ``sections.json``               ``global.json`` (:mod:`octn4.global_stage`)
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
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, defaults
from ._backend import DEVICES
from .apply import apply_parts, finish, peak_rss_mib
from .errors import InputError
from .gains import GainParams
from .global_stage import solve_global
from .global_summary import Summary
from .io import Volume, open_mask, open_volume, read_attrs, replace_path, scan_volume, validate_scan, write_json
from .mask import MaskParams
from .mask_stage import copy_mask, stage_mask
from .n4 import ENGINES, choose_device
from .params import N4Params
from .progress import progress
from .provenance import provenance
from .section_stage import assemble_sections, fit_section, fit_sections_batched, section_sampling
from .sections import section_bounds
from .workers import worker_pool

log = logging.getLogger("octn4")

__all__ = ["RunConfig", "run", "open_input", "volume_sections", "stage_global", "run_folder"]

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
    full_bias: bool = False          # store the bias at full resolution (default: OME-Zarr from level 1 down)
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
            "full_bias": self.full_bias, "engine": self.engine, "device": self.device,
            "device_requested": self.device_requested,
            "device_choice": self.device_choice, "batch_sections": self.batch_sections,
        }


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


def stage_global(vol: Volume, msk: Volume, records, outdir: Path, *, config: RunConfig, attrs: dict,
                 timings: dict) -> dict:
    """Gains, global fit, the apply one part per section, then the outputs ``corrected``, ``bias``,
    ``fields.json``, ``metrics.json`` in ``outdir`` (a private temporary folder)."""
    work = outdir / ".work" / "summaries"
    # the summaries the section tasks wrote (_fit_sections); the others (sections reused on resume, batched
    # fits) are made by the global stage
    made = [Summary(work / f"section_{r['index']}") if (work / f"section_{r['index']}").is_dir() else None
            for r in records]
    solution = solve_global(vol, msk, records, config=config, attrs=attrs, timings=timings, summaries=made,
                            work_dir=work)
    t0 = time.perf_counter()
    parts = apply_parts(vol, msk, solution, outdir / ".work" / "parts", tile_mib=config.tile_mib,
                        workers=1 if config.device == "cuda" else config.workers,
                        full_bias=config.full_bias or config.output_format == "nifti")
    timings["apply"] = time.perf_counter() - t0
    return finish(vol, msk, solution, parts, outdir, output_format=config.output_format, timings=timings,
                  threads=config.total_threads)


def _section_task(args):
    input_path, mask_path, bounds, index, voxel_size, config, threads, summary = args
    return fit_section(input_path, mask_path, bounds, index, params=config.section_n4, voxel_size=voxel_size,
                       threads=threads, engine=config.engine, device=config.device, summary=summary,
                       global_params=config.global_n4, gains=config.gains,
                       mask_sigma=config.mask.smoothing_sigma)


def _ingest(vol: Volume, path: Path) -> Volume:
    """Copy a NIfTI input to a plane-chunked Zarr so sections can be read at random (its octn4 attributes too)."""
    import zarr


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
    vol = open_volume(input_path, voxel_size=config.voxel_size)
    # the input is validated by a scan of its own, or, when the mask stage reads all of it anyway (a Zarr
    # input, no mask given, nothing to resume: a resumed run needs the input's digest first), by the mask
    # stage's smoothing pass (mask_stage.SectionScans): the same checks and digest, one read less
    fused = config.mask_path is None and not resume and vol.format != "nifti"
    scan = None
    if not fused:
        scan = scan_volume(vol, workers=config.workers)
        validate_scan(scan, vol.path, check_log_scale=config.check_log_scale)
    bounds = config.bounds(vol)
    timings["validate"] = time.perf_counter() - t_start
    with run_folder(outdir, overwrite=config.overwrite, resume=resume) as tmp:
        attrs = provenance("run", vol, config.as_dict(), engine=config.engine, device=config.device,
                           extra={"sections": [list(b) for b in bounds],
                                  "input_digest": None if scan is None else scan.digest})
        work = _ingest(vol, tmp / ".work" / "input.zarr") if vol.format == "nifti" else vol
        ext = ".nii.gz" if config.output_format == "nifti" else ".ome.zarr"
        mask_path = tmp / f"mask{ext}"
        t0 = time.perf_counter()
        reused = {"mask": False, "sections": []}
        if config.mask_path is None and fused:
            got = {}

            def validated(whole):
                validate_scan(whole, vol.path, check_log_scale=config.check_log_scale)
                got["scan"], got["keys"] = whole, _resume_keys(whole, vol, bounds, config)
                return {"input_digest": whole.digest, "resume_key": got["keys"]["mask"]}

            stage_mask(work, bounds, mask_path, params=config.mask, overwrite=True, workers=config.workers,
                       attrs=dict(attrs, output="mask"), validate=validated)
            scan, keys = got["scan"], got["keys"]
            attrs["input_digest"] = scan.digest
        elif config.mask_path is None:
            keys = _resume_keys(scan, vol, bounds, config)
            if resume and _reusable_mask(mask_path, keys["mask"]):
                reused["mask"] = True
                log.info("resume: the tissue mask in %s matches this run; reused", mask_path)
            else:
                stage_mask(work, bounds, mask_path, params=config.mask, overwrite=True, workers=config.workers,
                           attrs=dict(attrs, output="mask", resume_key=keys["mask"]))
        else:   # a user's mask is copied again (its content may have changed); its digest keys the sections
            digest = copy_mask(open_mask(config.mask_path, vol), mask_path, attrs=dict(attrs, output="mask"),
                               vol=work, overwrite=True)
            keys = _resume_keys(scan, vol, bounds, config, mask_digest=digest)
        timings["mask"] = time.perf_counter() - t0
        msk = open_volume(mask_path, voxel_size=vol.voxel_size)
        if msk.format == "nifti":   # sections read the mask at random: keep a Zarr copy for the run
            msk = _ingest(msk, tmp / ".work" / "mask.zarr")
        t0 = time.perf_counter()
        records = _fit_sections(work, msk, bounds, config, record_dir=tmp / ".work" / "sections",
                                keys=keys["sections"], resume=resume, reused=reused["sections"],
                                summary_dir=tmp / ".work" / "summaries")
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
                  keys=None, resume: bool = False, reused: list | None = None, summary_dir: Path | None = None
                  ) -> list[dict]:
    """Every section's record: those stored in ``record_dir`` with equal keys when resuming, the others fitted
    (each written to ``record_dir`` with its key as soon as it is done).  ``summary_dir``: each section
    fitted in a worker process also writes its summary for the global stage there (``section_<i>``, from
    the planes its fit read: :func:`octn4.section_stage.fit_section`); what was there before is removed."""
    done = _stored_records(record_dir, keys, reused if reused is not None else []) if resume and record_dir else {}
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
    if summary_dir is not None:
        shutil.rmtree(summary_dir, ignore_errors=True)
        summary_dir.mkdir(parents=True)

    def keep(rec):
        if record_dir is not None:
            rec = dict(rec, resume_key=keys[rec["index"]])
            write_json(rec, record_dir / f"section_{rec['index']}.json")
        done[rec["index"]] = rec

    todo = [i for i in range(len(bounds)) if i not in done]
    if todo:
        _fit_missing_sections(vol, msk, bounds, config, todo, keep, summary_dir)
    return assemble_sections(list(done.values()), len(bounds))


def _fit_missing_sections(vol: Volume, msk: Volume, bounds, config: RunConfig, todo, keep, summary_dir=None) -> None:
    _, _, zs, ys, xs = section_sampling(vol, bounds, 0, config.section_n4)
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
    jobs = [(vol.path, msk.path, bounds, i, vol.voxel_size, config, threads,
             None if summary_dir is None else summary_dir / f"section_{i}") for i in todo]
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

