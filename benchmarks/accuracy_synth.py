#!/usr/bin/env python3
"""Correction quality against a known bias: the reference recipe and octn4's defaults, side by side.

Builds stacks with ``octn4.synth`` on two anatomies (``phantom``: generated
tissue, oblique, with clefts; ``mni152``: a block of the MNI152 brain, see
``octn4.synth``), in several kinds (``--kinds``): ``base`` (4 sections),
``sections6`` (6 thinner sections), ``strong`` (attenuation 1.5-2.5 /mm) and
``mild`` (0.2-0.5 /mm).  Each stack is corrected by ``octn4 run`` with each
recipe:

``reference``
    the reference recipe of SPEC.md: per-section Otsu mask, SimpleITK N4 per
    section on a subsampled copy with ITK's settings (4 levels x 50
    iterations, threshold 1e-3), global N4 likewise, no section gains;
``octn4``
    octn4's defaults (``octn4.defaults``: depth mask, depth line, tissue
    block means, 2 x 100 iterations within the fit grid, section gains, a
    one-level global pass), octn4's engine;
``sitk``
    octn4's defaults with the SimpleITK engine.

Printed per stack and recipe, against the ground truth:

- ``err``: RMS over the true tissue of ``log(estimated bias) - log(true
  bias)`` after removing its mean (a constant gain); ``betw``: its
  between-section part (RMS of the per-section means, tissue-weighted),
  ``within``: the rest (``err^2 = betw^2 + within^2``); ``raw``: ``err`` with
  no correction;
- ``step``: RMS over the boundaries of the step in the per-plane median of
  ``log(corrected / clean)`` (3 planes each side), and ``floor``: the same
  for the truth-corrected volume (speckle only).  That floor is one draw of
  the speckle: the summary also divides the step by ``E[floor]``, the median
  of the same figure over 16 fresh speckle draws with the stack's tissue
  voxel counts per plane (``floor_draws`` in ``--json`` holds its median,
  minimum and maximum);
- ``slope``: mean over sections of ``|d/dz|`` of that per-plane profile
  (log per mm), the depth saw-tooth left;
- ``cv g/w``: CV of the corrected grey and white matter (true labels);
  the truth-corrected volume's are printed as the ``truth`` row;
- ``contr``: corrected white/grey ratio of class medians over the clean
  volume's (1 = contrast kept); ``corr``: correlation of log corrected and
  log clean over the true tissue;
- ``recall`` / ``prec``: the run's tissue mask against the true tissue;
- ``err/ref``: the recipe's ``err`` over the reference recipe's on the same stack.

A summary at the end gives, per stack and recipe, the ratios the
acceptance is judged by: error over the reference's, step over the floor
(and over the reference's), and contrast over the truth-corrected volume's
(speckle moves class medians of partial-volume tissue a little, so the
truth's own ``contr`` is not exactly 1).

The ``raw|truth`` row of each stack gives the error columns of the
uncorrected volume and the other columns of the truth-corrected one (the
floor that speckle sets).  ``--json`` writes every measure.

Usage::

    python benchmarks/accuracy_synth.py --work /tmp/octn4-quality       # the families suite, both recipes
    python benchmarks/accuracy_synth.py --work /tmp/q --reuse reference   # rerun octn4 only
    python benchmarks/accuracy_synth.py --suite classic --kinds base --anatomy phantom --seeds 0 --recipes octn4
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from octn4.bias import read_bias
from octn4.cli import main as octn4_main
from octn4.io import open_volume
from octn4.metrics import boundary_steps
from octn4.synth import SynthParams, synth_stack

REFERENCE = ["--engine", "sitk", "--no-gains", "--mask-method", "reference",
             "--shrink", "4", "--shrink-mode", "subsample", "--iterations", "50,50,50,50", "--convergence", "0.001",
             "--control-point-rule", "reference", "--no-depth-line", "--depth-model", "none",
             "--global-shrink", "auto", "--global-shrink-mode", "subsample", "--global-iterations", "50,50,50,50",
             "--global-convergence", "0.001", "--global-control-point-rule", "reference"]
RECIPES = {"reference": REFERENCE, "octn4": ["--engine", "octn4"], "sitk": ["--engine", "sitk"]}

#: Stack kinds of the ``classic`` suite (the Beer-Lambert family only): (sections, SynthParams overrides,
#: seed offset so each kind has its own tissue and bias).
KINDS = {
    "base": (4, {}, 0),
    "sections6": (6, {}, 10),
    "strong": (4, {"attenuation_per_mm": (1.5, 2.5)}, 20),
    "mild": (4, {"attenuation_per_mm": (0.2, 0.5)}, 30),
}

#: The ``families`` suite: every depth-profile family on both extents, three seeds each.  The seed also
#: picks the geometry, so each family meets each one: 0, four equal sections; 1, unequal sections;
#: 2, six sections of anisotropic voxels (planes 5 um, pixels 10 um, attenuation scaled to keep the
#: same decay per section) with larger gain jumps (SD 0.3 log).
FAMILIES = ("beer-lambert", "confocal", "tissue", "oct")
#: The families run unless --kinds says otherwise (the three named by the physics; "oct" is both at once).
DEFAULT_FAMILIES = ("beer-lambert", "confocal", "tissue")
EXTENTS = ("block", "whole")
FAMILY_SHAPE = (64, 128, 128)


def family_params(anatomy: str, family: str, extent: str, seed: int, shape=FAMILY_SHAPE) -> SynthParams:
    kw = dict(shape=shape, anatomy=anatomy, profile=family, extent=extent,
              seed=100 + 10 * FAMILIES.index(family) + 5 * EXTENTS.index(extent) + seed)
    if seed % 3 == 0:
        kw.update(n_sections=4)
    elif seed % 3 == 1:
        q = shape[0] // 16
        kw.update(planes=(3 * q, 5 * q, 4 * q, shape[0] - 12 * q), n_sections=4)
    else:
        kw.update(n_sections=6, voxel_size=(0.005, 0.01, 0.01), attenuation_per_mm=(5.0, 12.0), gain_sigma=0.3)
    return SynthParams(**kw)


#: Extra stacks of the ``families`` suite: a damaged section (tissue left on about 5 % of its planes).
SPECIALS = {
    "damaged": lambda anatomy, shape: SynthParams(shape=shape, anatomy=anatomy, profile="confocal", n_sections=4,
                                                  seed=190, damaged_section=1),
}


def suite(name: str, anatomies, seeds, variant_seeds, kinds, shape):
    """``(stack name, SynthParams)`` of every stack of a suite."""
    out = []
    for anatomy in anatomies:
        if name == "classic":
            for kind in kinds:
                n, overrides, offset = KINDS[kind]
                for seed in (seeds if kind == "base" else variant_seeds):
                    out.append((f"{anatomy}-{kind}-{seed}", SynthParams(shape=shape, n_sections=n, seed=seed + offset,
                                                                       anatomy=anatomy, **overrides)))
        else:
            for family in kinds:
                for extent in EXTENTS:
                    for seed in seeds:
                        out.append((f"{anatomy}-{family}-{extent}-{seed}",
                                    family_params(anatomy, family, extent, seed, shape)))
            for special, make in SPECIALS.items():
                out.append((f"{anatomy}-{special}", make(anatomy, shape)))
    return out


def section_args(s: dict) -> list[str]:
    """``--planes`` of a stack as ``octn4 run`` is given it (the sections are known to the user)."""
    return ["--planes", ",".join(str(b - a) for a, b in s["bounds"])]


def read(path):
    v = open_volume(path)
    return v.read(0, v.shape[0])


def log_ratio_profile(vol, clean, tissue):
    """Per-plane median over the true tissue of ``log(vol / clean)`` (what ``step`` is measured on)."""
    r = np.log(np.maximum(vol, 1e-12) / clean)
    return np.array([np.median(r[z][tissue[z]]) if tissue[z].any() else np.nan for z in range(r.shape[0])])


def step_rms(prof, bounds):
    s = np.array(boundary_steps(prof, bounds))
    return float(np.sqrt(np.nanmean(s ** 2)))


def depth_slope(prof, bounds, dz_mm):
    out = []
    for z0, z1 in bounds:
        p = prof[z0:z1]
        ok = np.isfinite(p)
        if ok.sum() >= 3:
            out.append(abs(np.polyfit(np.arange(z1 - z0)[ok] * dz_mm, p[ok], 1)[0]))
    return float(np.mean(out)) if out else float("nan")


def error_parts(est, truth, tissue, bounds):
    """Total, between-section and within-section RMS of the log-bias error (constant removed), and the
    worst section's RMS error (about the same constant)."""
    e = np.log(est.astype(np.float64)) - np.log(truth.astype(np.float64))
    e -= e[tissue].mean()
    w = np.array([tissue[a:b].sum() for a, b in bounds], float)
    mu = np.array([e[a:b][tissue[a:b]].mean() if w[i] else 0.0 for i, (a, b) in enumerate(bounds)])
    worst = max(float(np.sqrt(np.mean(e[a:b][tissue[a:b]] ** 2))) for a, b in bounds if tissue[a:b].any())
    total = float(np.sqrt(np.mean(e[tissue] ** 2)))
    between = float(np.sqrt(np.sum(w * mu ** 2) / w.sum()))
    return total, between, float(np.sqrt(max(total ** 2 - between ** 2, 0.0))), worst


