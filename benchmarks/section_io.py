#!/usr/bin/env python3
"""Bytes a per-section task reads, against the size of the volume it is given.

The N4_SECTION process stages the whole volume (a link on shared
filesystems, a lazy Fusion mount on cloud executors) but reads only what
its section needs: the Z planes of its shrunk fit grid, from its own slab.
This runs ``fit_section`` for each section in a fresh process and reports
the bytes read from files (``rchar`` of /proc/self/io, counted after a
warm-up fit of another section, so that lazily imported code is not
counted) next to the on-disk size of the volume and of the mask.

Usage::

    python benchmarks/section_io.py --shape 96,384,384 --sections 4 [--work /tmp/octn4-io]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
from octn4 import pipeline, section_stage
from octn4.io import open_volume
from octn4.params import N4Params

def rchar():
    for line in open('/proc/self/io'):
        if line.startswith('rchar:'):
            return int(line.split()[1])

inp, mask, n, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bounds = pipeline.volume_sections(open_volume(inp), n_sections=n)
# warm-up on another section, so lazily imported modules are not counted as data
section_stage.fit_section(inp, mask, bounds, (index + 1) % n, params=N4Params(maximum_number_of_iterations=(1,)))
t0 = rchar()
section_stage.fit_section(inp, mask, bounds, index, params=N4Params(maximum_number_of_iterations=(2,)))
print(json.dumps({"index": index, "bytes": rchar() - t0, "planes": bounds[index][1] - bounds[index][0]}))
"""


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="96,384,384")
    p.add_argument("--sections", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("/tmp/octn4-io"))
    a = p.parse_args(argv)
    shutil.rmtree(a.work, ignore_errors=True)
    from octn4 import defaults, mask_stage, pipeline
    from octn4.cli import main as octn4

    octn4(["synth", str(a.work / "stack"), "--shape", a.shape, "--sections", str(a.sections), "-q"])
    vol = a.work / "stack" / "volume.ome.zarr"
    mask = a.work / "mask.ome.zarr"
    v = pipeline.open_input(vol)
    mask_stage.stage_mask(v, pipeline.volume_sections(v, n_sections=a.sections), mask, params=defaults.MASK, attrs={})
    total = disk_bytes(vol / "s0") + disk_bytes(mask / "s0")
    print(f"volume {a.shape}, {a.sections} sections; level-0 data on disk: volume {disk_bytes(vol / 's0'):,} B, "
          f"mask {disk_bytes(mask / 's0'):,} B")
    for i in range(a.sections):
        r = subprocess.run([sys.executable, "-c", CHILD, str(vol), str(mask), str(a.sections), str(i)],
                           capture_output=True, text=True, check=True)
        rec = json.loads(r.stdout)
        print(f"section {i} ({rec['planes']} planes): read {rec['bytes']:,} B = {rec['bytes'] / total:.1%} of "
              f"volume + mask")


if __name__ == "__main__":
    main()
