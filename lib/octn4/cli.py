"""Command line: ``octn4 run``, ``octn4 synth``, and the argument groups the ``bin/`` scripts share.

Errors in the input print one line, ``octn4: error: <file>: <problem>``, and
exit with status 2; internal errors print their traceback and exit 1; out of
memory exits 137 (:func:`guarded`).  Nothing that looks like a complete
output is left.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from . import __version__, defaults
from ._backend import DEVICES
from .depth import DEPTH_MODELS
from .errors import InputError, WorkerKilled
from .gains import GAIN_ANCHORS, GAIN_ESTIMATORS, GainParams
from .mask import MASK_METHODS, MaskParams
from .n4 import ENGINES
from .params import CONTROL_POINT_RULES, N4Params
from .sections import parse_planes
from .shrink import SHRINK_MODES
from .synth import EXTENTS, PROFILES

__all__ = ["main", "build_parser", "add_section_args", "add_mask_args", "add_n4_args", "add_engine_args", "guarded"]

log = logging.getLogger("octn4")


def _floats(n):
    def parse(text):
        try:
            v = tuple(float(t) for t in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers; got {text!r}") from None
        if len(v) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers; got {text!r}")
        return v
    return parse


def _ints(text):
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def _shrink(text):
    if text == "auto":
        return None
    v = _ints(text)
    if len(v) not in (1, 3):
        raise argparse.ArgumentTypeError(f"shrink is 'auto', one integer or three (z,y,x); got {text!r}")
    return v[0] if len(v) == 1 else v


def _shape(text):
    v = _ints(text)
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"shape is three integers Z,Y,X; got {text!r}")
    return v


def add_section_args(p: argparse.ArgumentParser, *, required=True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--sections", type=int, metavar="N", help="number of serial sections (near-equal split along Z)")
    g.add_argument("--planes", type=parse_planes, metavar="A,B,...",
                   help="Z planes of each section, top to bottom (must sum to the depth)")


def add_voxel_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voxel-size", type=_floats(3), metavar="Z,Y,X",
                   help="voxel size in mm, overriding the file's metadata")


def add_input_args(p: argparse.ArgumentParser) -> None:
    add_voxel_size_arg(p)
    p.add_argument("--skip-log-scale-check", action="store_true",
                   help="accept inputs whose narrow intensity range looks log-scaled (dB)")


def add_mask_args(p: argparse.ArgumentParser) -> None:
    d = defaults.MASK
    g = p.add_argument_group("tissue mask")
    g.add_argument("--mask-method", choices=MASK_METHODS, default=d.method,
                   help="threshold: 'depth' (default: per-plane log-Otsu on a depth line per section) or "
                        "'reference' (one Otsu threshold per section)")
    g.add_argument("--mask-sigma", type=float, default=d.smoothing_sigma, help="Y/X smoothing sigma, voxels")
    g.add_argument("--mask-sigma-z", type=float, default=d.smoothing_sigma_z, help="Z smoothing sigma, voxels")
    g.add_argument("--mask-closing-radius", type=int, default=d.closing_radius, help="per-plane closing disk radius")
    g.add_argument("--mask-z-closing-planes", type=int, default=d.z_closing_planes,
                   help="half-height of the Z closing, in planes")


def mask_params(a) -> MaskParams:
    return MaskParams(smoothing_sigma=a.mask_sigma, smoothing_sigma_z=a.mask_sigma_z,
                      closing_radius=a.mask_closing_radius, z_closing_planes=a.mask_z_closing_planes,
                      method=a.mask_method)


def add_mask_task_args(p: argparse.ArgumentParser, *, log_scale_check: bool = False) -> None:
    """What every mask task of the workflow takes: the section layout, the voxel size (and, for the task
    that validates, ``--skip-log-scale-check``), the mask options and the common ones."""
    add_section_args(p)
    (add_input_args if log_scale_check else add_voxel_size_arg)(p)
    add_mask_args(p)
    add_common_args(p)


def section_layout(a) -> list[tuple[int, int]]:
    """The section bounds of ``a.input`` from ``--sections`` or ``--planes`` (its depth read from its
    metadata; errors name the file)."""
    from .io import open_volume
    from .sections import section_bounds

    vol = open_volume(a.input, voxel_size=a.voxel_size)
    try:
        return section_bounds(vol.shape[0], n_sections=a.sections, planes=a.planes)
    except InputError as exc:
        raise InputError(exc.problem, vol.path) from None


def add_n4_args(p: argparse.ArgumentParser, prefix: str = "", *, title="N4") -> None:
    """N4 options; ``prefix`` ('global-') distinguishes the global pass's options (and its defaults)."""
    d = defaults.GLOBAL_N4 if prefix else defaults.SECTION_N4
    sf = d.shrink_factor
    shrink = "auto" if sf is None else str(sf[0]) if len(set(sf)) == 1 else ",".join(map(str, sf))
    its = ",".join(map(str, d.maximum_number_of_iterations))
    g = p.add_argument_group(title)
    g.add_argument(f"--{prefix}shrink", type=_shrink, default=d.shrink_factor, metavar="S",
                   help=f"shrink factor: one integer, Z,Y,X, or 'auto' (default {shrink})")
    g.add_argument(f"--{prefix}shrink-mode", choices=SHRINK_MODES, default=d.shrink_mode,
                   help=f"what a fit voxel holds: 'mean' of the tissue in its block or the 'subsample'd voxel "
                        f"(default {d.shrink_mode})")
    g.add_argument(f"--{prefix}fit-voxels", type=int, default=d.fit_voxels,
                   help="fit-grid size aimed at by --shrink auto")
    g.add_argument(f"--{prefix}iterations", type=_ints, default=d.maximum_number_of_iterations, metavar="N,N,...",
                   help=f"iterations per fitting level (default {its})")
    g.add_argument(f"--{prefix}spline-distance", type=float, default=d.spline_distance_mm, metavar="MM",
                   help=f"level-0 control-point spacing rule, mm (default {d.spline_distance_mm:g})")
    g.add_argument(f"--{prefix}control-points", type=_ints, default=None, metavar="Z,Y,X",
                   help="level-0 control points (overrides --spline-distance)")
    g.add_argument(f"--{prefix}control-point-rule", choices=CONTROL_POINT_RULES, default=d.control_point_rule,
                   help=f"'fit-grid': lower an axis's shrink factor, then drop levels if still needed, so no axis has "
                        f"more control points than fit voxels; 'reference': fit every level on the grid asked "
                        f"for (default {d.control_point_rule})")
    g.add_argument(f"--{prefix}fit-voxels-per-control-point", type=int, default=d.fit_voxels_per_control_point,
                   metavar="K", help="with the fit-grid rule, lower an axis's shrink factor until its fit grid has K "
                                     f"voxels per final control point (default {d.fit_voxels_per_control_point})")
    g.add_argument(f"--{prefix}fit-voxels-per-span", type=int, default=d.fit_voxels_per_span, metavar="N",
                   help="raise an axis's shrink factor until its fit grid has at most N voxels per span of the final "
                        "lattice, so the fit's cost does not grow with the plane size (0: off; "
                        f"default {d.fit_voxels_per_span})")
    g.add_argument(f"--{prefix}depth-line", action=argparse.BooleanOptionalAction, default=d.depth_line,
                   help="divide out each fit's depth attenuation (a robust line of log median intensity "
                        f"against Z) before N4 and add it to the field (default {'on' if d.depth_line else 'off'})")
    g.add_argument(f"--{prefix}convergence", type=float, default=d.convergence_threshold,
                   help=f"convergence threshold (default {d.convergence_threshold:g})")
    if not prefix:
        g.add_argument("--depth-model", choices=DEPTH_MODELS, default=d.depth_model,
                       help="'curve': divide each section's depth profile (one stack-wide curve in depth below the "
                            "cut plus a per-section deviation shrunk towards it, from the mask stage's per-plane "
                            f"statistics) out before N4; 'none': N4 alone or --depth-line (default {d.depth_model})")
        g.add_argument("--depth-spans", type=int, default=d.depth_spans, metavar="K",
                       help="the depth curve's B-spline spans over the thickest section (default 0: one per 4 "
                            "planes of the thinnest section, 1 to 6)")
        g.add_argument("--depth-prior", type=float, default=d.depth_prior,
                       help="ridge weight of each per-section deviation coefficient, in full planes "
                            f"(default {d.depth_prior:g}); larger keeps sections closer to the stack curve")


