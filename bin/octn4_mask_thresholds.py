#!/usr/bin/env python3
"""MASK_THRESHOLDS: one section's per-plane mask thresholds and its share of the input scan, as a folder."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, mask_stage  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_mask_thresholds.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr, .zarr, .nii[.gz])")
    p.add_argument("out", type=Path, help="the thresholds folder to write (created complete, or not at all)")
    p.add_argument("--index", type=int, required=True, help="section index (0-based)")
    cli.add_mask_task_args(p)
    return p


def run(a) -> None:
    bounds = cli.section_layout(a)
    mask_stage.stage_mask_thresholds_files(a.input, bounds, a.index, a.out, params=cli.mask_params(a),
                                           voxel_size=a.voxel_size, overwrite=a.overwrite)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_mask_thresholds.py")


if __name__ == "__main__":
    sys.exit(main())
