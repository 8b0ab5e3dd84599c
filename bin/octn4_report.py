#!/usr/bin/env python3
"""REPORT: the QC report of one brain (HTML with embedded pictures, PNGs, numbers, MultiQC table)."""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "lib"))  # checkout fallback; installed wins

from octn4 import cli  # noqa: E402
from octn4.report import build_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octn4_report.py", description=__doc__)
    cli.add_report_args(p)
    cli.add_common_args(p)
    return p


def run(a) -> None:
    build_report(a.results, a.out, name=a.name, max_px=a.max_px, overwrite=a.overwrite, mask=a.mask)


def main(argv=None) -> int:
    return cli.guarded(run, build_parser().parse_args(argv), "octn4_report.py")


if __name__ == "__main__":
    sys.exit(main())
