#!/usr/bin/env python3
"""Zarr codecs for octn4's outputs, measured on octn4's own kinds of data, side by side in one run.

Three arrays, written and read back whole in the output layout (chunks
``CHUNKS``, plane blocks in Z order) with each codec:

``corrected``
    speckled intensities (the input volume of an ``octn4 synth`` stack, or
    of any OME-Zarr given with ``--volume``), float32;
``bias``
    a smooth field (the stack's ``truth_bias``), float32;
``mask``
    uint8 0/1 (the stack's tissue labels above 0, as a mask looks).

For each: the compression ratio, write and read MB/s (of uncompressed
data, wall clock, one process as octn4's writers use it), and the file count
with and without sharding (shards of 4 chunk rows of Z by whole planes);
medians of ``--repeat`` runs.  Every read is checked equal to what was
written.

Usage::

    octn4 synth /tmp/codecs/stack --shape 64,1024,1024 --sections 4
    python benchmarks/codecs.py /tmp/codecs/stack --work /tmp/codecs/out
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def codecs():
    from zarr.codecs import BloscCodec, ZstdCodec

    return {
        "zstd-0 (zarr's default)": "auto",
        "none": None,
        "zstd-1": [ZstdCodec(level=1)],
        "blosc-lz4-5 shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "blosc-lz4-5 bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
        "blosc-zstd-1 shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
        "blosc-zstd-3 shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
        "blosc-zstd-1 bitshuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")],
    }


def disk_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def measure(data: np.ndarray, path: Path, compressors, chunks, shards, slab: int, repeat: int):
    """Median over ``repeat`` writes and reads (reads from the page cache: what the next stage sees)."""
    runs = [_measure_once(data, path, compressors, chunks, shards, slab) for _ in range(repeat)]
    return {k: (runs[0][k] if k in ("ratio", "files") else float(np.median([r[k] for r in runs]))) for k in runs[0]}


def _measure_once(data, path, compressors, chunks, shards, slab):
    import zarr

    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                            compressors=compressors, fill_value=0)
    for z0 in range(0, data.shape[0], slab):
        arr[z0:z0 + slab] = data[z0:z0 + slab]
    t_write = time.perf_counter() - t0
    size, files = disk_bytes(path)
    t0 = time.perf_counter()
    back = zarr.open_array(str(path), mode="r")[...]
    t_read = time.perf_counter() - t0
    if not np.array_equal(back, data):
        raise AssertionError(f"{path}: read back differs")
    mb = data.nbytes / 2 ** 20
    return {"ratio": data.nbytes / size, "write_MBps": mb / t_write, "read_MBps": mb / t_read, "files": files}


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
    from octn4.io import CHUNKS, open_volume

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stack", type=Path, help="an octn4 synth folder (volume.ome.zarr, truth_bias.ome.zarr)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    vol = open_volume(a.stack / "volume.ome.zarr")
    data = {"corrected": vol.read(0, vol.shape[0]).astype(np.float32)}
    data["bias"] = open_volume(a.stack / "truth_bias.ome.zarr").read(0, vol.shape[0]).astype(np.float32)
    data["mask"] = (open_volume(a.stack / "labels.ome.zarr").read(0, vol.shape[0]) > 0).astype(np.uint8)
    chunks = tuple(min(c, n) for c, n in zip(CHUNKS, vol.shape))
    shards = (chunks[0] * 4,) + tuple(vol.shape[1:])           # 4 chunk rows of Z, whole planes
    slab = shards[0]
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"volume {vol.shape}, chunks {chunks}, shards {shards}; MB/s of uncompressed data")
    print(f"{'array':>10} {'codec':>26} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10} {'files':>6} "
          f"{'sharded: write':>15} {'read':>7} {'files':>6}")
    for name, arr in data.items():
        for label, comp in codecs().items():
            plain = measure(arr, a.work / "plain", comp, chunks, None, slab, a.repeat)
            sharded = measure(arr, a.work / "sharded", comp, chunks, shards, slab, a.repeat)
            rows.append({"array": name, "codec": label, "chunked": plain, "sharded": sharded})
            print(f"{name:>10} {label:>26} {plain['ratio']:6.2f} {plain['write_MBps']:11.0f} "
                  f"{plain['read_MBps']:10.0f} {plain['files']:6d} {sharded['write_MBps']:15.0f} "
                  f"{sharded['read_MBps']:7.0f} {sharded['files']:6d}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"shape": vol.shape, "chunks": chunks, "shards": shards, "rows": rows},
                                     indent=1))


if __name__ == "__main__":
    main()
