#!/usr/bin/env python3
"""APPLY_SECTION: corrected volume and bias of one section's planes (the chunk rows it owns), as an output part."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import apply, cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_apply.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr or .zarr)")
    p.add_argument("mask", type=Path, help="tissue mask from octn4_mask_finish.py")
    p.add_argument("solution", type=Path, help="the global solution from octn4_global.py")
    p.add_argument("out", type=Path, help="the part folder to write (created complete, or not at all)")
    p.add_argument("--index", type=int, required=True, help="section index (0-based)")
    p.add_argument("--tile-mib", type=int, default=1024, help="memory for one apply tile, MiB")
    cli.add_full_bias_arg(p)
    cli.add_voxel_size_arg(p)
    cli.add_common_args(p)
    return p


def run(a) -> None:
    apply.stage_apply_files(a.input, a.mask, a.solution, a.index, a.out, voxel_size=a.voxel_size,
                               tile_mib=a.tile_mib, overwrite=a.overwrite, full_bias=a.full_bias)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_apply.py")


if __name__ == "__main__":
    sys.exit(main())
