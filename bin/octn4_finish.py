#!/usr/bin/env python3
"""FINISH: one brain's outputs from its sections' parts: corrected and bias (shards linked, pyramids built),
fields.json and metrics.json, published complete or not at all."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import apply, cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_finish.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr or .zarr)")
    p.add_argument("mask", type=Path, help="tissue mask from octn4_mask_finish.py")
    p.add_argument("solution", type=Path, help="the global solution from octn4_global.py")
    p.add_argument("outdir", type=Path, help="output folder (created complete, or not at all)")
    p.add_argument("parts", type=Path, nargs="+", help="every section's part from octn4_apply.py, any order")
    p.add_argument("--format", choices=("ome-zarr", "nifti"), default="ome-zarr", help="output format")
    p.add_argument("--threads", type=int, default=1, help="outputs assembled at once (threads; 2 is all it uses)")
    cli.add_voxel_size_arg(p)
    cli.add_common_args(p)
    return p


def run(a) -> None:
    apply.stage_finish_files(a.input, a.mask, a.solution, a.parts, a.outdir, voxel_size=a.voxel_size,
                                output_format=a.format, overwrite=a.overwrite, threads=a.threads)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_finish.py")


if __name__ == "__main__":
    sys.exit(main())
