"""The section stage: N4 on one section's own Z slab of input and mask, and the records it writes.

A section task reads only its planes: the fit grid (:mod:`octn4.shrink`;
tissue block means by default) with the depth model's profile divided out
(:func:`stack_depth_profile`, fitted from the per-plane statistics the mask
stage stored), fits the field (:func:`octn4.n4.fit_bias`, or several
equal-shaped sections at once on a GPU: :func:`fit_sections_batched`), and
returns a JSON record: index, Z range, fit summary, the field's lattice and
the histogram of the section-corrected log intensities that the gains stage
aligns.  :func:`assemble_sections` orders the records by index and checks
that they tile the volume.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np

from . import defaults
from .bspline import shrink_grid
from .depth import fit_depth_profiles
from .errors import InputError
from .fit_result import FitResult
from .gains import log_histogram
from .global_summary import section_summary, write_summary
from .io import KeptPlanes, Volume, open_mask, open_volume, read_attrs, write_json
from .n4 import fit_bias, fit_bias_batch
from .params import N4Params, shrink_factors
from .shrink import block_indices, block_mean_grid

__all__ = ["section_sampling", "section_fit_grid", "stack_depth_profile", "fit_section", "fit_sections_batched",
           "stage_section", "assemble_sections", "read_records", "read_assembled"]


def section_sampling(vol: Volume, bounds, index: int, params: N4Params):
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
    shape, s, zs, ys, xs = section_sampling(vol, bounds, index, params)
    z0 = bounds[index][0]
    if params.shrink_mode == "subsample":
        img = vol.read_planes(zs, ys, xs)
        if profile is not None:
            img = (img / np.exp(np.asarray(profile)[zs - z0])[:, None, None]).astype(np.float32)
        return shape, s, img, msk.read_planes(zs, ys, xs) > 0
    log_field = None if profile is None else (lambda zb: np.asarray(profile, np.float32)[zb - z0][:, None, None])
    return shape, s, *block_mean_grid(vol, msk, z0 + block_indices(shape[0], s[0]), s, log_field=log_field)


def stack_depth_profile(msk: Volume, bounds, params: N4Params):
    """The depth model's per-plane log profile of the whole stack (:mod:`octn4.depth`), or None.

    Fitted to the per-plane statistics the mask stage stored with the mask;
    every section task computes the same profile from them.
    """
    if params.depth_model == "none":
        return None

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


def _corrected_histogram(vol: Volume, bounds, index: int, params: N4Params, fit: FitResult, grid, grid_mask):
    """Histogram of the section-corrected log intensities of a fit grid (before the profile is attached).

    ``grid`` is the fit grid the field was fitted on (the profile already
    divided out), so ``log(grid) - lattice`` is the section-corrected value
    at each fit voxel; the gains stage aligns these histograms
    (:func:`octn4.gains.histogram_offsets`).
    """
    z0 = bounds[index][0]
    _, _, zs, ys, xs = section_sampling(vol, bounds, index, params)
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


#: A section whose planes (input at 4 bytes a voxel, mask at 1) exceed this is read again for its summary
#: rather than kept on local disk from its fit (:class:`octn4.io.KeptPlanes`).
KEEP_PLANES_MAX_BYTES = 8 << 30


def fit_section(input_path, mask_path, bounds, index: int, *, params: N4Params, voxel_size=None,
                threads: int = 1, engine: str = "octn4", device: str = "cpu", summary=None,
                global_params: N4Params | None = None, gains=None,
                mask_sigma: float = defaults.MASK.smoothing_sigma) -> dict:
    """N4 on one section; reads only that section's Z slab of input and mask.

    Returns a JSON-ready record: index, Z range, fit summary and the field
    (lattice) on the section's own full-resolution grid.  With ``summary``
    (a folder), also writes what the global pass needs from the section
    (:func:`octn4.global_summary.section_summary`: its share of the fit
    grid that ``global_params`` make, its end planes for ``gains``), from
    the planes its fit grid decompressed (kept on local disk under
    ``$TMPDIR`` meanwhile, :class:`octn4.io.KeptPlanes`, unless they
    exceed :data:`KEEP_PLANES_MAX_BYTES`): the same summary as one made
    from the volume afterwards.
    """
    vol = open_volume(input_path, voxel_size=voxel_size)
    msk = open_mask(mask_path, vol)
    z0, z1 = bounds[index]
    keep = summary is not None and \
        KeptPlanes.nbytes(vol, z0, z1) + KeptPlanes.nbytes(msk, z0, z1, tissue=True) <= KEEP_PLANES_MAX_BYTES
    with tempfile.TemporaryDirectory(prefix="octn4-section-") if keep else contextlib.nullcontext() as scratch:
        v, m = (vol, msk) if not keep else (KeptPlanes(vol, z0, z1, Path(scratch) / "input.npy"),
                                            KeptPlanes(msk, z0, z1, Path(scratch) / "mask.npy", tissue=True))
        stack = stack_depth_profile(msk, bounds, params)
        profile = None if stack is None else stack[z0:z1]
        shape, s, sub, sub_mask = section_fit_grid(v, m, bounds, index, params, profile)
        fit = fit_bias(sub, sub_mask, full_shape=shape, shrink=s, voxel_size=vol.voxel_size,
                       params=params, threads=threads, engine=engine, device=device)
        hist = _corrected_histogram(vol, bounds, index, params, fit, sub, sub_mask)
        rec = _section_record(bounds, index, _with_profile(fit, profile), hist)
        if summary is not None:
            write_summary(section_summary(v, m, rec, global_params=global_params, gains=gains,
                                          mask_sigma=mask_sigma), summary)
        if keep:
            v.remove()
            m.remove()
    return rec


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
                  threads=1, engine="octn4", device="cpu", attrs=None, overwrite=False, summary=None,
                  global_params: N4Params | None = None, gains=None,
                  mask_sigma: float = defaults.MASK.smoothing_sigma) -> dict:
    """:func:`fit_section` (with its ``summary``), the record written to ``out_json``."""
    out_json = Path(out_json)
    for out in (out_json, summary):
        if out is not None and Path(out).exists() and not overwrite:
            raise InputError("output already exists; pass --overwrite to replace it", out)
    rec = fit_section(input_path, mask_path, bounds, index, params=params, voxel_size=voxel_size,
                      threads=threads, engine=engine, device=device, summary=summary,
                      global_params=global_params, gains=gains, mask_sigma=mask_sigma)
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


def read_assembled(sections_json, vol: Volume) -> list[dict]:
    try:
        records = json.loads(Path(sections_json).read_text())["sections"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read assembled sections ({exc})", sections_json) from None
    records = assemble_sections(records, len(records))
    if records[-1]["z_stop"] != vol.shape[0] or records[0]["z_start"] != 0:
        raise InputError(f"sections cover planes {records[0]['z_start']}..{records[-1]['z_stop']} but the "
                         f"volume has {vol.shape[0]}", sections_json)
    return records

