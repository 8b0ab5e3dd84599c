#!/usr/bin/env python3
"""MASK_FINISH: validate the input from the sections' scans and take the mask parts into the tissue mask."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, mask_stage, provenance  # noqa: E402
from octn4.io import open_volume  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_mask_finish.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr, .zarr, .nii[.gz])")
    p.add_argument("out", type=Path, help="mask to write (.ome.zarr or .nii.gz)")
    p.add_argument("--thresholds", type=Path, nargs="+", required=True,
                   help="every section's thresholds folder (octn4_mask_thresholds.py), in any order")
    p.add_argument("--parts", type=Path, nargs="+", required=True,
                   help="every section's mask part folder (octn4_mask_section.py), in any order")
    cli.add_mask_task_args(p, log_scale_check=True)
    return p


def run(a) -> None:
    vol = open_volume(a.input, voxel_size=a.voxel_size)
    bounds = cli.section_layout(a)
    params = cli.mask_params(a)
    attrs = provenance.provenance("mask", vol, {"mask": params.as_dict(), "sections": [list(b) for b in bounds]})
    mask_stage.stage_mask_finish_files(a.input, bounds, a.thresholds, a.parts, a.out, params=params, attrs=attrs,
                                       voxel_size=a.voxel_size, check_log_scale=not a.skip_log_scale_check,
                                       overwrite=a.overwrite)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_mask_finish.py")


if __name__ == "__main__":
    sys.exit(main())
