"""QC report: pictures and numbers a person can judge at a glance.

Built from a run's stored outputs alone (``corrected``, ``mask``,
``fields.json``, ``metrics.json``), so it can be regenerated without
recomputing.  The bias views are evaluated from ``fields.json`` at the
views' voxels (:mod:`octn4.bias`: what the run divided by, whatever level
the stored bias starts at); the input view is ``corrected * bias``, which
is the input up to float rounding.  Every
view is read with strides so that no image exceeds ``max_px`` on a side:
the report's memory does not grow with the volume.

Writes ``report.html`` (self-contained: images embedded, no scripts, opens
offline), ``views.png``, ``profile.png``, ``report.json`` (the numbers shown)
and ``octn4_mqc.tsv`` (a MultiQC custom-content table).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from .bias import BiasModel
from .errors import InputError
from .io import atomic_dir, open_volume, write_json

__all__ = ["build_report", "orthogonal_views"]

VIEW_NAMES = ("XY", "XZ", "YZ")


def _output(results: Path, name: str) -> Path:
    for ext in (".ome.zarr", ".nii.gz", ".nii"):
        if (results / f"{name}{ext}").exists():
            return results / f"{name}{ext}"
    raise InputError(f"no {name} output (.ome.zarr or .nii.gz) in the results folder", results)


def _cuts(vol, z: int, y: int, x: int, max_px: int) -> dict:
    """The XY, XZ and YZ planes through ``vol`` at ``(z, y, x)``, at most ``max_px`` a side.

    Returns, per view, the image (rows, cols) and the physical size (mm) of
    one displayed pixel.  Zarr volumes are read view by view (a row or a
    column of each sampled plane touches only the chunks that hold it); a
    NIfTI file, which can only be read forwards, in one pass over the sampled
    planes, keeping a row and a column of each.  ``y`` and ``x`` are
    multiples of the Y/X strides (see :func:`_centre`).
    """
    kz, ky, kx = (max(1, math.ceil(n / max_px)) for n in vol.shape)
    vz, vy, vx = vol.voxel_size
    zs = list(range(0, vol.shape[0], kz))
    sy, sx = slice(0, vol.shape[1], ky), slice(0, vol.shape[2], kx)
    px = {"XY": (vy * ky, vx * kx), "XZ": (vz * kz, vx * kx), "YZ": (vz * kz, vy * ky)}
    if vol.format != "nifti":
        return {"XY": (vol.read(z, z + 1, sy, sx)[0], px["XY"]),
                "XZ": (vol.read_planes(zs, slice(y, y + 1), sx)[:, 0, :], px["XZ"]),
                "YZ": (vol.read_planes(zs, sy, slice(x, x + 1))[:, :, 0], px["YZ"])}
    sampled = set(zs)
    planes_z = sorted(sampled | {z})
    xy, rows, cols = None, [], []
    for k, plane in zip(planes_z, vol.iter_planes(planes_z, sy, sx)):
        if k == z:
            xy = plane
        if k in sampled:
            rows.append(plane[y // ky])
            cols.append(plane[:, x // kx])
    return {"XY": (xy, px["XY"]), "XZ": (np.stack(rows), px["XZ"]), "YZ": (np.stack(cols), px["YZ"])}


def _model_cuts(model: BiasModel, like: dict, z: int, y: int, x: int, max_px: int) -> dict:
    """:func:`_cuts` of the bias evaluated from its lattices (:mod:`octn4.bias`): the same voxels the
    other volumes' cuts sample, whatever resolution the stored bias has."""
    kz, ky, kx = (max(1, math.ceil(n / max_px)) for n in model.shape)
    zs, ys, xs = (np.arange(0, n, k) for n, k in zip(model.shape, (kz, ky, kx)))
    return {"XY": (model.at([z], ys, xs)[0], like["XY"][1]),
            "XZ": (model.at(zs, [y], xs)[:, 0, :], like["XZ"][1]),
            "YZ": (model.at(zs, ys, [x])[:, :, 0], like["YZ"][1])}


