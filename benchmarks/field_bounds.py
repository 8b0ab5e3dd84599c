"""What the best field of octn4's form leaves, on the stacks of ``accuracy_synth.py``.

octn4's estimate in a section is a sum of pieces that are all smooth or
depth-only: the section's N4 field (a cubic B-spline whose lattice the run's
``fields.json`` gives), the depth profile (any function of the plane), the
section gain (a constant) and the global field restricted to the section (one
cubic span per axis, a cubic polynomial, which the section's lattice
contains).  This script fits, per section and by least squares over the true
tissue, the true log bias with the union of those spaces: the section
lattice plus one free constant per plane.  That *oracle field* is at least as
close to the truth, in log RMS, as any estimate octn4 can produce with that
lattice, whatever the gains, depth model or N4 schedule; its measures are
what the field model itself allows.

Printed per stack, beside octn4's run (``results.json`` of accuracy_synth,
recipe ``octn4``): the log-bias error (total and worst section), the tissue
contrast kept (white/grey median ratio against the clean volume's), the
boundary step against ``E[floor]``.  Where the oracle's contrast is far from
the truth, no choice of octn4's defaults can meet a contrast criterion on
that stack: the bias has a part the lattice cannot represent (tissue-
dependent attenuation varies with the anatomy along every A-line).

Usage::

    python benchmarks/accuracy_synth.py --work /tmp/qf --json /tmp/qf/results.json
    python benchmarks/field_bounds.py --work /tmp/qf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from accuracy_synth import error_parts, load_stack, speckle_floor_draws, volume_measures

from octn4.bspline import basis_matrix


def oracle_log_field(log_truth: np.ndarray, tissue: np.ndarray, maps: list[dict], order: int = 3) -> np.ndarray:
    """Least-squares fit over ``tissue`` of ``log_truth`` (one section) by the tensor B-spline of the
    section's field (``maps``: its axis maps (Z, Y, X), ``t = scale * i + offset``, as ``fields.json`` holds
    them) plus one constant per plane; evaluated on the tissue (0 elsewhere: every measure is taken on the
    true tissue, and the fit is unconstrained far from it)."""
    nz, ny, nx = log_truth.shape
    b = [basis_matrix(m["scale"] * np.arange(n) + m["offset"], m["spans"] + order, order, m["eps"])
         for n, m in zip((nz, ny, nx), maps)]
    zi, yi, xi = np.nonzero(tissue)
    lattice = (b[0][zi][:, :, None, None] * b[1][yi][:, None, :, None] * b[2][xi][:, None, None, :])
    design = np.concatenate([lattice.reshape(zi.size, -1), np.eye(nz)[zi]], axis=1)
    coef = np.linalg.lstsq(design, log_truth[zi, yi, xi].astype(np.float64), rcond=None)[0]
    m = lattice.shape[1:]
    phi = coef[:-nz].reshape(m)
    full = np.einsum("zi,yj,xk,ijk->zyx", b[0], b[1], b[2], phi, optimize=True)
    return np.where(tissue, full + coef[-nz:][:, None, None], 0.0)


def analyse(stack: Path, out: Path) -> dict:
    s = load_stack(stack)
    f = json.loads((out / "fields.json").read_text())
    t, bounds = s["tissue"], s["bounds"]
    log_truth = np.log(s["truth_bias"].astype(np.float64))
    est = np.zeros(t.shape)
    for d in f["sections"]:
        z0, z1 = d["z_start"], d["z_stop"]
        spans = tuple(m["spans"] for m in d["field"]["maps"])
        if t[z0:z1].any():
            est[z0:z1] = oracle_log_field(log_truth[z0:z1], t[z0:z1], d["field"]["maps"], d["field"]["order"])
    bias = np.exp(est).astype(np.float32)
    err, _, _, worst = error_parts(bias, s["truth_bias"], t, bounds)
    m = volume_measures(s["volume"] / bias, s["clean"], s["labels"], t, bounds, s["dz_mm"])
    truth = volume_measures(s["volume"] / s["truth_bias"], s["clean"], s["labels"], t, bounds, s["dz_mm"])
    draws = speckle_floor_draws(t, bounds, s["looks"])
    return {"err": err, "worst": worst, "contrast": m["contrast"], "truth_contrast": truth["contrast"],
            "step": m["step"], "e_floor": float(np.median(draws)), "spans": spans}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/octn4-quality"))
    p.add_argument("--stacks", default="*", help="which stacks (a glob on the name after 'stack_')")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    runs = {}
    if (a.work / "results.json").exists():
        runs = {r["stack"]: r for r in json.loads((a.work / "results.json").read_text()) if r["recipe"] == "octn4"}
    names = sorted(q.name[len("stack_"):] for q in a.work.glob(f"stack_{a.stacks}")
                   if (a.work / f"out_{q.name[len('stack_'):]}_octn4" / "fields.json").exists())
    if not names:
        raise SystemExit(f"no octn4 runs in {a.work}: run accuracy_synth.py --work {a.work} first")
    print(f"{'stack':>30} {'':>6} {'err':>6} {'worst':>6} {'contrast/truth':>14} {'step/E[floor]':>13}")
    results = {}
    for name in names:
        r = analyse(a.work / f"stack_{name}", a.work / f"out_{name}_octn4")
        results[name] = r
        rows = [("oracle", r)]
        if name in runs:
            rows.append(("octn4", runs[name]))
        for label, m in rows:
            print(f"{name:>30} {label:>6} {m['err']:6.3f} {m['worst']:6.3f} "
                  f"{m['contrast'] / r['truth_contrast']:14.3f} {m['step'] / r['e_floor']:13.1f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