def n4_params(a, prefix: str = "") -> N4Params:
    k = prefix.replace("-", "_")
    return N4Params(maximum_number_of_iterations=getattr(a, f"{k}iterations"),
                    convergence_threshold=getattr(a, f"{k}convergence"),
                    spline_distance_mm=getattr(a, f"{k}spline_distance"),
                    number_of_control_points=getattr(a, f"{k}control_points"),
                    shrink_factor=getattr(a, f"{k}shrink"), fit_voxels=getattr(a, f"{k}fit_voxels"),
                    shrink_mode=getattr(a, f"{k}shrink_mode"),
                    control_point_rule=getattr(a, f"{k}control_point_rule"),
                    fit_voxels_per_control_point=getattr(a, f"{k}fit_voxels_per_control_point"),
                    fit_voxels_per_span=getattr(a, f"{k}fit_voxels_per_span"),
                    depth_line=getattr(a, f"{k}depth_line"),
                    **({} if prefix else dict(depth_model=a.depth_model, depth_spans=a.depth_spans,
                                              depth_prior=a.depth_prior)),
                    parity=getattr(a, "itk_parity", False))


def add_engine_args(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=ENGINES, default="octn4",
                   help="N4 engine: octn4's own (default; NumPy or CuPy) or SimpleITK (the reference, CPU)")
    g.add_argument("--itk-parity", action="store_true",
                   help="octn4 engine: reproduce SimpleITK's quirks (Q1 minimum scan, top-bin rounding) "
                        "instead of fixing them")
    g.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the octn4 engine fits: cpu (NumPy), cuda (CuPy; an error if no GPU is usable) or "
                        "auto (cuda when the octn4 engine has a usable GPU, else cpu)")
    if batch:
        g.add_argument("--batch-sections", type=int, default=0, metavar="N",
                       help="fit N equal-shaped sections together (octn4 engine); 0 = auto: 1 on the CPU, "
                            "as many as fit ~32 M fit-grid voxels on a GPU")