def _centre(mask_path, metrics, max_px: int) -> tuple[int, int, int]:
    """Middle plane of the middle section, and the tissue's centre in that plane (from a strided read)."""
    secs = metrics["sections"]
    mid = secs[len(secs) // 2]
    z = (mid["z_start"] + mid["z_stop"]) // 2
    m = open_volume(mask_path)
    ky, kx = (max(1, math.ceil(n / max_px)) for n in m.shape[1:])
    plane = m.read(z, z + 1, slice(0, None, ky), slice(0, None, kx))[0] > 0
    if plane.any():
        yy, xx = np.nonzero(plane)
        return z, int(np.median(yy)) * ky, int(np.median(xx)) * kx
    return z, m.shape[1] // 2, m.shape[2] // 2


def orthogonal_views(results, metrics, *, max_px: int = 512, mask=None) -> dict:
    """XY, XZ and YZ cuts of input, corrected, bias and mask, with the cut positions.

    ``mask`` is the run's tissue mask; by default the one in ``results``.
    """
    results = Path(results)
    mask_path = Path(mask) if mask is not None else _output(results, "mask")
    z, y, x = _centre(mask_path, metrics, max_px)
    vols = {"corrected": open_volume(_output(results, "corrected")), "mask": open_volume(mask_path)}
    if vols["mask"].shape != vols["corrected"].shape:
        raise InputError(f"mask shape {vols['mask'].shape} does not match the results' {vols['corrected'].shape}",
                         mask_path)
    cuts = {n: _cuts(v, z, y, x, max_px) for n, v in vols.items()}
    if (results / "fields.json").exists():          # the bias the run divided by, at the cuts' own voxels
        cuts["bias"] = _model_cuts(BiasModel.from_run(results), cuts["corrected"], z, y, x, max_px)
    else:
        stored = open_volume(_output(results, "bias"))
        if stored.shape != vols["corrected"].shape:
            raise InputError("no fields.json, and the stored bias starts at a reduced pyramid level", results)
        cuts["bias"] = _cuts(stored, z, y, x, max_px)
    views = {}
    for name in VIEW_NAMES:
        cut = {n: c[name] for n, c in cuts.items()}
        views[name] = {
            "input": cut["corrected"][0] * cut["bias"][0],
            "corrected": cut["corrected"][0],
            "bias": cut["bias"][0],
            "mask": cut["mask"][0] > 0,
            "pixel_mm": cut["corrected"][1],
        }
    return {"views": views, "position": {"z": z, "y": y, "x": x}}


def _display_range(views) -> tuple[float, float]:
    """One intensity window for input and corrected: 1st-99.5th percentile of their tissue."""
    vals = [v[k][v["mask"]] for v in views.values() for k in ("input", "corrected")]
    vals = np.concatenate([a for a in vals if a.size] or [np.concatenate(
        [v["input"].ravel() for v in views.values()])])
    lo, hi = np.percentile(vals, [1, 99.5])
    return float(lo), float(hi)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _views_figure(data, sections, voxel_size) -> tuple[bytes, tuple[float, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = data["views"]
    lo, hi = _display_range(views)
    b = np.concatenate([v["bias"][v["mask"]] for v in views.values()] or [np.ones(1)])
    blo, bhi = np.percentile(b, [1, 99]) if b.size else (0.5, 2.0)
    fig, axes = plt.subplots(3, 3, figsize=(13, 11), squeeze=False)
    fig.subplots_adjust(hspace=0.35)
    rows = (("input", "input", "gray", (lo, hi)), ("corrected", "corrected", "gray", (lo, hi)),
            ("bias", "bias field", "viridis", (blo, bhi)))
    pos = data["position"]
    for c, name in enumerate(VIEW_NAMES):
        v = views[name]
        ph, pw = v["pixel_mm"]
        h, w = v["input"].shape
        extent = (0, w * pw, h * ph, 0)
        for r, (key, label, cmap, (vmin, vmax)) in enumerate(rows):
            ax = axes[r][c]
            im = ax.imshow(v[key], cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
            if key != "bias" and v["mask"].any() and not v["mask"].all():
                ax.contour(v["mask"].astype(float), levels=[0.5], colors="cyan", linewidths=0.6,
                           extent=(0, w * pw, 0, h * ph), origin="upper")
            if name != "XY":   # section boundaries cross the XZ / YZ cuts
                for z0, _ in sections[1:]:
                    ax.axhline(z0 * voxel_size[0], color="orange", lw=0.5, ls=":")
            cut = {"XY": f"z = {pos['z']}", "XZ": f"y = {pos['y']}", "YZ": f"x = {pos['x']}"}[name]
            ax.set_title(f"{label}: {name} ({cut})", fontsize=9)
            ax.set_xlabel("mm", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 2:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle("Same display window for input and corrected; cyan: tissue mask; orange: section boundaries",
                 fontsize=10)
    png = _png(fig)
    plt.close(fig)
    return png, (lo, hi)


def _profile_figure(metrics, voxel_size) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = metrics["profile"]
    z = np.arange(len(prof["median_before"])) * voxel_size[0]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for key, label, color in (("median_before", "input", "tab:red"), ("median_after", "corrected", "tab:blue")):
        vals = np.array([np.nan if v is None else v for v in prof[key]], float)
        ax.plot(z, vals, color=color, lw=1.2, label=label)
    for s in metrics["sections"][1:]:
        ax.axvline(s["z_start"] * voxel_size[0], color="gray", ls="--", lw=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("depth z (mm); dashed: section boundaries")
    ax.set_ylabel("median tissue intensity")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    png = _png(fig)
    plt.close(fig)
    return png


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _pair(row, key, digits=3):
    return f"{_fmt(row.get(f'{key}_before'), digits)} &rarr; {_fmt(row.get(f'{key}_after'), digits)}"


def _section_table(sections) -> str:
    head = ("<tr><th>section</th><th>planes</th><th>tissue</th><th>median</th><th>step to next (log)</th>"
            "<th>depth slope (log/mm)</th><th>CV</th><th>N4 iterations</th><th>final control points (shrink)</th>"
            "<th>depth model range (log) / line (log/mm)</th><th>gain (anchor)</th><th>flags</th></tr>")
    rows = []
    for s in sections:
        n4 = s.get("n4", {})
        flags = s.get("flags", [])
        cls = ' class="flag"' if flags else ""
        gain = n4.get("gain_log")
        rows.append(
            f"<tr{cls}><td>{s['index']}</td><td>{s['z_start']}&ndash;{s['z_stop'] - 1}</td>"
            f"<td>{_fmt(s['tissue_fraction'], 2)}</td><td>{_pair(s, 'median')}</td>"
            f"<td>{_pair(s, 'step_to_next', 2)}</td><td>{_pair(s, 'depth_slope_per_mm', 2)}</td>"
            f"<td>{_pair(s, 'cv', 2)}</td><td>{_fmt(n4.get('iterations'))}</td>"
            f"<td>{_fmt(n4.get('final_control_points'))} ({_fmt(n4.get('shrink'))})</td>"
            f"<td>{_depth_cell(n4)}</td>"
            f"<td>{_fmt(None if gain is None else math.exp(gain), 3)}{_anchor_cell(n4)}</td>"
            f"<td>{html.escape(', '.join(flags)) or 'ok'}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _depth_cell(n4) -> str:
    if n4.get("depth_profile_range") is not None:
        return f"{_fmt(n4.get('depth_profile_range'), 3)} (curve)"
    if n4.get("depth_slope_per_mm") is not None:
        return f"{_fmt(n4.get('depth_slope_per_mm'), 3)} (line)"
    return "none"


def _anchor_cell(n4) -> str:
    a = n4.get("gain_anchor_log")
    return "" if a is None else f" ({math.exp(a):.3f})"


def _facts_table(metrics) -> str:
    p = metrics.get("provenance", {})
    params = p.get("parameters", {})
    t = metrics.get("timings_s", {})
    rss = metrics.get("peak_rss_mib", {})
    facts = [
        ("input", p.get("input", metrics.get("input"))),
        ("shape (Z, Y, X)", metrics.get("shape")),
        ("voxel size (mm)", f"{metrics.get('voxel_size_mm')} ({p.get('voxel_size_source', '?')})"),
        ("sections", len(metrics.get("sections", []))),
        ("engine / device", f"{p.get('engine')} / {p.get('device')}"
                            + (f" ({params['device_choice']})" if params.get("device_choice") else "")),
        ("per-section N4", json.dumps(params.get("section_n4"))),
        ("global N4", json.dumps(params.get("global_n4"))),
        ("global fit", json.dumps({k: metrics.get("global_fit", {}).get(k)
                                   for k in ("shrink", "fit_shape", "iterations", "converged")})),
        ("fit grids (shrink mode)", _shrink_modes(params)),
        ("control-point rule", _control_rule(params)),
        ("section gains", json.dumps(params.get("gains"))),
        ("gain boundaries", _gain_boundaries(metrics.get("summary", {}).get("gain_boundaries", []))),
        ("tissue mask", json.dumps(params.get("mask"))),
        ("timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in t.items())),
        ("peak memory (MiB, main process)", _fmt(rss.get("self"), 4)),
        ("octn4", p.get("octn4_version")),
        ("libraries", ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items())),
        ("created", p.get("created")),
        ("command", " ".join(p.get("command", []))),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return f"<table class='facts'>{rows}</table>"


def _shrink_modes(params) -> str:
    sec, glo = params.get("section_n4") or {}, params.get("global_n4") or {}
    def cap(d):
        return f", at most {d['fit_voxels_per_span']} fit voxels per span" if d.get("fit_voxels_per_span") else ""

    return (f"per section: {sec.get('shrink_mode', 'subsample')}, shrink asked {sec.get('shrink_factor')}{cap(sec)}; "
            f"global: {glo.get('shrink_mode', 'subsample')}, shrink asked {glo.get('shrink_factor') or 'auto'}"
            f"{cap(glo)} (shrink used: per section below, global in the global fit row)")


def _control_rule(params) -> str:
    out = []
    for name in ("section_n4", "global_n4"):
        d = params.get(name) or {}
        rule = d.get("control_point_rule", "reference")
        if rule == "fit-grid":
            rule += f" ({d.get('fit_voxels_per_control_point', 1)} fit voxel(s) per control point)"
        out.append(f"{name.split('_')[0]}: {rule}, "
                   f"{len(d.get('maximum_number_of_iterations') or [])} level(s) asked, spacing "
                   f"{d.get('spline_distance_mm')} mm at level 0"
                   + (", depth line" if d.get("depth_line") else "")
                   + (f", depth model {d.get('depth_model')} (spans {d.get('depth_spans') or 'auto'}, prior "
                      f"{d.get('depth_prior')})" if d.get("depth_model", "none") != "none" else ""))
    return "; ".join(out) + " (levels used and final control points: per section below)"


def _gain_boundaries(bounds) -> str:
    if not bounds:
        return "none (one section, or gains off)"
    parts = []
    for b in bounds:
        step = "bridged" if b.get("bridged") else f"step {b.get('step_log'):+.3f} log"
        parts.append(f"z {b.get('z')}: {step} ({b.get('shared_tissue_pixels')} shared tissue px)")
    return "; ".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em} td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
tr.flag td{background:#fff1e6} .facts th{background:#f5f5f5;width:16em} img{max-width:100%}
.summary td{font-size:1.05em}
"""


def _summary_table(summary) -> str:
    def row(label, key, digits=3):
        return f"<tr><th>{label}</th><td>{_pair(summary, key, digits)}</td></tr>"
    flagged = summary.get("sections_flagged", [])
    return ("<table class='summary'>"
            + row("boundary step RMS (log)", "boundary_step_rms")
            + row("mean |depth slope| (log/mm)", "depth_slope_abs_mean")
            + row("median section CV", "cv_median")
            + f"<tr><th>sections flagged</th><td>{_fmt(flagged) if flagged else 'none'}</td></tr>"
            + "".join(f"<tr class='flag'><th>{label}</th><td>{text}</td></tr>" for label, text in _warnings(summary))
            + "</table>")


def _warnings(summary) -> list[tuple[str, str]]:
    """Run-level warnings for the summary table: (label, text)."""
    out = []
    if summary.get("sections_near_empty"):
        out.append(("near-empty sections", f"{_fmt(summary['sections_near_empty'])}: no tissue threshold, the whole "
                                           "slab (agarose included) was taken as tissue; do not trust their "
                                           "correction"))
    if summary.get("all_boundaries_bridged"):
        out.append(("section gains", "every boundary was bridged (too little shared tissue): the gains between "
                                     "sections were not measured"))
    if summary.get("device_fallback"):
        out.append(("device", html.escape(summary["device_fallback"])))
    return out


def _mqc_table(name: str, summary: dict, n_sections: int) -> str:
    cols = [("sections", n_sections)]
    for key in ("boundary_step_rms", "depth_slope_abs_mean", "cv_median"):
        for when in ("before", "after"):
            cols.append((f"{key}_{when}", summary.get(f"{key}_{when}")))
    cols.append(("sections_flagged", len(summary.get("sections_flagged", []))))
    head = "\n".join(["# id: 'octn4'", "# section_name: 'octn4 bias correction'",
                      "# description: 'Tissue statistics before and after N4 bias-field correction (octn4).'",
                      "# plot_type: 'table'"])
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
    return (head + "\nSample\t" + "\t".join(c for c, _ in cols) + "\n"
            + name + "\t" + "\t".join(fmt(v) for _, v in cols) + "\n")


def build_report(results, out=None, *, name: str | None = None, max_px: int = 512, overwrite: bool = True,
                 mask=None) -> Path:
    """Write the QC report of the run in ``results`` to ``out`` (default ``results/report``).

    ``mask``: the run's tissue mask when it is not in ``results`` (the workflow keeps it apart).
    """
    results = Path(results)
    mpath = results / "metrics.json"
    try:
        metrics = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the run's metrics ({exc})", mpath) from None
    out = Path(out) if out is not None else results / "report"
    name = name or results.name
    vs = tuple(metrics["voxel_size_mm"])
    sections = [(s["z_start"], s["z_stop"]) for s in metrics["sections"]]
    data = orthogonal_views(results, metrics, max_px=max_px, mask=mask)
    views_png, window = _views_figure(data, sections, vs)
    profile_png = _profile_figure(metrics, vs)
    b64 = {k: base64.b64encode(v).decode() for k, v in (("views", views_png), ("profile", profile_png))}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>octn4 QC: {html.escape(name)}</title>
<style>{CSS}</style></head><body>
<h1>octn4 bias-field correction: {html.escape(name)}</h1>
{_summary_table(metrics["summary"])}
<h2>Orthogonal views</h2>
<img alt="orthogonal views of input, corrected and bias" src="data:image/png;base64,{b64['views']}">
<h2>Section profile</h2>
<p>Median tissue intensity of every Z plane, before and after. A saw-tooth is depth attenuation
within sections; jumps at the dashed lines are gain steps between sections.</p>
<img alt="section profile" src="data:image/png;base64,{b64['profile']}">
<h2>Sections</h2>
<p>Before &rarr; after. Step: log ratio of the median of the first 3 planes of the next section to the last
3 of this one. Slope: log intensity change per mm of depth. Highlighted rows are flagged: a figure got
worse, or N4's field was still changing when its iterations ran out (last CV above 1e-3).</p>
{_section_table(metrics["sections"])}
<h2>Run</h2>
{_facts_table(metrics)}
</body></html>
"""
    report_numbers = {"name": name, "summary": metrics["summary"], "sections": metrics["sections"],
                      "view_position": data["position"], "display_window": list(window),
                      "results": str(results.resolve())}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "report.html").write_text(page)
        (tmp / "views.png").write_bytes(views_png)
        (tmp / "profile.png").write_bytes(profile_png)
        write_json(report_numbers, tmp / "report.json")
        (tmp / "octn4_mqc.tsv").write_text(_mqc_table(name, metrics["summary"], len(sections)))
    return out / "report.html"
