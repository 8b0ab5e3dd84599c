#!/usr/bin/env python3
"""Where a whole-volume run stands against the cost of touching its data, and what N nodes would give.

In one run, on one stack (``--stack``, e.g. a 4 GiB ``octn4 synth --shape
256,2048,2048``):

1. **The I/O floor**: read the input once in 16-plane slabs, then write two
   float32 volumes of its size with octn4's output layout (its chunks,
   shards and codec, level 0 only).  Seconds and MB/s.
2. **octn4 run** (``--from-run DIR`` reuses a finished run's
   ``metrics.json`` instead of running): per-stage seconds, MB/s of input
   per core, and the whole run against the floor.
3. **The mask as the workflow runs it** (``--mask-tasks``): every section's
   ``MASK_THRESHOLDS`` task, then every ``MASK_SECTION`` task, ``--cores``
   at a time in worker processes, then ``MASK_FINISH``, each timed (and
   its peak memory), and the mask they make compared with the run's, every
   pyramid level, bit for bit.
4. **A prediction for N nodes** from the measured per-task times and
   the DAG: the mask's tasks (per section, twice, then a finish per brain),
   ``N4_SECTION`` (one task per section, with the section's summary for the
   global pass: ``octn4 run``'s ``summaries`` stage), ``N4_GLOBAL`` (gains
   and global fit from the summaries), ``APPLY_SECTION`` (one task per section) and ``FINISH`` (one per
   brain: links and pyramids).  The critical path is ``waves x (mask
   thresholds + mask part) + mask finish + waves x section + global +
   waves x apply + finish`` with ``waves = ceil(sections / (N * cores))``,
   the mask tasks' times as measured in 3 (without ``--mask-tasks``, the
   run's mask stage, on one node whatever N is), and a section or apply
   task's time as its stage's seconds x the workers / sections.  For a 1 TB
   brain the per-brain stages (the finishes, the gains and global fit) are
   scaled by voxels and the section count by depth at the same section
   thickness.  A model, not a measurement: it ignores queueing, staging and
   file-system contention.
5. With ``--truth`` (the stack's ``octn4 synth`` folder), the run's
   log-bias error against the known bias, streamed at a pyramid level
   that keeps every plane (``--truth-level``, default 1).

Usage::

    python benchmarks/scale.py --stack /work/big/stack/volume.ome.zarr --work /work/big/scale \\
        --from-run /work/big/out_main --cores 2 --mask-tasks --truth /work/big/stack
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def io_floor(stack: Path, work: Path) -> dict:
    import zarr

    from octn4.io import CHUNKS, open_volume, output_compressors

    vol = open_volume(stack)
    t0 = time.perf_counter()
    for z0 in range(0, vol.shape[0], 16):
        vol.read(z0, z0 + 16)
    t_read = time.perf_counter() - t0
    chunks = tuple(min(c, n) for c, n in zip(CHUNKS, vol.shape))
    shards = (chunks[0],) + tuple(-(-n // c) * c for n, c in zip(vol.shape[1:], chunks[1:]))
    work.mkdir(parents=True, exist_ok=True)
    arrays = []
    for name in ("a", "b"):
        if (work / name).exists():
            shutil.rmtree(work / name)
        arrays.append(zarr.create_array(str(work / name), shape=vol.shape, dtype=np.float32, chunks=chunks,
                                        shards=shards, compressors=output_compressors(np.float32), fill_value=0))
    t_write = 0.0
    for z0 in range(0, vol.shape[0], 16):
        block = vol.read(z0, z0 + 16)          # the data written is the input itself: speckle, as corrected is
        t0 = time.perf_counter()
        for arr in arrays:
            arr[z0:z0 + block.shape[0]] = block
        t_write += time.perf_counter() - t0
    for name in ("a", "b"):
        shutil.rmtree(work / name)
    gib = math.prod(vol.shape) * 4 / 2 ** 30
    return {"shape": list(vol.shape), "gib": gib, "read_s": t_read, "write_two_s": t_write,
            "floor_s": t_read + t_write, "read_MBps": gib * 1024 / t_read, "write_MBps": 2 * gib * 1024 / t_write}


def run_octn4(stack: Path, out: Path, extra: list[str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "octn4.cli", "run", str(stack), str(out), *extra]
    subprocess.run(cmd, check=True)
    return json.loads((out / "metrics.json").read_text())


class _Planes:
    """Planes ``[z0:z1]`` of a volume given by ``read(z0, z1)`` (what a Zarr array's slicing gives)."""

    def __init__(self, shape, read):
        self.shape, self._read = tuple(shape), read

    def __getitem__(self, z):
        return self._read(z.start, z.stop)


def streamed_error(run: Path, stack: Path, level: int = 1) -> dict:
    """``accuracy_synth.py``'s log-bias error of a run against ``octn4 synth``'s truth, streamed in 16-plane
    slabs at pyramid ``level`` (tissue from the labels; the mean log error removed): total, between-section
    RMS and the worst section's RMS."""
    import zarr

    meta = json.loads((stack / "synth.json").read_text())
    bounds = [tuple(b) for b in meta["sections"]]

    def level_of(p):
        return zarr.open_group(str(p), mode="r")[f"s{level}"]

    truth, labels = level_of(stack / "truth_bias.ome.zarr"), level_of(stack / "labels.ome.zarr")
    if f"s{level}" in zarr.open_group(str(run / "bias.ome.zarr"), mode="r"):
        est = level_of(run / "bias.ome.zarr")
    elif level == 0:                            # a bias stored from level 1 down: level 0 from fields.json
        from octn4.bias import BiasModel

        model = BiasModel.from_run(run)
        est = _Planes(model.shape, model.read)
    else:
        raise SystemExit(f"the run's bias has no level {level}")
    if not truth.shape[0] == labels.shape[0] == est.shape[0] == sum(b - a for a, b in bounds):
        raise SystemExit(f"level {level} halves Z; use a level that keeps every plane")
    s, q, n = (np.zeros(len(bounds)) for _ in range(3))
    for i, (a, b) in enumerate(bounds):
        for z0 in range(a, b, 16):
            z1 = min(b, z0 + 16)
            t = np.asarray(labels[z0:z1]) > 0
            e = (np.log(np.asarray(est[z0:z1], np.float64)) - np.log(np.asarray(truth[z0:z1], np.float64)))[t]
            s[i], q[i], n[i] = s[i] + e.sum(), q[i] + (e ** 2).sum(), n[i] + e.size
    ok = n > 0
    mean = s.sum() / n.sum()
    mu = s[ok] / n[ok] - mean
    return {"level": level, "err": float(np.sqrt(q.sum() / n.sum() - mean ** 2)),
            "between": float(np.sqrt((n[ok] * mu ** 2).sum() / n.sum())),
            "worst": float(np.sqrt((q[ok] / n[ok] - 2 * mean * s[ok] / n[ok] + mean ** 2).max()))}


def _mask_task(job):
    """One of the workflow's per-section mask tasks, in a worker process: ``(kind, index, seconds, peak MiB)``."""
    import resource

    from octn4 import mask_stage
    from octn4.mask import MaskParams

    kind, stack, bounds, i, work, params = job
    thresholds = [work / f"thresholds_{j}" for j in range(len(bounds))]
    t0 = time.perf_counter()
    if kind == "thresholds":
        mask_stage.stage_mask_thresholds_files(stack, bounds, i, thresholds[i], params=MaskParams(**params),
                                               overwrite=True)
    else:
        mask_stage.stage_mask_section_files(stack, bounds, i, thresholds, work / f"part_{i}",
                                            params=MaskParams(**params), overwrite=True)
    return kind, i, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mask_tasks(stack: Path, work: Path, bounds, cores: int, run_mask: Path | None) -> dict:
    """The mask made as the workflow's tasks make it (see the module's docstring), timed; compared with
    ``run_mask`` (every level) when given."""
    import zarr

    from octn4 import defaults, mask_stage
    from octn4.workers import worker_pool

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    params = defaults.MASK.as_dict()
    out = {"thresholds_s": [0.0] * len(bounds), "part_s": [0.0] * len(bounds), "peak_rss_mib": 0.0}
    t_start = time.perf_counter()
    with worker_pool(cores, "a mask task was killed") as pool:
        for kind in ("thresholds", "part"):
            jobs = [(kind, stack, bounds, i, work, params) for i in range(len(bounds))]
            for kind_, i, sec, rss in pool.map(_mask_task, jobs):
                out[f"{kind_}_s"][i] = sec
                out["peak_rss_mib"] = max(out["peak_rss_mib"], rss)
    t0 = time.perf_counter()
    mask = work / "mask.ome.zarr"
    mask_stage.stage_mask_finish_files(stack, bounds, [work / f"thresholds_{i}" for i in range(len(bounds))],
                                       [work / f"part_{i}" for i in range(len(bounds))], mask,
                                       params=defaults.MASK, attrs={})
    out["finish_s"] = time.perf_counter() - t0
    out["wall_s"] = time.perf_counter() - t_start
    if run_mask is not None:
        ours, theirs = (zarr.open_group(str(m), mode="r") for m in (mask, run_mask))
        levels = sorted(theirs.array_keys())
        out["equal_to_run"] = sorted(ours.array_keys()) == levels and all(
            np.array_equal(ours[k][...], theirs[k][...]) for k in levels)
    shutil.rmtree(work)
    return out


def predict(metrics: dict, cores: int, nodes: int, scale_voxels: float = 1.0, mask: dict | None = None) -> float:
    """Critical path of the DAG on ``nodes`` nodes of ``cores`` cores (see the module's docstring)."""
    t = metrics["timings_s"]
    n = len(metrics["sections"])
    workers = max(1, min(cores, n))
    n_scaled = math.ceil(n * scale_voxels)            # the same section thickness: sections grow with depth
    waves = math.ceil(n_scaled / (nodes * cores))      # one section (or apply) task per core
    # the section summaries are the section tasks' work in the workflow (octn4 run makes them in its global stage)
    per_task = (t["sections"] + t.get("summaries", 0.0) + t["apply"]) * workers / n
    per_brain = t.get("gains", 0.0) + t["global_fit"] + t.get("finish", 0.0)
    if mask is None:                                   # the run's mask stage: one node
        per_brain += t["validate"] + t["mask"]
    else:
        per_task += float(np.mean(mask["thresholds_s"]) + np.mean(mask["part_s"]))
        per_brain += mask["finish_s"]
    return per_brain * scale_voxels + waves * per_task


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", type=Path, required=True, help="the input volume (.ome.zarr)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--from-run", type=Path, help="a finished octn4 run folder (else octn4 run is run here)")
    p.add_argument("--cores", type=int, default=2, help="cores the run used (its --workers)")
    p.add_argument("--sections", type=int, default=8)
    p.add_argument("--mask-tasks", action="store_true",
                   help="also make the mask as the workflow's per-section tasks do, timed (the prediction uses them)")
    p.add_argument("--truth", type=Path, help="the octn4 synth folder of --stack: also the run's log-bias error")
    p.add_argument("--truth-level", type=int, default=1, help="pyramid level the error is taken at (default 1)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    floor = io_floor(a.stack, a.work / "floor")
    print(f"I/O floor on {floor['shape']} ({floor['gib']:.2f} GiB): read {floor['read_s']:.1f} s "
          f"({floor['read_MBps']:.0f} MB/s), two float32 writes {floor['write_two_s']:.1f} s "
          f"({floor['write_MBps']:.0f} MB/s), floor {floor['floor_s']:.1f} s", flush=True)
    metrics = (json.loads((a.from_run / "metrics.json").read_text()) if a.from_run else
               run_octn4(a.stack, a.work / "run", ["--sections", str(a.sections), "--workers", str(a.cores), "-q"]))
    t = metrics["timings_s"]
    mb = floor["gib"] * 1024
    print(f"octn4 run: {t['total']:.1f} s = {t['total'] / floor['floor_s']:.1f} x the I/O floor; peak RSS "
          f"{metrics.get('peak_rss_mib')}")
    stages = {k: v for k, v in t.items() if k != "total"}
    for k, v in stages.items():
        print(f"  {k:>10} {v:8.1f} s   {mb / v / a.cores:8.1f} MB/s per core")
    mask = None
    if a.mask_tasks:
        run_dir = a.from_run or a.work / "run"
        bounds = [(r["z_start"], r["z_stop"]) for r in json.loads((run_dir / "fields.json").read_text())["sections"]]
        run_mask = run_dir / "mask.ome.zarr"
        mask = mask_tasks(a.stack, a.work / "mask_tasks", bounds, a.cores, run_mask if run_mask.exists() else None)
        print(f"  mask as workflow tasks on {a.cores} cores: {mask['wall_s']:.1f} s (thresholds tasks "
              f"{np.mean(mask['thresholds_s']):.1f} s, part tasks {np.mean(mask['part_s']):.1f} s on average, "
              f"finish {mask['finish_s']:.1f} s; peak RSS per task {mask['peak_rss_mib']:.0f} MiB); the run's mask "
              f"bit for bit: {mask.get('equal_to_run')}", flush=True)
    rows = []
    brain = 2 ** 40 / (floor["gib"] * 2 ** 30)             # a 1 TB float32 brain, in units of this stack
    for nodes in (1, 8, 64):
        rows.append({"nodes": nodes, "this_stack_s": predict(metrics, a.cores, nodes, mask=mask),
                     "brain_1tb_h": predict(metrics, a.cores, nodes, brain, mask=mask) / 3600})
        print(f"  predicted on {nodes:>2} node(s) of {a.cores} cores: this stack {rows[-1]['this_stack_s']:8.1f} s, "
              f"a 1 TB brain {rows[-1]['brain_1tb_h']:8.1f} h", flush=True)
    error = None
    if a.truth:
        error = streamed_error(a.from_run or a.work / "run", a.truth, a.truth_level)
        print(f"  log-bias error against the truth at level {error['level']}: {error['err']:.4f} "
              f"(between sections {error['between']:.4f}, worst section {error['worst']:.4f})")
    if a.json:
        a.json.write_text(json.dumps({"floor": floor, "timings_s": t, "peak_rss_mib": metrics.get("peak_rss_mib"),
                                      "cores": a.cores, "mask_tasks": mask, "prediction": rows,
                                      "error": error}, indent=1))


if __name__ == "__main__":
    main()
