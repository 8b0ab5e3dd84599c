"""The bias field from the fitted lattices: evaluated anywhere, at full resolution, without a stored volume.

A run stores every lattice it fitted in ``fields.json`` (each section's
field and log gain, the global field).  The bias at a voxel is

    ``exp(section_field(z, y, x) + section_gain + global_field(z, y, x))``

evaluated in float64 and rounded to float32 once, the arithmetic the apply
uses (:func:`bias_planes`), so a plane evaluated here equals the plane the
apply divided by, bit for bit.  That is why an OME-Zarr run stores its
``bias`` output from pyramid level 1 down (a quarter of the voxels, or an
eighth), unless ``--full-bias`` asks for level 0: :class:`BiasModel`
(``octn4.bias.BiasModel.from_run(results)``) and ``octn4 bias RESULTS OUT``
give the full-resolution bias exactly, a tile at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bspline import BSplineField
from .errors import InputError

__all__ = ["BiasModel", "bias_planes", "read_bias", "section_fields", "section_log_field", "write_bias"]


def section_fields(records) -> list[tuple[int, int, BSplineField, float]]:
    """``(z0, z1, field, log gain)`` per section; the gain is 0 until harmonised."""
    return [(int(r["z_start"]), int(r["z_stop"]), BSplineField.from_dict(r["field"]), float(r.get("gain_log", 0.0)))
            for r in records]


def section_log_field(fields, z, ys=None, xs=None) -> np.ndarray:
    """Per-section log bias (field + log gain) at planes ``z`` (ascending) and Y/X index arrays."""
    z = np.asarray(z)
    parts = []
    for z0, z1, fld, gain in fields:
        sel = z[(z >= z0) & (z < z1)]
        if sel.size:
            parts.append(fld.evaluate(sel - z0, ys, xs) + np.float32(gain))
    return np.concatenate(parts, axis=0)


def bias_planes(fields, global_field: BSplineField, z, ys=None, xs=None) -> np.ndarray:
    """The bias (float32) at planes ``z`` (ascending indices) and Y/X index arrays (default: whole planes):
    what the apply divides by.  ``fields``: :func:`section_fields`."""
    log_b = section_log_field(fields, z, ys, xs)
    log_b += global_field.evaluate(np.asarray(z), ys, xs)
    return np.exp(log_b)


class BiasModel:
    """The bias of a run (or of a global solution), from its lattices: :meth:`read` and :meth:`at`."""

    def __init__(self, records, global_field: dict, shape=None, source=None):
        self.fields = section_fields(records)
        self.global_field = BSplineField.from_dict(global_field)
        self.shape = tuple(int(n) for n in (shape or self.global_field.shape))
        self.source = source
        covered = sorted((z0, z1) for z0, z1, _, _ in self.fields)
        if not covered or covered[0][0] != 0 or covered[-1][1] != self.shape[0] or \
                any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise InputError(f"the section fields do not tile the volume's {self.shape[0]} planes ({covered})",
                             source)

    @classmethod
    def from_run(cls, results) -> BiasModel:
        """The model of an octn4 results folder (its ``fields.json``), or of a ``fields.json`` file."""
        p = Path(results)
        path = p / "fields.json" if p.is_dir() else p
        try:
            f = json.loads(path.read_text())
            return cls(f["sections"], f["global"], source=path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not an octn4 fields.json ({type(exc).__name__}: {exc})", path) from None

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Whole planes ``z0:z1`` of the bias (float32 ``(Z, Y, X)``), what the apply divided by."""
        z0, z1 = max(0, int(z0)), min(self.shape[0], int(z1))
        if z1 <= z0:
            return np.zeros((0,) + self.shape[1:], np.float32)
        return bias_planes(self.fields, self.global_field, np.arange(z0, z1))

    def at(self, z, ys=None, xs=None) -> np.ndarray:
        """The bias at planes ``z`` (ascending) and the Y/X index arrays ``ys``, ``xs`` (default: all)."""
        return bias_planes(self.fields, self.global_field, np.asarray(z), ys, xs)


def read_bias(results, z0: int = 0, z1: int | None = None) -> np.ndarray:
    """Planes ``z0:z1`` (default: all) of a run's full-resolution bias, from its ``fields.json``."""
    model = BiasModel.from_run(results)
    return model.read(z0, model.shape[0] if z1 is None else z1)


def write_bias(model: BiasModel, out_path, voxel_size, *, affine=None, tile_planes: int = 16, attrs=None,
               overwrite: bool = False) -> Path:
    """The full-resolution bias of ``model`` written to ``out_path`` (OME-Zarr with its pyramid, or NIfTI),
    ``tile_planes`` planes at a time (created complete, or not at all)."""
    from .io import CHUNKS, create_writer
    from .progress import progress

    out_path = Path(out_path)
    tiles = list(range(0, model.shape[0], max(1, int(tile_planes))))
    with create_writer(out_path, model.shape, voxel_size, chunks=CHUNKS, attrs=attrs or {}, overwrite=overwrite,
                       affine=affine) as w, progress(len(tiles), "bias at full resolution") as advance:
        for z0 in tiles:
            w.write(z0, model.read(z0, z0 + tile_planes))
            advance()
        w.commit()
    return out_path
