"""The tissue-mask stage: per-plane thresholds per section, then each section's mask as an output part,
then the parts taken into one mask (:func:`stage_mask` in one process pool; the ``stage_mask_*_files``
functions as three kinds of task, for a workflow that runs the sections on many nodes).

==================  ====================================================  =================================
task                reads                                                 writes
==================  ====================================================  =================================
thresholds *i*      section *i*'s planes (and its smoothing halo)          ``thresholds_i/``: the planes'
                                                                          thresholds, section *i*'s share
                                                                          of the input scan
section *i*         its chunk rows and the Z closing's reach, the         ``mask_part_i/``: the mask of the
                    thresholds of the sections that reach touches         chunk rows it owns, level 1 too,
                                                                          the planes' tissue statistics
finish              every ``thresholds_i/`` and ``mask_part_i/``          the mask (shards linked in), with
                                                                          thresholds, statistics, provenance
==================  ====================================================  =================================

The mask is the same bit for bit whichever way it is made, and equals
:func:`octn4.mask.tissue_mask` on the whole volume.  The input is validated
as :func:`octn4.io.scan_volume` would: each thresholds task scans the
slabs that start in its section (:func:`octn4.io.scan_rows`) and refuses
NaN, Inf or negative values at once; the finishing task combines the scans
in Z order and refuses an empty, constant or log-scaled volume, so the
digest and the checks equal a scan of the whole.  :func:`stage_mask` can do
the same on the planes its smoothing pass reads (``validate=``,
:class:`SectionScans`), so ``octn4 run`` reads its input once less.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

from .apply import ordered_parts, owned_planes, peak_rss_mib
from .depth import plane_log_medians
from .errors import InputError
from .io import (
    CHUNKS,
    PartWriter,
    RowScan,
    ScanPart,
    ScanResult,
    Volume,
    atomic_dir,
    combine_scan,
    create_writer,
    open_volume,
    scan_part_dict,
    scan_part_from,
    scan_rows,
    scanned_planes,
    take_parts,
    validate_scan,
    write_json,
)
from .mask import (
    KeptSection,
    MaskParams,
    section_plane_thresholds,
    sections_reached,
    write_section_mask,
    write_tissue_mask,
)
from .progress import progress
from .workers import worker_pool

__all__ = ["stage_mask", "copy_mask", "mask_part", "stage_mask_thresholds_files", "stage_mask_section_files",
           "stage_mask_finish_files", "PlaneStatsRecorder"]

#: The part store a mask part folder holds (beside its ``part.json``).
MASK_STORE = "mask.zarr"


class PlaneStatsRecorder:
    """Per-plane median log tissue intensity and tissue pixels, for the depth model (:mod:`octn4.depth`)."""

    def __init__(self, depth: int):
        self.log_median = np.full(depth, np.nan)
        self.pixels = np.zeros(depth, np.int64)

    def __call__(self, z0: int, planes, mask) -> None:
        self.set(z0, *plane_log_medians(planes, mask))

    def set(self, z0: int, med, n) -> None:
        self.log_median[z0:z0 + len(med)] = med
        self.pixels[z0:z0 + len(n)] = n

    def add_part(self, part: dict) -> None:
        """The statistics a mask part recorded (:func:`mask_part`)."""
        med = np.array([math.nan if v is None else v for v in part["plane_log_median"]], np.float64)
        self.set(int(part["planes"][0]), med, np.asarray(part["plane_tissue_pixels"], np.int64))

    def store(self, attrs: dict) -> None:
        attrs["plane_log_median"] = [None if not math.isfinite(v) else float(v) for v in self.log_median]
        attrs["plane_tissue_pixels"] = [int(v) for v in self.pixels]


def _store_thresholds(attrs: dict, thresholds) -> None:
    attrs["plane_thresholds"] = [None if not math.isfinite(t) else float(t) for t in thresholds]


class SectionScans:
    """The input scan taken from the mask's smoothing pass: each section's share (a
    :class:`octn4.io.RowScan` fed the planes that pass decompresses, so validating the input costs no read
    of its own), checked for NaN, Inf and negative values as soon as the section is read, then combined in
    Z order into what :func:`octn4.io.scan_volume` gives."""

    def __init__(self, vol: Volume, bounds):
        self.vol, self.bounds = vol, [tuple(b) for b in bounds]
        self.parts: dict[int, ScanPart] = {}

    def start(self, i: int) -> RowScan:
        return RowScan(self.vol, *self.bounds[i])

    def done(self, i: int, part: ScanPart) -> None:
        check_section_scan(self.vol, self.bounds, i, part)
        self.parts[i] = part

    @property
    def complete(self) -> bool:
        return len(self.parts) == len(self.bounds)

    def combined(self) -> ScanResult:
        return combine_scan(self.vol, [self.parts[i] for i in range(len(self.bounds))])


def check_section_scan(vol: Volume, bounds, index: int, part: ScanPart) -> None:
    """Refuse NaN, Inf or negative values in section ``index``'s share of the scan, naming its planes."""
    if part.nonfinite or part.negative:
        try:
            validate_scan(combine_scan(vol, [part]), vol.path, check_log_scale=False)
        except InputError as exc:
            raise _section_problem(exc, index, scanned_planes(vol, *bounds[index])) from None


