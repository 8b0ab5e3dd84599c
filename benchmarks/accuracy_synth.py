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

    python benchmarks/accuracy_synth.py --work /tmp/octn4-quality            # everything (about 30 min)
    python benchmarks/accuracy_synth.py --kinds base --anatomy phantom --seeds 0 --recipes octn4
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from octn4.cli import main as octn4_main
from octn4.io import open_volume
from octn4.metrics import boundary_steps
from octn4.synth import SynthParams, synth_stack

REFERENCE = ["--engine", "sitk", "--no-gains", "--mask-method", "reference",
             "--shrink", "4", "--shrink-mode", "subsample", "--iterations", "50,50,50,50", "--convergence", "0.001",
             "--control-point-rule", "reference", "--no-depth-line",
             "--global-shrink", "auto", "--global-shrink-mode", "subsample", "--global-iterations", "50,50,50,50",
             "--global-convergence", "0.001", "--global-control-point-rule", "reference"]
RECIPES = {"reference": REFERENCE, "octn4": ["--engine", "octn4"], "sitk": ["--engine", "sitk"]}

#: Stack kinds: (sections, SynthParams overrides, seed offset so each kind has its own tissue and bias).
KINDS = {
    "base": (4, {}, 0),
    "sections6": (6, {}, 10),
    "strong": (4, {"attenuation_per_mm": (1.5, 2.5)}, 20),
    "mild": (4, {"attenuation_per_mm": (0.2, 0.5)}, 30),
}


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
    """Total, between-section and within-section RMS of the log-bias error (constant removed)."""
    e = np.log(est.astype(np.float64)) - np.log(truth.astype(np.float64))
    e -= e[tissue].mean()
    w = np.array([tissue[a:b].sum() for a, b in bounds], float)
    mu = np.array([e[a:b][tissue[a:b]].mean() if w[i] else 0.0 for i, (a, b) in enumerate(bounds)])
    total = float(np.sqrt(np.mean(e[tissue] ** 2)))
    between = float(np.sqrt(np.sum(w * mu ** 2) / w.sum()))
    return total, between, float(np.sqrt(max(total ** 2 - between ** 2, 0.0)))


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
    m.update(err=raw[0], between=raw[1], within=raw[2], recall=1.0, precision=1.0,
             floor_draws={"median": float(np.median(d)), "min": float(d.min()), "max": float(d.max())})
    return m


def evaluate(s: dict, result: Path) -> dict:
    est, cor = read(result / "bias.ome.zarr"), read(result / "corrected.ome.zarr")
    mask = read(result / "mask.ome.zarr") > 0
    t = s["tissue"]
    err, between, within = error_parts(est, s["truth_bias"], t, s["bounds"])
    m = volume_measures(cor, s["clean"], s["labels"], t, s["bounds"], s["dz_mm"])
    m.update(err=err, between=between, within=within,
             recall=float((mask & t).sum() / t.sum()), precision=float((mask & t).sum() / max(1, mask.sum())))
    return m


COLUMNS = [("err", 6, 3), ("between", 6, 3), ("within", 6, 3), ("step", 6, 3), ("slope", 6, 3),
           ("cv_grey", 6, 3), ("cv_white", 6, 3), ("contrast", 6, 3), ("corr", 6, 3), ("recall", 6, 3),
           ("precision", 6, 3)]
HEADER = (f"{'stack':>20} {'recipe':>10} " + " ".join(f"{h:>6}" for h in
          ("err", "betw", "within", "step", "slope", "cv g", "cv w", "contr", "corr", "recall", "prec"))
          + f" {'err/ref':>7} {'time':>5}")


def row(stack: str, recipe: str, m: dict, ref_err=None, seconds=None) -> str:
    vals = " ".join(f"{m[k]:{w}.{d}f}" for k, w, d in COLUMNS)
    ratio = f"{m['err'] / ref_err:7.2f}" if ref_err else " " * 7
    t = f"{seconds:4.0f}s" if seconds is not None else ""
    return f"{stack:>20} {recipe:>10} {vals} {ratio} {t}"


def make_stack(path: Path, anatomy: str, kind: str, seed: int, shape) -> None:
    n, overrides, offset = KINDS[kind]
    shutil.rmtree(path, ignore_errors=True)
    synth_stack(path, SynthParams(shape=shape, n_sections=n, seed=seed + offset, anatomy=anatomy, **overrides))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the base stacks")
    p.add_argument("--variant-seeds", type=int, nargs="+", default=[0], help="seeds of the other kinds")
    p.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    p.add_argument("--shape", default="96,192,192")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/octn4-quality"))
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["reference", "octn4"])
    p.add_argument("--anatomy", nargs="+", choices=["phantom", "mni152"], default=["phantom", "mni152"])
    p.add_argument("--json", type=Path, default=None, help="also write every measure to this file")
    p.add_argument("--reuse", nargs="*", choices=sorted(RECIPES), default=[], metavar="RECIPE",
                   help="use the outputs already in --work for these recipes (the stacks are regenerated "
                        "identically from their seeds) instead of running them again")
    a = p.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    a.work.mkdir(parents=True, exist_ok=True)
    results = []
    print(HEADER, flush=True)
    for anatomy in a.anatomy:
        for kind in a.kinds:
            for seed in (a.seeds if kind == "base" else a.variant_seeds):
                name = f"{anatomy}-{kind}-{seed}"
                stack = a.work / f"stack_{name}"
                make_stack(stack, anatomy, kind, seed, shape)
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
                        rc = octn4_main(["run", str(stack / "volume.ome.zarr"), str(out), "--sections",
                                         str(len(s["bounds"])), "--workers", str(a.workers), "--overwrite", "-q",
                                         *RECIPES[recipe]])
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


def summarise(results) -> None:
    """Per stack and recipe: error over the reference's, step over the floor, contrast over the truth's."""
    by = {(r["stack"], r["recipe"]): r for r in results}
    stacks = list(dict.fromkeys(r["stack"] for r in results))
    print(f"\n{'stack':>20} {'recipe':>10} {'err/ref':>8} {'step/floor':>10} {'step/E[floor]':>13} "
          f"{'step/ref':>9} {'contrast/truth':>14} {'recall':>7}")
    for st in stacks:
        truth, ref = by[(st, "truth")], by.get((st, "reference"))
        for (name, recipe), m in by.items():
            if name != st or recipe == "truth":
                continue
            err = f"{m['err'] / ref['err']:8.2f}" if ref else " " * 8
            step = f"{m['step'] / ref['step']:9.3f}" if ref else " " * 9
            print(f"{st:>20} {recipe:>10} {err} {m['step'] / truth['step']:10.1f} "
                  f"{m['step'] / truth['floor_draws']['median']:13.1f} {step} "
                  f"{m['contrast'] / truth['contrast']:14.3f} {m['recall']:7.3f}")


if __name__ == "__main__":
    main()
