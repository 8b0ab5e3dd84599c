#!/usr/bin/env python3
"""N4_GLOBAL: section gains and global N4 over the re-assembled stack; writes the solution the apply tasks read."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, global_stage, pipeline  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_global.py", description=__doc__)
    p.add_argument("input", type=Path, help="input volume (.ome.zarr or .zarr)")
    p.add_argument("mask", type=Path, help="tissue mask from octn4_mask_finish.py")
    p.add_argument("sections", type=Path, help="assembled record from octn4_assemble.py")
    p.add_argument("out", type=Path, help="the solution to write (.json: gains, global field, provenance)")
    p.add_argument("--summaries", type=Path, nargs="+",
                   help="the sections' summaries (octn4_section.py --summary): the gains and the global fit "
                        "grid then read them, not the volume")
    cli.add_voxel_size_arg(p)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes reading the global fit grid (each holds the chunk rows under one Z block)")
    cli.add_engine_args(p)
    cli.add_gain_args(p)
    cli.add_n4_args(p, "global-", title="global N4")
    cli.add_common_args(p)
    return p


def run(a) -> None:
    config = pipeline.RunConfig(global_n4=cli.n4_params(a, "global-"), gains=cli.gain_params(a),
                                threads=a.threads, workers=a.workers, overwrite=a.overwrite, engine=a.engine,
                                device=a.device, voxel_size=a.voxel_size)
    global_stage.stage_global_files(a.input, a.mask, a.sections, a.out, config=config,
                                    summaries=a.summaries)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_global.py")


if __name__ == "__main__":
    sys.exit(main())