def stage_mask(vol: Volume, bounds, out_path, *, params: MaskParams, attrs: dict, overwrite=False,
               workers: int = 1, validate=None) -> np.ndarray:
    """Write the tissue mask of ``vol`` (uint8, 1 = tissue) to ``out_path``, with per-plane statistics.

    Each section is smoothed once: its threshold pass keeps the smoothed
    planes its mask pass needs on local disk (:class:`octn4.mask.KeptSection`,
    in a temporary directory under ``$TMPDIR``, removed as each section's
    mask is written: a few sections' worth at a time, float32, plus their
    raw planes).  With ``workers > 1`` (and a Zarr input, which sections can
    read at random) the passes run one section per task in a process pool,
    and each section's mask task writes the chunk rows it owns
    (:func:`octn4.apply.owned_planes`) as an output part (:func:`mask_part`),
    with their first pyramid level, as soon as the sections its Z closing
    reaches have their thresholds; the parts are then taken into the mask
    by link, in Z order (:func:`_mask_in_parallel`).  The mask equals the
    serial one bit for bit.  Each worker holds what the serial stage holds
    (a slab and its halo).

    ``validate(scan)``: the stage also scans the input (:class:`SectionScans`:
    each section's share from the planes its smoothing reads, NaN, Inf and
    negative values refused there), and calls ``validate`` with the whole
    :class:`octn4.io.ScanResult` once every section is thresholded; it may
    raise, and the attributes it returns are added to the mask's.
    """
    stats = PlaneStatsRecorder(vol.shape[0])
    workers = min(workers, len(bounds)) if vol.format != "nifti" else 1
    scans = SectionScans(vol, bounds) if validate is not None else None
    extra = {}

    def scanned():
        extra.update(validate(scans.combined()) or {})

    out_path = Path(out_path)
    with create_writer(out_path, vol.shape, vol.voxel_size, dtype=np.uint8, reduce="max", chunks=CHUNKS,
                       attrs=attrs, overwrite=overwrite, affine=vol.affine) as w, \
            tempfile.TemporaryDirectory(prefix="octn4-mask-") as scratch:
        with progress(len(bounds) * (2 if workers > 1 else 1), "tissue mask") as advance:
            if workers > 1:
                with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.parts-", dir=out_path.parent) as parts:
                    thresholds = _mask_in_parallel(vol, bounds, w, params, workers, stats, advance, scratch,
                                                   Path(parts), scans=scans, scanned=scanned)
            else:
                thresholds = write_tissue_mask(vol, bounds, w, params=params, progress=lambda i: advance(),
                                               plane_stats=stats, scratch=scratch, scans=scans)
                if scans is not None:
                    scanned()
        w.attrs.update(extra)
        _store_thresholds(w.attrs, thresholds)
        stats.store(w.attrs)
        w.commit()
    return thresholds


class _StatsList:
    """The planes' statistics a mask task computes, to send back."""

    def __init__(self):
        self.stats = []

    def __call__(self, z0, planes, mask):
        self.stats.append((z0, *plane_log_medians(planes, mask)))


