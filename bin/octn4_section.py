#!/usr/bin/env python3
"""N4_SECTION: N4 on one serial section; reads only its Z slab, writes its field as JSON and, with --summary,
what the global pass needs from it (its share of the global fit grid, its end planes)."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, pipeline, provenance, section_stage  # noqa: E402
from octn4.io import open_volume  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_section.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr or .zarr)")
    p.add_argument("mask", type=Path, help="tissue mask from octn4_mask_finish.py")
    p.add_argument("out", type=Path, help="section record to write (.json)")
    p.add_argument("--index", type=int, required=True, help="section index, 0 at the top")
    p.add_argument("--summary", type=Path,
                   help="also write the section's summary for the global pass to this folder (its share of the "
                        "global fit grid, set by the global-N4 options below, and its end planes for the gains)")
    cli.add_section_args(p)
    cli.add_voxel_size_arg(p)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for N4")
    cli.add_engine_args(p)
    cli.add_n4_args(p)
    cli.add_n4_args(p, "global-", title="global N4 (the grid the summary feeds)")
    cli.add_gain_args(p)
    cli.add_common_args(p)
    return p


def run(a) -> None:
    vol = open_volume(a.input, voxel_size=a.voxel_size)
    bounds = pipeline.volume_sections(vol, n_sections=a.sections, planes=a.planes)
    config = pipeline.RunConfig(section_n4=cli.n4_params(a), engine=a.engine, device=a.device)  # checks the device
    attrs = provenance.provenance("section", vol, {"section_n4": config.section_n4.as_dict(), "index": a.index,
                                                        "device_requested": a.device,
                                                        "device_choice": config.device_choice},
                                engine=a.engine, device=config.device)
    section_stage.stage_section(a.input, a.mask, bounds, a.index, a.out, params=config.section_n4,
                           voxel_size=a.voxel_size, threads=a.threads, engine=a.engine, device=config.device,
                           attrs=attrs, overwrite=a.overwrite, summary=a.summary,
                           global_params=cli.n4_params(a, "global-"), gains=cli.gain_params(a))


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_section.py")


if __name__ == "__main__":
    sys.exit(main())
