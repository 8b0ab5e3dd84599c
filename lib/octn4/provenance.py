"""What made an output: octn4's version, the stage, the input, the parameters, the engine and device, the libraries.

Every stage stores :func:`provenance` with what it writes (the mask's and
the outputs' attributes, each section record, the solution, ``fields.json``
and ``metrics.json``).
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone

from . import __version__
from .io import Volume

__all__ = ["library_versions", "provenance"]


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "scikit-image", "SimpleITK", "zarr", "ome-zarr", "nibabel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def provenance(stage: str, vol: Volume, parameters: dict, *, engine=None, device=None, extra=None) -> dict:
    """What made an output: octn4 version, stage, input, parameters, engine, device, libraries."""
    d = {
        "octn4_version": __version__,
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "input": os.path.abspath(vol.path),
        "input_format": vol.format,
        "shape": list(vol.shape),
        "voxel_size_mm": list(vol.voxel_size),
        "voxel_size_source": vol.voxel_size_source,
        "engine": engine,
        "device": device,
        "parameters": parameters,
        "versions": library_versions(),
    }
    if extra:
        d.update(extra)
    return d

