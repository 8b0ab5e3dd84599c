#!/usr/bin/env python3
"""MASK_SECTION: one section's part of the tissue mask (the chunk rows it owns), from the sections' thresholds."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, mask_stage  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_mask_section.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr, .zarr, .nii[.gz])")
    p.add_argument("out", type=Path, help="the mask part folder to write (created complete, or not at all)")
    p.add_argument("thresholds", type=Path, nargs="+",
                   help="thresholds folders from octn4_mask_thresholds.py (at least the neighbours the Z closing "
                        "reaches; all of them is simplest)")
    p.add_argument("--index", type=int, required=True, help="section index (0-based)")
    cli.add_mask_task_args(p)
    return p


def run(a) -> None:
    bounds = cli.section_layout(a)
    mask_stage.stage_mask_section_files(a.input, bounds, a.index, a.thresholds, a.out, params=cli.mask_params(a),
                                        voxel_size=a.voxel_size, overwrite=a.overwrite)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_mask_section.py")


if __name__ == "__main__":
    sys.exit(main())