def sections_cv_up(cor, vol, tissue, bounds) -> int:
    """Sections whose corrected tissue CV exceeds the input's (true tissue)."""
    n = 0
    for a, b in bounds:
        t = tissue[a:b]
        if t.sum() > 1:
            c, v = cor[a:b][t].astype(np.float64), vol[a:b][t].astype(np.float64)
            n += int(c.std() / c.mean() > v.std() / v.mean())
    return n


def volume_measures(cor, clean, labels, tissue, bounds, dz_mm) -> dict:
    prof = log_ratio_profile(cor, clean, tissue)
    grey, white = cor[labels == 1], cor[labels == 2]
    ratio = (np.median(white) / np.median(grey)) / (np.median(clean[labels == 2]) / np.median(clean[labels == 1]))
    lc, lk = np.log(np.maximum(cor[tissue], 1e-12)), np.log(clean[tissue])
    return {"step": step_rms(prof, bounds), "slope": depth_slope(prof, bounds, dz_mm),
            "cv_grey": float(grey.std() / grey.mean()), "cv_white": float(white.std() / white.mean()),
            "contrast": float(ratio), "corr": float(np.corrcoef(lc, lk)[0, 1])}


def load_stack(stack: Path) -> dict:
    meta = json.loads((stack / "synth.json").read_text())
    labels = read(stack / "labels.ome.zarr")
    return {"labels": labels, "tissue": labels > 0, "bounds": [tuple(b) for b in meta["sections"]],
            "dz_mm": meta["params"]["voxel_size"][0], "looks": meta["params"]["speckle_looks"],
            **{n: read(stack / f"{n}.ome.zarr") for n in ("truth_bias", "clean", "volume")}}


