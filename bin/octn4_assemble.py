#!/usr/bin/env python3
"""ASSEMBLE: gather the per-section records of one brain, ordered by section index, checked complete."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli, io, section_stage  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_assemble.py", description=__doc__)
    p.add_argument("out", type=Path, help="assembled record to write (.json)")
    p.add_argument("records", type=Path, nargs="+", help="section records from octn4_section.py, any order")
    p.add_argument("--expected", type=int, default=None, help="number of sections the brain has")
    cli.add_common_args(p)
    return p


def run(a) -> None:
    if a.out.exists() and not a.overwrite:
        raise cli.InputError("output already exists; pass --overwrite to replace it", a.out)
    records = section_stage.assemble_sections(section_stage.read_records(a.records), a.expected)
    io.write_json({"sections": records}, a.out)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_assemble.py")


if __name__ == "__main__":
    sys.exit(main())