def mask_part(vol: Volume, bounds, i: int, thresholds, out_dir, *, params: MaskParams,
              kept: KeptSection | None = None, overwrite: bool = False) -> dict:
    """Write section ``i``'s part of the mask to the folder ``out_dir`` (made complete, or not at all).

    The folder holds a :class:`octn4.io.PartWriter` store (:data:`MASK_STORE`:
    the chunk rows :func:`octn4.apply.owned_planes` gives the section, with
    their first pyramid level) and ``part.json``: the planes, the section,
    the planes' median log tissue intensity and tissue pixels, the time
    taken.  ``thresholds``: every plane's threshold (at least those of the
    sections the Z closing reaches, :func:`octn4.mask.sections_reached`).
    ``kept``: what the section's threshold pass kept (then nothing is read
    or smoothed again).  Returns ``part.json``'s content.
    """
    t0 = time.perf_counter()
    planes = owned_planes(bounds, i, vol.shape[0]) if kept is None else kept.masked
    stats = _StatsList()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with PartWriter(tmp / MASK_STORE, vol.shape, owned=planes, dtype=np.uint8, chunks=CHUNKS,
                        voxel_size=vol.voxel_size, reduce="max") as w:
            write_section_mask(vol, bounds, i, thresholds, w, params=params, plane_stats=stats, kept=kept,
                               planes=None if kept is not None else planes)
            w.commit()
        med = [float(v) for _, m, _ in stats.stats for v in m]
        part = {"index": i, "planes": list(planes), "section": list(bounds[i]),
                "plane_log_median": [v if math.isfinite(v) else None for v in med],
                "plane_tissue_pixels": [int(v) for _, _, n in stats.stats for v in n],
                "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mib": peak_rss_mib()["self"]}
        write_json(part, tmp / "part.json")
    return part


def _kept(scratch, bounds, i: int, depth: int, params: MaskParams) -> KeptSection:
    return KeptSection(Path(scratch) / f"section_{i}", bounds, i, depth, params,
                       masked=owned_planes(bounds, i, depth))


def _mask_thresholds_task(job):
    path, voxel_size, bounds, i, params, scratch, scan = job
    vol = open_volume(path, voxel_size=voxel_size)
    rows = RowScan(vol, *bounds[i]) if scan else None
    thr = section_plane_thresholds(vol, bounds, i, params=params, keep=_kept(scratch, bounds, i, vol.shape[0], params),
                                   scan=rows, check=lambda part: check_section_scan(vol, bounds, i, part))
    return "thresholds", i, (thr, None if rows is None else rows.part)


def _mask_part_task(job):
    path, voxel_size, bounds, i, params, scratch, thresholds, part = job
    vol = open_volume(path, voxel_size=voxel_size)
    kept = _kept(scratch, bounds, i, vol.shape[0], params)
    got = mask_part(vol, bounds, i, thresholds, part, params=params, kept=kept, overwrite=True)
    kept.remove()
    return "part", i, got


def _mask_in_parallel(vol: Volume, bounds, writer, params: MaskParams, workers: int, stats, advance, scratch,
                      parts: Path, *, scans: SectionScans | None = None, scanned=None) -> np.ndarray:
    """Thresholds and mask parts of the sections in a pool, then the parts taken into ``writer`` in Z order.

    Section ``i``'s part (the chunk rows it owns) is written by its own task
    once the sections that part's Z closing reaches
    (:func:`octn4.mask.sections_reached`) have their thresholds;
    thresholding runs at most ``workers + 1`` sections ahead of the parts
    finished in Z order, which bounds the planes kept on disk.  A section
    inside one chunk row owns no rows and has no part.  With ``scans``, each
    thresholds task also scans its section (checked in the task), and
    ``scanned()`` is called as soon as every section is thresholded.
    """
    n, depth = len(bounds), vol.shape[0]
    owned = [owned_planes(bounds, i, depth) for i in range(n)]
    has_part = [a < b for a, b in owned]
    reach = [sections_reached(bounds, owned[i], depth, params) if has_part[i] else range(0) for i in range(n)]
    thresholds = np.full(depth, np.nan, np.float32)
    job = (vol.path, vol.voxel_size, bounds)
    thresholded, submitted, finished = set(), set(), set()
    next_thr = through = 0                         # parts 0 .. through - 1 are all finished
    with worker_pool(workers, f"a mask worker process was killed (most often out of memory: {workers} workers "
                              "each held one slab of a section); use fewer --workers or more memory") as pool:
        running = set()
        while through < n:
            limit = max(through + workers + 1, (reach[through][-1] + 1) if has_part[through] else 0)
            while next_thr < min(n, limit):
                running.add(pool.submit(_mask_thresholds_task, job + (next_thr, params, scratch,
                                                                      scans is not None)))
                next_thr += 1
            for i in range(through, n):
                if has_part[i] and i not in submitted and all(j in thresholded for j in reach[i]):
                    running.add(pool.submit(_mask_part_task, job + (i, params, scratch, thresholds,
                                                                    parts / f"part_{i}")))
                    submitted.add(i)
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                kind, i, got = f.result()
                if kind == "part":
                    stats.add_part(got)
                    finished.add(i)
                else:
                    z0, z1 = bounds[i]
                    thresholds[z0:z1], part = got
                    thresholded.add(i)
                    if scans is not None:
                        scans.parts[i] = part
                        if scans.complete:
                            scanned()
                    if not has_part[i]:
                        finished.add(i)
                        advance()
                advance()
            while through < n and through in finished:
                through += 1
    take_parts(writer, [(parts / f"part_{i}" / MASK_STORE, owned[i]) for i in range(n) if has_part[i]])
    return thresholds