def speckle_floor_draws(tissue, bounds, looks: float, draws: int = 16, seed: int = 0) -> np.ndarray:
    """The ``step`` figure of pure speckle over ``draws`` fresh draws (same tissue voxels per plane).

    The truth-corrected volume's step is one such draw; this is its spread.
    """
    counts = tissue.reshape(tissue.shape[0], -1).sum(1)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        prof = np.array([np.median(np.log(rng.gamma(looks, 1 / looks, int(c)))) if c else np.nan for c in counts])
        out.append(step_rms(prof, bounds))
    return np.array(out)


def truth_row(s: dict) -> dict:
    """What the ground-truth correction leaves (the floor of every measure), and the raw error."""
    m = volume_measures(s["volume"] / s["truth_bias"], s["clean"], s["labels"], s["tissue"], s["bounds"], s["dz_mm"])
    raw = error_parts(np.ones_like(s["truth_bias"]), s["truth_bias"], s["tissue"], s["bounds"])
    d = speckle_floor_draws(s["tissue"], s["bounds"], s["looks"])
    m.update(err=raw[0], between=raw[1], within=raw[2], worst=raw[3], recall=1.0, precision=1.0, cv_up=0,
             floor_draws={"median": float(np.median(d)), "min": float(d.min()), "max": float(d.max())})
    return m


