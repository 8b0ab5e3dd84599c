#!/usr/bin/env python3
"""TISSUE_MASK: validate the input volume and write its tissue mask (uint8 OME-Zarr or NIfTI)."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, pipeline  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_mask.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr, .zarr, .nii[.gz])")
    p.add_argument("out", type=Path, help="mask to write (.ome.zarr or .nii.gz)")
    cli.add_section_args(p)
    cli.add_input_args(p)
    cli.add_mask_args(p)
    p.add_argument("--workers", type=int, default=1,
                   help="sections masked in parallel (processes); each holds one slab and its halo")
    cli.add_common_args(p)
    return p


def run(a) -> None:
    if a.workers < 1:
        raise cli.InputError(f"--workers must be >= 1; got {a.workers}")
    vol = pipeline.open_input(a.input, voxel_size=a.voxel_size, check_log_scale=not a.skip_log_scale_check,
                              workers=a.workers)
    bounds = pipeline.volume_sections(vol, n_sections=a.sections, planes=a.planes)
    params = cli.mask_params(a)
    attrs = pipeline.provenance("mask", vol, {"mask": params.as_dict(), "sections": [list(b) for b in bounds]})
    pipeline.stage_mask(vol, bounds, a.out, params=params, attrs=attrs, overwrite=a.overwrite, workers=a.workers)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_mask.py")


if __name__ == "__main__":
    sys.exit(main())