# --------------------------------------------------------------------------- the stage as workflow tasks


def _section_problem(exc: InputError, index: int, planes) -> InputError:
    return InputError(f"planes {planes[0]}..{planes[1]} (scanned by section {index}'s thresholds task): "
                      f"{exc.problem}", exc.path)


def stage_mask_thresholds_files(input_path, bounds, index: int, out_dir, *, params: MaskParams, voxel_size=None,
                                overwrite: bool = False) -> dict:
    """Section ``index``'s thresholds task: its planes' thresholds and its share of the input scan, in the
    folder ``out_dir`` (``thresholds.json``, ``thresholds.npy``, ``scan_sample.npy``).

    NaN, Inf or negative values in the slabs it scans are refused here, at
    once, naming the section; what needs the whole volume (empty, constant,
    log-scaled) is checked by :func:`stage_mask_finish_files`.
    """
    t0 = time.perf_counter()
    vol = open_volume(input_path, voxel_size=voxel_size)
    bounds = [tuple(int(v) for v in b) for b in bounds]
    if not 0 <= index < len(bounds):
        raise InputError(f"section index {index} is out of range (0..{len(bounds) - 1})")
    z0, z1 = bounds[index]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        scan = scan_rows(vol, z0, z1)
        check_section_scan(vol, bounds, index, scan)
        thresholds = section_plane_thresholds(vol, bounds, index, params=params)
        np.save(tmp / "thresholds.npy", np.asarray(thresholds, np.float32))
        picks = scan.picks
        np.save(tmp / "scan_sample.npy", np.concatenate(picks) if picks else np.zeros(0, vol.dtype))
        record = {"index": index, "sections": [list(b) for b in bounds], "mask": params.as_dict(),
                  "scan": scan_part_dict(scan), "seconds": round(time.perf_counter() - t0, 3),
                  "peak_rss_mib": peak_rss_mib()["self"]}
        write_json(record, tmp / "thresholds.json")
    return record