def evaluate(s: dict, result: Path) -> dict:
    est, cor = read_bias(result), read(result / "corrected.ome.zarr")
    mask = read(result / "mask.ome.zarr") > 0
    t = s["tissue"]
    err, between, within, worst = error_parts(est, s["truth_bias"], t, s["bounds"])
    m = volume_measures(cor, s["clean"], s["labels"], t, s["bounds"], s["dz_mm"])
    m.update(err=err, between=between, within=within, worst=worst,
             cv_up=sections_cv_up(cor, s["volume"], t, s["bounds"]),
             recall=float((mask & t).sum() / t.sum()), precision=float((mask & t).sum() / max(1, mask.sum())))
    return m


COLUMNS = [("err", 6, 3), ("between", 6, 3), ("within", 6, 3), ("worst", 6, 3), ("step", 6, 3), ("slope", 6, 3),
           ("cv_grey", 6, 3), ("cv_white", 6, 3), ("contrast", 6, 3), ("corr", 6, 3), ("recall", 6, 3),
           ("precision", 6, 3), ("cv_up", 5, 0)]
HEADER = (f"{'stack':>30} {'recipe':>10} " + " ".join(f"{h:>6}" for h in
          ("err", "betw", "within", "worst", "step", "slope", "cv g", "cv w", "contr", "corr", "recall", "prec"))
          + f" {'cv+':>5} {'err/ref':>7} {'time':>5}")


def row(stack: str, recipe: str, m: dict, ref_err=None, seconds=None) -> str:
    vals = " ".join(f"{m[k]:{w}.{d}f}" for k, w, d in COLUMNS)
    ratio = f"{m['err'] / ref_err:7.2f}" if ref_err else " " * 7
    t = f"{seconds:4.0f}s" if seconds is not None else ""
    return f"{stack:>30} {recipe:>10} {vals} {ratio} {t}"