def add_gain_args(p: argparse.ArgumentParser) -> None:
    d = defaults.GAINS
    g = p.add_argument_group("section gains")
    g.add_argument("--no-gains", action="store_true",
                   help="skip section gain harmonisation (the plain reference recipe)")
    g.add_argument("--gain-estimator", choices=GAIN_ESTIMATORS, default=d.estimator,
                   help="how a boundary's step is measured: 'touching': median per-pixel log ratio of the two "
                        "smoothed planes that touch it; 'planes': difference of the median log intensity of "
                        f"--gain-planes planes on each side (default {d.estimator})")
    g.add_argument("--gain-smoothing", type=float, default=d.smoothing_px, metavar="PX",
                   help=f"'touching': Gaussian sigma in pixels against speckle (default {d.smoothing_px:g})")
    g.add_argument("--gain-planes", type=int, default=d.boundary_planes,
                   help=f"'planes': planes on each side of a boundary (default {d.boundary_planes})")
    g.add_argument("--gain-min-shared", type=int, default=d.min_shared,
                   help="shared tissue pixels below which a boundary is bridged")
    g.add_argument("--gain-anchor", choices=GAIN_ANCHORS, default=d.anchor,
                   help="'histogram': correct the chained gains' slow drift by aligning each section's histogram "
                        f"of corrected log intensities with the others'; 'none': the chain alone (default {d.anchor})")
    g.add_argument("--gain-anchor-range", type=float, default=d.anchor_range, metavar="LOG",
                   help=f"'histogram': largest histogram offset searched, log (default {d.anchor_range:g})")
    g.add_argument("--gain-anchor-sections", type=int, default=d.anchor_sections, metavar="N",
                   help="'histogram': the drift correction is a line up to N sections, a spline with one span "
                        f"per N sections beyond (default {d.anchor_sections})")


