#!/usr/bin/env python3
"""Accuracy of ``octn4 run`` against the known bias of generated stacks.

For each anatomy (``phantom``: generated tissue; ``mni152``: a block of the
MNI152 brain, see ``octn4.synth``) and seed: ``octn4 synth``, then ``octn4 run`` with the default settings
under each recipe, all with octn4's defaults otherwise (section gains on):
``sitk`` (the SimpleITK engine), ``octn4`` (octn4's engine) and
``reference`` (the plain reference recipe: mask, SimpleITK N4 per section,
global N4, no gains).  Prints, per stack:

- log-bias error: RMS over the true tissue of ``log(estimated bias) -
  log(true bias)`` after removing its mean (a constant gain), uncorrected
  (estimate = 1) and corrected;
- boundary step: RMS over the section boundaries of the step in the per-plane
  median of ``log(volume / clean)`` (the bias left, read through the anatomy),
  3 planes on each side; the truth-corrected volume shows the speckle floor;
- tissue contrast: the white/grey ratio of class medians in the corrected
  volume over the same ratio in the clean volume (1 = preserved);
- mask recall and precision against the true tissue.

Usage::

    python benchmarks/accuracy_synth.py --seeds 0 1 2 --shape 96,192,192 --sections 4 --work /tmp/acc \
        --recipes octn4 sitk reference --anatomy phantom mni152
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
from octn4.metrics import boundary_steps, log_bias_error

RECIPES = {
    "sitk": ["--engine", "sitk"],
    "octn4": ["--engine", "octn4"],
    "reference": ["--engine", "sitk", "--no-gains"],
}


def read(path):
    v = open_volume(path)
    return v.read(0, v.shape[0])


def step_rms(vol, clean, tissue, bounds):
    r = np.log(np.maximum(vol, 1e-12) / clean)
    prof = np.array([np.median(r[z][tissue[z]]) if tissue[z].any() else np.nan for z in range(r.shape[0])])
    s = np.array(boundary_steps(prof, bounds))
    return float(np.sqrt(np.nanmean(s ** 2)))


def evaluate(stack: Path, result: Path) -> dict:
    tissue = read(stack / "labels.ome.zarr") > 0
    truth, clean, vol = (read(stack / f"{n}.ome.zarr") for n in ("truth_bias", "clean", "volume"))
    bounds = json.loads((stack / "synth.json").read_text())["sections"]
    est, cor = read(result / "bias.ome.zarr"), read(result / "corrected.ome.zarr")
    mask = read(result / "mask.ome.zarr") > 0
    labels = read(stack / "labels.ome.zarr")

    def ratio(v):
        return float(np.median(v[labels == 2]) / np.median(v[labels == 1]))

    return {
        "contrast": ratio(cor) / ratio(clean),
        "err_raw": log_bias_error(np.ones_like(truth), truth, tissue),
        "err": log_bias_error(est, truth, tissue),
        "step_raw": step_rms(vol, clean, tissue, bounds),
        "step": step_rms(cor, clean, tissue, bounds),
        "step_floor": step_rms(vol / truth, clean, tissue, bounds),
        "recall": float((mask & tissue).sum() / tissue.sum()),
        "precision": float((mask & tissue).sum() / mask.sum()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shape", default="96,192,192")
    p.add_argument("--sections", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/octn4-accuracy"))
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["sitk", "reference"])
    p.add_argument("--anatomy", nargs="+", choices=["phantom", "mni152"], default=["phantom"])
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"{'stack':>22} {'recipe':>10} {'err raw':>8} {'err':>7} {'ratio':>6} {'step raw':>9} {'step':>7} "
          f"{'ratio':>6} {'floor':>6} {'contrast':>8} {'recall':>7} {'prec':>6} {'time':>6}")
    for anatomy, seed in ((an, s) for an in a.anatomy for s in a.seeds):
        stack = a.work / f"stack_{anatomy}_{seed}"
        shutil.rmtree(stack, ignore_errors=True)
        octn4_main(["synth", str(stack), "--shape", a.shape, "--sections", str(a.sections), "--seed", str(seed),
                    "--anatomy", anatomy, "-q"])
        for recipe in a.recipes:
            extra = RECIPES[recipe]
            out = a.work / f"out_{anatomy}_{seed}_{recipe}"
            t0 = time.perf_counter()
            rc = octn4_main(["run", str(stack / "volume.ome.zarr"), str(out), "--sections", str(a.sections),
                             "--workers", str(a.workers), "--overwrite", "-q", *extra])
            if rc:
                raise SystemExit(rc)
            dt = time.perf_counter() - t0
            m = evaluate(stack, out)
            print(f"{anatomy + ' s' + str(seed):>22} {recipe:>10} {m['err_raw']:8.3f} {m['err']:7.3f} "
                  f"{m['err'] / m['err_raw']:6.2f} {m['step_raw']:9.3f} {m['step']:7.3f} "
                  f"{m['step'] / m['step_raw']:6.2f} {m['step_floor']:6.3f} {m['contrast']:8.2f} {m['recall']:7.2f} "
                  f"{m['precision']:6.2f} {dt:5.0f}s", flush=True)


if __name__ == "__main__":
    main()