def make_stack(path: Path, params: SynthParams) -> None:
    shutil.rmtree(path, ignore_errors=True)
    synth_stack(path, params)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the base stacks")
    p.add_argument("--variant-seeds", type=int, nargs="+", default=[0], help="seeds of the other kinds")
    p.add_argument("--suite", choices=("families", "classic"), default="families",
                   help="families: every depth-profile family, block and whole brain (the default); "
                        "classic: the Beer-Lambert kinds of earlier versions")
    p.add_argument("--kinds", nargs="+", choices=sorted(KINDS) + list(FAMILIES), default=None,
                   help="families (families suite) or kinds (classic suite) to run; default all")
    p.add_argument("--only", nargs="+", default=None, metavar="STACK", help="run only these stack names")
    p.add_argument("--shape", default=None, help="Z,Y,X (default 64,128,128; classic 96,192,192)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/octn4-quality"))
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["reference", "octn4"])
    p.add_argument("--anatomy", nargs="+", choices=["phantom", "mni152"], default=["phantom", "mni152"])
    p.add_argument("--json", type=Path, default=None, help="also write every measure to this file")
    p.add_argument("--markdown", type=Path, default=None, help="also write the per-stack table as Markdown")
    p.add_argument("--reuse", nargs="*", choices=sorted(RECIPES), default=[], metavar="RECIPE",
                   help="use the outputs already in --work for these recipes (the stacks are regenerated "
                        "identically from their seeds) instead of running them again")
    a = p.parse_args(argv)
    default_shape = "96,192,192" if a.suite == "classic" else ",".join(map(str, FAMILY_SHAPE))
    shape = tuple(int(v) for v in (a.shape or default_shape).split(","))
    kinds = a.kinds or (list(KINDS) if a.suite == "classic" else list(DEFAULT_FAMILIES))
    a.work.mkdir(parents=True, exist_ok=True)
    results = []
    print(HEADER, flush=True)
    for name, params in suite(a.suite, a.anatomy, a.seeds, a.variant_seeds, kinds, shape):
        if a.only and name not in a.only:
            continue
        stack = a.work / f"stack_{name}"
        make_stack(stack, params)
        s = load_stack(stack)
        truth = truth_row(s)
        print(row(name, "raw|truth", truth), flush=True)
        results.append({"stack": name, "recipe": "truth", **truth})
        ref_err = None
        for recipe in a.recipes:
            out = a.work / f"out_{name}_{recipe}"
            t0 = time.perf_counter()
            if recipe in a.reuse and (out / "metrics.json").exists():
                dt = json.loads((out / "metrics.json").read_text())["timings_s"]["total"]
            else:
                rc = octn4_main(["run", str(stack / "volume.ome.zarr"), str(out), *section_args(s),
                                 "--workers", str(a.workers), "--overwrite", "-q", *RECIPES[recipe]])
                if rc:
                    raise SystemExit(rc)
                dt = time.perf_counter() - t0
            m = evaluate(s, out)
            if recipe == "reference":
                ref_err = m["err"]
            print(row(name, recipe, m, None if recipe == "reference" else ref_err, dt), flush=True)
            results.append({"stack": name, "recipe": recipe, "seconds": dt, **m})
    summarise(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.markdown:
        a.markdown.write_text(markdown(results))


def markdown(results, recipe: str = "octn4") -> str:
    """The per-stack figures of ``recipe`` against the reference's, as a Markdown table."""
    by = {(r["stack"], r["recipe"]): r for r in results}
    lines = ["| stack | raw | reference | octn4 | octn4 / reference | worst section: reference, octn4 | "
             "between-section: reference, octn4 | step / E[floor]: reference, octn4 | contrast / truth's: "
             "reference, octn4 | sections with CV up: reference, octn4 | mask recall, precision |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in dict.fromkeys(r["stack"] for r in results):
        t, ref, m = by.get((st, "truth")), by.get((st, "reference")), by.get((st, recipe))
        if not (t and ref and m):
            continue
        e = t["floor_draws"]["median"]
        lines.append(
            f"| {st} | {t['err']:.3f} | {ref['err']:.3f} | {m['err']:.3f} | **{m['err'] / ref['err']:.2f}** | "
            f"{ref['worst']:.3f}, {m['worst']:.3f} | {ref['between']:.3f}, {m['between']:.3f} | "
            f"{ref['step'] / e:.1f}, {m['step'] / e:.1f} | {ref['contrast'] / t['contrast']:.3f}, "
            f"{m['contrast'] / t['contrast']:.3f} | {ref['cv_up']}, {m['cv_up']} | "
            f"{m['recall']:.3f}, {m['precision']:.3f} |")
    return "\n".join(lines) + "\n"


def summarise(results) -> None:
    """Per stack and recipe: error over the reference's, step over the floor, contrast over the truth's."""
    by = {(r["stack"], r["recipe"]): r for r in results}
    stacks = list(dict.fromkeys(r["stack"] for r in results))
    print(f"\n{'stack':>30} {'recipe':>10} {'err/ref':>8} {'worst/ref':>9} {'step/floor':>10} {'step/E[floor]':>13} "
          f"{'step/ref':>9} {'contrast/truth':>14} {'recall':>7} {'cv+':>4}")
    ratios: dict[tuple, list] = {}
    for st in stacks:
        truth, ref = by[(st, "truth")], by.get((st, "reference"))
        for (name, recipe), m in by.items():
            if name != st or recipe == "truth":
                continue
            err = f"{m['err'] / ref['err']:8.2f}" if ref else " " * 8
            worst = f"{m['worst'] / ref['worst']:9.2f}" if ref else " " * 9
            step = f"{m['step'] / ref['step']:9.3f}" if ref else " " * 9
            print(f"{st:>30} {recipe:>10} {err} {worst} {m['step'] / truth['step']:10.1f} "
                  f"{m['step'] / truth['floor_draws']['median']:13.1f} {step} "
                  f"{m['contrast'] / truth['contrast']:14.3f} {m['recall']:7.3f} {m['cv_up']:4d}")
            if ref and recipe != "reference":
                group = (st.split("-")[0], recipe)
                ratios.setdefault(group, []).append((m["err"] / ref["err"], m["worst"] / ref["worst"]))
    if ratios:
        print(f"\n{'anatomy':>10} {'recipe':>10} {'stacks':>6} {'ref/err (geo. mean)':>20} {'min ref/err':>11} "
              f"{'worse than ref':>14} {'worst-section worse':>19}")
        for (anatomy, recipe), r in ratios.items():
            e = np.array([x[0] for x in r])
            w = np.array([x[1] for x in r])
            print(f"{anatomy:>10} {recipe:>10} {len(r):6d} {float(np.exp(-np.log(e).mean())):20.2f} "
                  f"{float(1 / e.max()):11.2f} {int((e > 1).sum()):14d} {int((w > 1).sum()):19d}")


if __name__ == "__main__":
    main()