def gain_params(a) -> GainParams:
    return GainParams(enabled=not a.no_gains, estimator=a.gain_estimator, smoothing_px=a.gain_smoothing,
                      boundary_planes=a.gain_planes, min_shared=a.gain_min_shared, anchor=a.gain_anchor,
                      anchor_range=a.gain_anchor_range, anchor_sections=a.gain_anchor_sections)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"octn4 {__version__}")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def setup_logging(a) -> None:
    level = logging.WARNING if a.quiet else (logging.DEBUG if a.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


#: Exit statuses: 0 done; 2 bad input or parameters (:class:`InputError`, the user's to fix);
#: 1 an internal error (a bug: the traceback is printed); 137 out of memory, the status of a task the
#: kernel's OOM killer stopped, so schedulers (and the workflow's retry policy) retry it with more memory.
EXIT_INPUT, EXIT_INTERNAL, EXIT_OUT_OF_MEMORY = 2, 1, 137


def guarded(fn, a, prog: str) -> int:
    """Run ``fn(a)`` and turn its failure into a message and an exit status.

    Bad input or parameters (:class:`InputError`) print one line, exit 2
    (``-v -v`` shows the traceback as well).  ``MemoryError`` prints one line
    and exits 137, as an out-of-memory kill would; so does a worker process that was killed
    (:class:`WorkerKilled`).  Anything else is octn4's
    own bug: the traceback, a line saying so, exit 1.
    """
    setup_logging(a)
    try:
        fn(a)
    except InputError as exc:
        if a.verbose > 1:
            log.exception("failed")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except WorkerKilled as exc:
        print(f"{prog}: error: {exc} (exit {EXIT_OUT_OF_MEMORY})", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        print(f"{prog}: error: out of memory{detail}; give the task more memory (exit {EXIT_OUT_OF_MEMORY})",
              file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except Exception as exc:
        traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} -- a bug in octn4 {__version__}, not a "
              "problem with the input; please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


# --------------------------------------------------------------------------- octn4 run / synth


def _cmd_run(a) -> None:
    from .pipeline import RunConfig, run

    config = RunConfig(
        n_sections=a.sections, planes=None if a.planes is None else tuple(a.planes),
        voxel_size=a.voxel_size, mask_path=a.mask, mask=mask_params(a), section_n4=n4_params(a),
        global_n4=n4_params(a, "global-"), gains=gain_params(a), workers=a.workers, threads=a.threads,
        output_format=a.format, overwrite=a.overwrite, check_log_scale=not a.skip_log_scale_check,
        engine=a.engine, device=a.device, batch_sections=a.batch_sections, full_bias=a.full_bias)
    m = run(a.input, a.outdir, config, resume=a.resume)
    s = m["summary"]
    if s["boundary_step_rms_before"] is None:      # one section: no boundary
        steps = "one section, no boundary"
    else:
        steps = f"boundary step RMS {s['boundary_step_rms_before']:.3f} -> {s['boundary_step_rms_after']:.3f}"
    print(f"octn4: corrected {a.input} -> {a.outdir}; QC report: {a.outdir / 'report' / 'report.html'}  "
          f"({steps}, {m['timings_s']['total']:.0f} s)")


def _cmd_synth(a) -> None:
    from .synth import SynthParams, synth_stack

    if a.sections is None and a.planes is None:
        a.sections = 4

    d = SynthParams()
    params = SynthParams(shape=a.shape, n_sections=a.sections or len(a.planes), seed=a.seed,
                         planes=None if a.planes is None else tuple(a.planes),
                         voxel_size=a.voxel_size or d.voxel_size, anatomy=a.anatomy, profile=a.profile,
                         extent=a.extent, gain_sigma=d.gain_sigma if a.gain_sigma is None else a.gain_sigma,
                         damaged_section=a.damaged_section)
    out = synth_stack(a.out, params, overwrite=a.overwrite)
    print(f"octn4: wrote {out}/volume.ome.zarr (shape {tuple(a.shape)}, {params.n_sections} sections, "
          f"{a.profile} depth profile) with truth_bias, clean and labels beside it")


def _cmd_bias(a) -> None:
    from .bias import BiasModel, write_bias
    from .io import open_volume, read_attrs
    from .provenance import provenance

    results = Path(a.results)
    model = BiasModel.from_run(results)
    corrected = next((p for p in (results / "corrected.ome.zarr", results / "corrected.nii.gz") if p.exists()), None)
    if corrected is None:
        raise InputError("no corrected output beside fields.json (its grid gives the bias's)", results)
    grid = open_volume(corrected)
    if grid.shape != model.shape:
        raise InputError(f"fields.json is for a volume of shape {model.shape}, the corrected output has "
                         f"{grid.shape}", corrected)
    run_attrs = read_attrs(corrected)
    attrs = provenance("bias", grid, {"results": str(results.resolve()), "tile_planes": a.tile_planes},
                       engine=run_attrs.get("engine", "octn4"), device="cpu",
                       extra={"run": {k: run_attrs.get(k) for k in ("octn4_version", "created", "parameters")}})
    write_bias(model, a.out, grid.voxel_size, affine=grid.affine, tile_planes=a.tile_planes,
               attrs=dict(attrs, output="bias"), overwrite=a.overwrite)
    print(f"octn4: wrote the full-resolution bias of {results} to {a.out}")


def _cmd_report(a) -> None:
    from .report import build_report

    page = build_report(a.results, a.out, name=a.name, max_px=a.max_px, overwrite=True, mask=a.mask)
    print(f"octn4: wrote {page}")


def add_full_bias_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-bias", action="store_true",
                   help="store the bias output at full resolution too (default, OME-Zarr: from pyramid level 1 "
                        "down; fields.json holds it exactly and 'octn4 bias' writes it at full resolution)")


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", type=Path, help="an octn4 run's output folder")
    p.add_argument("--out", type=Path, default=None, help="report folder (default RESULTS/report)")
    p.add_argument("--name", default=None, help="name shown in the report (default: the folder's name)")
    p.add_argument("--max-px", type=int, default=512, help="largest side of a view, pixels")
    p.add_argument("--mask", type=Path, default=None, help="the run's tissue mask (default: RESULTS/mask.*)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"octn4 {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="mask -> N4 per section -> global N4 -> corrected volume",
                       description="Correct a serial-section OCT volume end to end on this machine.")
    r.add_argument("input", type=Path, help=".ome.zarr, .zarr or .nii[.gz]")
    r.add_argument("outdir", type=Path, help="output folder (created complete, or not at all)")
    add_section_args(r)
    add_input_args(r)
    r.add_argument("--mask", type=Path, default=None,
                   help="tissue mask to use (same shape; non-zero = tissue) instead of computing one")
    r.add_argument("--resume", action="store_true",
                   help="reuse what an interrupted run into the same OUTDIR finished (the mask, fitted sections; "
                        "kept in .OUTDIR.partial), each checked against the input's content and the parameters "
                        "it was made with; whatever does not match is recomputed")
    r.add_argument("--workers", type=int, default=1, help="sections fitted in parallel (processes)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads in total (default: all cores)")
    r.add_argument("--format", choices=("ome-zarr", "nifti"), default="ome-zarr", help="output format")
    add_full_bias_arg(r)
    add_engine_args(r, batch=True)
    add_mask_args(r)
    add_n4_args(r, title="N4 per section")
    add_gain_args(r)
    add_n4_args(r, "global-", title="global N4")
    add_common_args(r)
    r.set_defaults(fn=_cmd_run)

    b = sub.add_parser("bias", help="write a run's bias at full resolution, evaluated from its fields.json",
                       description="The bias the run divided by, at every voxel, from the lattices in fields.json "
                                   "(the same values, bit for bit): for a run whose OME-Zarr bias starts at "
                                   "pyramid level 1.")
    b.add_argument("results", type=Path, help="an octn4 run's output folder")
    b.add_argument("out", type=Path, help="the bias to write (.ome.zarr, or .nii/.nii.gz)")
    b.add_argument("--tile-planes", type=int, default=16, help="planes evaluated at a time")
    add_common_args(b)
    b.set_defaults(fn=_cmd_bias)

    rep = sub.add_parser("report", help="(re)build the QC report of a run from its outputs")
    add_report_args(rep)
    add_common_args(rep)
    rep.set_defaults(fn=_cmd_report)

    s = sub.add_parser("synth", help="write a synthetic serial-OCT stack with its known bias")
    s.add_argument("out", type=Path, help="output folder")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--sections", type=int, default=None, help="number of equal sections (default 4)")
    g.add_argument("--planes", type=parse_planes, metavar="A,B,...", help="Z planes of each section (unequal)")
    s.add_argument("--shape", type=_shape, default=(96, 192, 192), metavar="Z,Y,X")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--voxel-size", type=_floats(3), default=None, metavar="Z,Y,X", help="mm (default 0.05)")
    s.add_argument("--anatomy", choices=("phantom", "mni152"), default="phantom",
                   help="generated tissue, or the MNI152 brain (fetched once from the nilearn wheel)")
    s.add_argument("--profile", choices=PROFILES, default="beer-lambert",
                   help="depth profile in each section: attenuation only, the confocal gate times attenuation, "
                        "tissue-dependent attenuation (white matter steeper), or confocal and tissue ('oct')")
    s.add_argument("--extent", choices=EXTENTS, default="block",
                   help="a block from inside the brain, or the whole brain from its first cap to its last")
    s.add_argument("--gain-sigma", type=float, default=None, help="SD of the section gains (log; default 0.2)")
    s.add_argument("--damaged-section", type=int, default=None, metavar="I",
                   help="section I keeps its tissue only in a small disc (about 5 %% of the plane)")
    add_common_args(s)
    s.set_defaults(fn=_cmd_synth)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return guarded(a.fn, a, "octn4")


if __name__ == "__main__":
    sys.exit(main())
