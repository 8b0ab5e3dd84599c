"""How far section gains alone can lower the boundary steps, on the outputs of ``accuracy_synth.py``.

For each stack in ``--work`` with an octn4 run (``out_<stack>_octn4``), this
reads the run's section fields, gains and global field (``fields.json``) and
the stack's ground truth, and prints the benchmark's ``step`` figure (RMS
over the boundaries of the step in the per-plane median of ``log(corrected /
clean)``, 3 planes on each side) for:

- ``run``: the run's own gains (recomputed from ``fields.json``; equals the
  benchmark's figure);
- ``oracle``: gains set from the true bias, so that the tissue-mean error of
  the section-corrected volume has no step between the 3-plane blocks the
  figure compares.  Its fields and global field are the run's: this is
  what exact knowledge of each section's mean error gives with those
  fields (an estimator can land lower only by luck, since the figure's
  speckle part is unknown to it);
- ``floor``: the truth-corrected volume's figure (one speckle draw), and
  ``E[floor]`` with its range over 16 fresh draws
  (:func:`accuracy_synth.speckle_floor_draws`).

the lateral spread of the run's error (SD over the tissue of a plane of log
estimated - log true bias, averaged over the sections) in the first two,
the middle two and the last two planes of each section, and, per
boundary, the run's step against the oracle's and the part of the
``touching`` estimator that is the anatomy's own change across the cut (the
estimator applied to the clean volume).  Changing the gains while keeping the
global field is an approximation of a rerun (the global fit sees the new
gains); ``run`` checks it.

Usage::

    python benchmarks/accuracy_synth.py --work /tmp/qfull --recipes octn4
    python benchmarks/gain_bounds.py --work /tmp/qfull
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from accuracy_synth import load_stack, log_ratio_profile, read, speckle_floor_draws, step_rms

from octn4.bspline import BSplineField
from octn4.defaults import GAINS
from octn4.gains import solve_gains, touching_step
from octn4.metrics import boundary_steps


def analyse(stack: Path, out: Path) -> dict:
    s = load_stack(stack)
    f = json.loads((out / "fields.json").read_text())
    t, clean, bounds = s["tissue"], s["clean"], s["bounds"]
    nz = t.shape[0]
    log_sec = np.zeros(t.shape, np.float32)
    gains = np.zeros(nz)
    for d in f["sections"]:
        z0, z1 = d["z_start"], d["z_stop"]
        log_sec[z0:z1] = BSplineField.from_dict(d["field"]).evaluate(np.arange(z1 - z0))
        gains[z0:z1] = d["gain_log"]
    log_glob = BSplineField.from_dict(f["global"]).evaluate(np.arange(nz))
    mask = read(out / "mask.ome.zarr") > 0
    # the step figure's profile for the run's fields without gains (a gain is a constant per section)
    prof = log_ratio_profile(s["volume"] / np.exp(log_sec + log_glob), clean, t)
    err = log_sec + log_glob - np.log(s["truth_bias"])
    mean_err = np.array([err[z][t[z]].mean() for z in range(nz)])
    sd_err = np.array([err[z][t[z]].std() for z in range(nz)])
    del err
    mid = [(a + b) // 2 for a, b in bounds]
    lateral = np.array([(sd_err[a:a + 2].mean(), sd_err[m - 1:m + 1].mean(), sd_err[b - 2:b].mean())
                        for (a, b), m in zip(bounds, mid)]).mean(0)
    weights = [int(mask[a:b].sum()) for a, b in bounds]

    def step_with(log_gains_per_section):
        lg = np.zeros(nz)
        for (a, b), g in zip(bounds, log_gains_per_section):
            lg[a:b] = g
        return step_rms(prof - lg, bounds)

    # the oracle's step in the corrected volume cancels the error's step between the figure's blocks
    oracle = [-d for d in boundary_steps(mean_err, bounds)]
    boundaries = []
    for (_, z), d_oracle in zip(bounds[:-1], oracle):          # sections are contiguous: s+1 starts at z
        anat, _ = touching_step(clean[z - 1], clean[z], mask[z - 1], mask[z], sigma=GAINS.smoothing_px,
                                min_shared=GAINS.min_shared)
        boundaries.append({"z": z, "run_step": float(gains[z] - gains[z - 1]), "oracle_step": d_oracle,
                           "anatomy": anat})
    floor = step_rms(log_ratio_profile(s["volume"] / s["truth_bias"], clean, t), bounds)
    draws = speckle_floor_draws(t, bounds, s["looks"])
    return {"run": step_with([d["gain_log"] for d in f["sections"]]),
            "oracle": step_with(solve_gains(oracle, weights)), "floor": floor,
            "floor_draws": {"median": float(np.median(draws)), "min": float(draws.min()), "max": float(draws.max())},
            "lateral_error_sd": dict(zip(("first", "middle", "last"), map(float, lateral))),
            "boundaries": boundaries}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/octn4-quality"))
    p.add_argument("--stacks", nargs="*", default=None, help="stack names (default: every one with an octn4 run)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    names = a.stacks or sorted(q.name[len("stack_"):] for q in a.work.glob("stack_*")
                               if (a.work / f"out_{q.name[len('stack_'):]}_octn4" / "fields.json").exists())
    if not names:
        raise SystemExit(f"no octn4 runs in {a.work}: run accuracy_synth.py --work {a.work} first")
    print(f"{'stack':>30} {'floor':>7} {'E[floor]':>8} {'range':>13} {'run':>7} {'oracle':>7} "
          f"{'run/floor':>9} {'oracle/floor':>12} {'run/E':>6} {'oracle/E':>8}")
    results = {}
    for name in names:
        r = analyse(a.work / f"stack_{name}", a.work / f"out_{name}_octn4")
        results[name] = r
        fd = r["floor_draws"]
        print(f"{name:>30} {r['floor']:7.4f} {fd['median']:8.4f} {fd['min']:6.4f}-{fd['max']:6.4f} {r['run']:7.4f} "
              f"{r['oracle']:7.4f} {r['run'] / r['floor']:9.1f} {r['oracle'] / r['floor']:12.1f} "
              f"{r['run'] / fd['median']:6.1f} {r['oracle'] / fd['median']:8.1f}", flush=True)
        lat = r["lateral_error_sd"]
        print(f"{'':>20}   lateral SD of the error: first 2 planes {lat['first']:.4f}, middle 2 {lat['middle']:.4f}, "
              f"last 2 {lat['last']:.4f}")
        for b in r["boundaries"]:
            print(f"{'':>20}   z={b['z']:3d}  run step {b['run_step']:+.4f}  oracle {b['oracle_step']:+.4f}  "
                  f"difference {b['run_step'] - b['oracle_step']:+.4f}  anatomy across the cut {b['anatomy']:+.4f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