def _read_thresholds(dirs, bounds, params: MaskParams, vol: Volume) -> dict[int, tuple[np.ndarray, object]]:
    """The thresholds folders by section index, checked against the layout and the mask parameters:
    ``{index: (thresholds of its planes, its ScanPart)}``."""
    out = {}
    layout = [list(b) for b in bounds]
    for d in dirs:
        d = Path(d)
        try:
            rec = json.loads((d / "thresholds.json").read_text())
            index = int(rec["index"])
            thr = np.load(d / "thresholds.npy")
            scan = scan_part_from(rec["scan"], np.load(d / "scan_sample.npy"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not an octn4 thresholds folder ({exc})", d) from None
        if rec["sections"] != layout:
            raise InputError(f"thresholds made for sections {rec['sections']}, but the layout is {layout}", d)
        if rec["mask"] != params.as_dict():
            raise InputError(f"thresholds made with mask parameters {rec['mask']}, not {params.as_dict()}", d)
        if not 0 <= index < len(bounds) or thr.shape != (bounds[index][1] - bounds[index][0],):
            raise InputError(f"thresholds of section {index} do not fit the layout {layout}", d)
        if index in out:
            raise InputError(f"section {index}'s thresholds were given twice", d)
        out[index] = (thr, scan)
    return out


def _thresholds_of(given: dict, bounds, depth: int, needed) -> np.ndarray:
    missing = sorted(set(needed) - set(given))
    if missing:
        raise InputError(f"thresholds missing for sections {missing} (their thresholds tasks' folders must be "
                         "given)")
    thr = np.full(depth, np.nan, np.float32)
    for i, (t, _) in given.items():
        z0, z1 = bounds[i]
        thr[z0:z1] = t
    return thr


def stage_mask_section_files(input_path, bounds, index: int, threshold_dirs, out_dir, *, params: MaskParams,
                             voxel_size=None, overwrite: bool = False) -> dict:
    """Section ``index``'s mask task: its part of the mask (:func:`mask_part`) in ``out_dir``, from the
    thresholds folders of (at least) the sections its Z closing reaches.  It reads and smooths its chunk
    rows with that reach again (a task on another node has no kept planes)."""
    vol = open_volume(input_path, voxel_size=voxel_size)
    bounds = [tuple(int(v) for v in b) for b in bounds]
    if not 0 <= index < len(bounds):
        raise InputError(f"section index {index} is out of range (0..{len(bounds) - 1})")
    depth = vol.shape[0]
    planes = owned_planes(bounds, index, depth)
    needed = sections_reached(bounds, planes, depth, params) if planes[0] < planes[1] else ()
    thr = _thresholds_of(_read_thresholds(threshold_dirs, bounds, params, vol), bounds, depth, needed)
    return mask_part(vol, bounds, index, thr, out_dir, params=params, overwrite=overwrite)


def stage_mask_finish_files(input_path, bounds, threshold_dirs, part_dirs, out_path, *, params: MaskParams,
                            attrs: dict, voxel_size=None, check_log_scale: bool = True,
                            overwrite: bool = False) -> np.ndarray:
    """The mask from its tasks' folders: the input validated from the sections' scans (combined in Z
    order: what one scan of the whole gives), the parts' shards linked in (their first pyramid level
    used, NIfTI streamed), the per-plane thresholds and statistics stored.  Returns the thresholds."""
    vol = open_volume(input_path, voxel_size=voxel_size)
    bounds = [tuple(int(v) for v in b) for b in bounds]
    depth = vol.shape[0]
    given = _read_thresholds(threshold_dirs, bounds, params, vol)
    thresholds = _thresholds_of(given, bounds, depth, range(len(bounds)))
    validate_scan(combine_scan(vol, [given[i][1] for i in range(len(bounds))]), vol.path,
                  check_log_scale=check_log_scale)
    parts = ordered_parts(part_dirs, bounds, depth)
    stats = PlaneStatsRecorder(depth)
    with create_writer(out_path, vol.shape, vol.voxel_size, dtype=np.uint8, reduce="max", chunks=CHUNKS,
                       attrs=attrs, overwrite=overwrite, affine=vol.affine) as w:
        take_parts(w, [(p["path"] / MASK_STORE, p["planes"]) for p in parts if p["planes"][0] < p["planes"][1]])
        for p in parts:
            stats.add_part(p)
        _store_thresholds(w.attrs, thresholds)
        stats.store(w.attrs)
        w.commit()
    return thresholds


def copy_mask(src: Volume, out_path, *, attrs: dict, vol: Volume | None = None, slab: int = 16,
              overwrite: bool = False) -> str:
    """Write a user-supplied mask (any non-zero value is tissue) as the run's uint8 mask, with the per-plane
    statistics of ``vol`` under it when given.  Returns the digest of the mask written (CRC-32)."""
    stats = PlaneStatsRecorder(src.shape[0])
    crc = zlib.crc32(repr(tuple(src.shape)).encode())
    with create_writer(out_path, src.shape, src.voxel_size, dtype=np.uint8, reduce="max", chunks=CHUNKS,
                       attrs=attrs, affine=src.affine, overwrite=overwrite) as w:
        for z0 in range(0, src.shape[0], slab):
            block = (src.read(z0, z0 + slab) != 0).astype(np.uint8)
            crc = zlib.crc32(block, crc)
            w.write(z0, block)
            if vol is not None:
                stats(z0, vol.read(z0, z0 + block.shape[0]), block > 0)
        if vol is not None:
            stats.store(w.attrs)
        w.commit()
    return f"crc32:{crc:08x}"
