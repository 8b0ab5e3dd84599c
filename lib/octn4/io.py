"""Volume I/O: OME-Zarr (NGFF 0.4 and 0.5) and NIfTI, streamed along Z.

Arrays are ``(Z, Y, X)`` float32 in memory; voxel sizes are ``(z, y, x)`` in
millimetres.  Readers never load more than the Z range asked for; writers
take Z slabs and write under a temporary name that is renamed to the final
one only by :meth:`commit`, so an interrupted run never leaves an output
that looks complete.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .workers import worker_pool

__all__ = [
    "Volume",
    "ForwardReader",
    "KeptPlanes",
    "keeps_level1",
    "ScanResult",
    "open_volume",
    "scan_volume",
    "create_writer",
    "OmeZarrWriter",
    "NiftiWriter",
    "PartWriter",
    "is_nifti",
    "replace_path",
    "write_json",
    "atomic_dir",
    "CHUNKS",
]

log = logging.getLogger(__name__)

#: NGFF unit names (and NIfTI xyzt codes) to millimetres.
UNIT_TO_MM = {
    "kilometer": 1e6, "meter": 1e3, "centimeter": 10.0, "millimeter": 1.0,
    "micrometer": 1e-3, "nanometer": 1e-6, "mm": 1.0, "micron": 1e-3,
}
SPATIAL_AXES = ("z", "y", "x")

#: Chunks of every output octn4 writes (Z, Y, X); level 0's shards are one chunk row of whole planes.
CHUNKS = (8, 256, 256)


def is_nifti(path) -> bool:
    name = os.fspath(path).lower().rstrip("/")
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _check_voxel_size(voxel_size, path) -> tuple[float, float, float]:
    try:
        vs = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError):
        raise InputError(f"voxel size must be three numbers (z, y, x) in mm; got {voxel_size!r}", path) from None
    if len(vs) != 3:
        raise InputError(f"voxel size must have three values (z, y, x); got {len(vs)}", path)
    if not all(np.isfinite(vs)) or any(v <= 0 for v in vs):
        raise InputError(f"voxel size must be positive and finite; got {vs} mm", path)
    return vs


# --------------------------------------------------------------------------- readers


@dataclass
class Volume:
    """A 3-D volume on disk, read in Z slabs.

    Attributes
    ----------
    path : str
    shape : (Z, Y, X) tuple of int
    dtype : numpy dtype of the stored values (reads return float32)
    voxel_size : (z, y, x) tuple of float, millimetres
    format : 'ome-zarr', 'zarr' or 'nifti'
    voxel_size_source : where the voxel size came from
    """

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float]
    format: str
    voxel_size_source: str
    _array: object = None          # zarr array (zarr formats)
    _lead: tuple = ()              # indices of leading singleton axes (t, c)
    _nifti: dict | None = None     # header facts for NIfTI streaming
    affine: np.ndarray | None = None

    @property
    def chunk_planes(self) -> int:
        """Planes per stored Z chunk (1 for NIfTI): reads aligned to it decompress each chunk once."""
        return 1 if self._array is None else int(self._array.chunks[len(self._lead)])

    def read(self, z0: int, z1: int, ys=slice(None), xs=slice(None)) -> np.ndarray:
        """Planes ``z0:z1`` (optionally strided in Y/X) as float32 ``(Z, Y, X)``."""
        return np.asarray(self._read_stored(z0, z1, ys, xs), dtype=np.float32)

    def read_tissue(self, z0: int, z1: int) -> np.ndarray:
        """A mask's planes ``z0:z1`` as bool: ``read(z0, z1) > 0``, compared in the stored type where that
        is an integer one (a uint8 mask: no float32 copy, 5 times its size, to make and compare)."""
        block = self._read_stored(z0, z1)
        if block.dtype.kind not in "biu":
            block = np.asarray(block, dtype=np.float32)
        return block > 0

    def _read_stored(self, z0: int, z1: int, ys=slice(None), xs=slice(None)) -> np.ndarray:
        z0, z1 = max(0, int(z0)), min(self.shape[0], int(z1))
        if z1 <= z0:
            return np.zeros((0,) + self.shape[1:], np.float32)[:, ys, xs]
        if self._nifti is not None:
            return self._read_nifti(z0, z1)[:, ys, xs]
        return np.asarray(self._array[self._lead + (slice(z0, z1), ys, xs)])

    def read_planes(self, zs: Sequence[int], ys=slice(None), xs=slice(None)) -> np.ndarray:
        """Planes at the Z indices ``zs`` (ascending), Y/X optionally strided (:meth:`iter_planes`)."""
        zs = [int(z) for z in zs]
        if not zs:
            return np.zeros((0,) + self.shape[1:], np.float32)[:, ys, xs]
        return np.stack(list(self.iter_planes(zs, ys, xs)))

    def iter_planes(self, zs: Sequence[int], ys=slice(None), xs=slice(None)):
        """Yield the planes at the Z indices ``zs`` (ascending) one at a time, Y/X optionally strided.

        Zarr data are read once per Z chunk: the planes that share a chunk
        come from one read of their span, so every stored chunk is
        decompressed at most once (reading plane by plane would decompress a
        16-plane chunk for each plane taken from it).  NIfTI data are read in
        one forward pass through the file: a ``.nii.gz`` cannot seek backwards
        without decompressing from its start, so plane-by-plane reads would
        cost O(Z^2).
        """
        zs = [int(z) for z in zs]
        if self._nifti is not None:
            yield from self._iter_nifti_planes(zs, ys, xs)
            return
        cz = self.chunk_planes
        i = 0
        while i < len(zs):
            j = i
            while j + 1 < len(zs) and zs[j + 1] // cz == zs[i] // cz:
                j += 1
            block = self.read(zs[i], zs[j] + 1, ys, xs)
            for z in zs[i:j + 1]:
                yield block[z - zs[i]]
            i = j + 1

    def _iter_nifti_planes(self, zs, ys, xs):
        from nibabel.openers import ImageOpener

        h = self._nifti
        nbytes = self.shape[1] * self.shape[2] * h["dtype"].itemsize
        with ImageOpener(self.path, "rb") as f:
            for z in zs:
                f.seek(h["offset"] + z * nbytes)          # forward only: zs ascend
                a = np.frombuffer(f.read(nbytes), dtype=h["dtype"]).reshape(self.shape[1:])[ys, xs]
                if h["slope"] is not None:
                    a = a.astype(np.float32) * np.float32(h["slope"]) + np.float32(h["inter"])
                yield np.asarray(a, dtype=np.float32)

    def _read_nifti(self, z0, z1):
        from nibabel.openers import ImageOpener

        h = self._nifti
        plane = self.shape[1] * self.shape[2]
        with ImageOpener(self.path, "rb") as f:
            f.seek(h["offset"] + z0 * plane * h["dtype"].itemsize)
            buf = f.read((z1 - z0) * plane * h["dtype"].itemsize)
        a = np.frombuffer(buf, dtype=h["dtype"]).reshape(z1 - z0, *self.shape[1:])
        if h["slope"] is not None:
            a = a.astype(np.float32) * np.float32(h["slope"]) + np.float32(h["inter"])
        return a


class ForwardReader:
    """Whole-plane reads of a :class:`Volume` moving forward through Z, each stored Z chunk decompressed once.

    Fit grids read Z blocks that rarely align with the stored chunks (blocks
    of 6 planes over 16-plane chunks): read directly, every chunk is
    decompressed by each block that touches it.  This keeps the chunk rows
    the last read touched and reads only the rows a read lacks, so reads
    whose starts ascend decompress every chunk once.  It holds at most the
    chunk rows under one read.  Results equal ``vol.read``/``vol.read_planes``;
    a read that moves back is served too (its rows are read again).
    ``tissue=True`` (a mask): reads give ``vol.read_tissue``'s bool planes.
    """

    def __init__(self, vol: Volume, on_read=None, *, tissue: bool = False):
        self.vol, self.shape, self.chunk_planes = vol, vol.shape, max(1, vol.chunk_planes)
        self._rows: dict[int, np.ndarray] = {}
        self.on_read = on_read          # called with (z0, planes) for every run of planes read from vol
        self.tissue = tissue

    def _read(self, z0: int, z1: int) -> np.ndarray:
        block = self.vol.read_tissue(z0, z1) if self.tissue else self.vol.read(z0, z1)
        if self.on_read is not None and z1 > z0:
            self.on_read(z0, block)
        return block

    def read(self, z0: int, z1: int) -> np.ndarray:
        cz = self.chunk_planes
        z0, z1 = max(0, int(z0)), min(self.shape[0], int(z1))
        if z1 <= z0 or cz == 1:
            return self._read(z0, z1)
        r0, r1 = z0 // cz, (z1 - 1) // cz + 1
        self._rows = {r: a for r, a in self._rows.items() if r0 <= r < r1}
        missing = [r for r in range(r0, r1) if r not in self._rows]
        if missing:                                     # the rows lacking are one run (reads ascend)
            block = self._read(missing[0] * cz, min(self.shape[0], (missing[-1] + 1) * cz))
            for r in range(missing[0], missing[-1] + 1):
                self._rows.setdefault(r, block[(r - missing[0]) * cz:(r - missing[0] + 1) * cz])
        if r1 - r0 == 1:
            a = self._rows[r0]
            return a[z0 - r0 * cz:z1 - r0 * cz]
        out = np.empty((z1 - z0,) + tuple(self.shape[1:]), bool if self.tissue else np.float32)
        for r in range(r0, r1):
            a, b = max(z0, r * cz), min(z1, (r + 1) * cz)
            out[a - z0:b - z0] = self._rows[r][a - r * cz:b - r * cz]
        return out

    def read_planes(self, zs) -> np.ndarray:
        """Planes at the Z indices ``zs`` (ascending, repeats allowed)."""
        zs = np.asarray(zs, np.int64)
        if zs.size == 0:
            return self.vol.read_tissue(0, 0) if self.tissue else self.vol.read(0, 0)
        block = self.read(int(zs[0]), int(zs[-1]) + 1)
        if zs[-1] - zs[0] + 1 == zs.size:               # a contiguous run: the block itself
            return block
        return block[zs - zs[0]]


class KeptPlanes:
    """A :class:`Volume` that keeps the whole chunk rows under planes ``[z0, z1)``, uncompressed, in the local
    ``.npy`` file ``path`` as they are first read, so a second pass over them (a section's summary after
    its fit) decompresses nothing.

    Reads return what the volume's reads return; a read of planes not all
    kept (strided, outside the rows, not read yet) goes to the volume, and
    whole-plane reads inside the rows are kept.  ``tissue=True`` (a mask):
    :meth:`read_tissue` is kept (bool, a byte a voxel) and :meth:`read`
    always goes to the volume; otherwise :meth:`read` is kept (float32) and
    :meth:`read_tissue` is ``read(...) > 0``.  Every other attribute is the
    volume's.  :meth:`remove` deletes the file (the page cache usually
    still holds it then, so it is seldom written back).
    """

    def __init__(self, vol: Volume, z0: int, z1: int, path, *, tissue: bool = False):
        self.vol, self.tissue = vol, tissue
        cz = max(1, vol.chunk_planes)
        self.z0, self.z1 = (max(0, int(z0)) // cz) * cz, min(vol.shape[0], -(-int(z1) // cz) * cz)
        self.file = Path(path)
        self._data = np.lib.format.open_memmap(self.file, mode="w+", dtype=bool if tissue else np.float32,
                                               shape=(self.z1 - self.z0,) + tuple(vol.shape[1:]))
        self._kept = np.zeros(self.z1 - self.z0, bool)

    @staticmethod
    def nbytes(vol: Volume, z0: int, z1: int, *, tissue: bool = False) -> int:
        """About what :class:`KeptPlanes` of these planes writes (its chunk rows)."""
        cz = max(1, vol.chunk_planes)
        return (z1 - z0 + 2 * cz) * vol.shape[1] * vol.shape[2] * (1 if tissue else 4)

    def __getattr__(self, name):
        return getattr(self.vol, name)

    def _hit(self, z0: int, z1: int) -> bool:
        return self.z0 <= z0 < z1 <= self.z1 and bool(self._kept[z0 - self.z0:z1 - self.z0].all())

    def _through(self, get, z0: int, z1: int) -> np.ndarray:
        """``get(z0, z1)`` of the volume, kept when the planes lie in the rows."""
        block = get(z0, z1)
        if self.z0 <= z0 < z1 <= self.z1:
            self._data[z0 - self.z0:z1 - self.z0] = block
            self._kept[z0 - self.z0:z1 - self.z0] = True
        return block

    def read(self, z0: int, z1: int, ys=slice(None), xs=slice(None)) -> np.ndarray:
        z0, z1 = max(0, int(z0)), min(self.vol.shape[0], int(z1))
        whole = ys == slice(None) and xs == slice(None)
        if self.tissue or not whole:
            return self.vol.read(z0, z1, ys, xs)
        if self._hit(z0, z1):
            return np.array(self._data[z0 - self.z0:z1 - self.z0])
        return self._through(self.vol.read, z0, z1)

    def read_tissue(self, z0: int, z1: int) -> np.ndarray:
        z0, z1 = max(0, int(z0)), min(self.vol.shape[0], int(z1))
        if not self.tissue:
            return self.read(z0, z1) > 0
        if self._hit(z0, z1):
            return np.array(self._data[z0 - self.z0:z1 - self.z0])
        return self._through(self.vol.read_tissue, z0, z1)

    def read_planes(self, zs, ys=slice(None), xs=slice(None)) -> np.ndarray:
        zs = np.asarray([int(z) for z in zs], np.int64)
        if (not self.tissue and zs.size and ys == slice(None) and xs == slice(None)
                and self.z0 <= zs[0] and zs[-1] < self.z1 and self._kept[zs - self.z0].all()):
            return np.asarray(self._data[zs - self.z0])
        return self.vol.read_planes(zs, ys, xs)

    def remove(self) -> None:
        del self._data
        self.file.unlink(missing_ok=True)


def open_volume(path, *, voxel_size=None) -> Volume:
    """Open an OME-Zarr, plain Zarr array or NIfTI volume for Z-slab reading.

    Parameters
    ----------
    path : str or path
        ``.ome.zarr`` / ``.zarr`` (NGFF multiscale group, level 0 is read, or
        a bare 3-D zarr array) or ``.nii`` / ``.nii.gz``.
    voxel_size : (z, y, x) floats in mm, optional
        Overrides the voxel size in the file's metadata; required for a bare
        zarr array, which has none.

    Raises
    ------
    InputError
        Missing or unreadable file, not 3-D, empty, missing or invalid
        voxel size.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("input does not exist", p)
    if voxel_size is not None:
        voxel_size = _check_voxel_size(voxel_size, p)
    if is_nifti(p):
        vol = _open_nifti(p, voxel_size)
    elif p.is_dir():
        vol = _open_zarr(p, voxel_size)
    else:
        raise InputError("unsupported input format: expected .ome.zarr, .zarr, .nii or .nii.gz", p)
    if any(n == 0 for n in vol.shape):
        raise InputError(f"volume is empty (shape {vol.shape})", p)
    return vol


def _squeeze_shape(shape, names, path):
    """Keep the last three axes (z, y, x); leading axes must have size 1."""
    if len(shape) < 3 or any(n != 1 for n in shape[:-3]):
        raise InputError(f"volume must be 3-D (Z, Y, X); got shape {tuple(shape)}"
                         + (f" with axes {names}" if names else ""), path)
    return tuple(int(n) for n in shape[-3:]), (0,) * (len(shape) - 3)


def _open_zarr(p: Path, voxel_size) -> Volume:
    import zarr

    try:
        node = zarr.open(store=str(p), mode="r")
    except MemoryError:
        raise
    except Exception as exc:  # zarr raises several types for non-stores
        raise InputError(f"cannot be read as Zarr ({type(exc).__name__}: {exc})", p) from None
    if isinstance(node, zarr.Array):
        shape, lead = _squeeze_shape(node.shape, None, p)
        if voxel_size is None:
            raise InputError("voxel size missing: a bare Zarr array has no coordinate metadata; "
                             "pass --voxel-size Z,Y,X (mm)", p)
        return Volume(str(p), shape, node.dtype, voxel_size, "zarr", "command line",
                      _array=node, _lead=lead)

    attrs = dict(node.attrs)
    ms = attrs.get("ome", {}).get("multiscales") if "ome" in attrs else attrs.get("multiscales")
    if not ms:
        raise InputError("Zarr group has no OME-NGFF 'multiscales' metadata", p)
    ms = ms[0]
    axes = ms.get("axes") or []
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    if names[-3:] != list(SPATIAL_AXES):
        raise InputError(f"volume must be 3-D with spatial axes (z, y, x) last; got axes {names}", p)
    ds = ms["datasets"][0]
    try:
        arr = node[ds["path"]]
    except KeyError:
        raise InputError(f"multiscale dataset {ds['path']!r} is missing", p) from None
    shape, lead = _squeeze_shape(arr.shape, names, p)
    if voxel_size is not None:
        return Volume(str(p), shape, arr.dtype, voxel_size, "ome-zarr", "command line",
                      _array=arr, _lead=lead)

    scale = np.ones(len(names))
    found = False
    for tr in list(ds.get("coordinateTransformations", [])) + list(ms.get("coordinateTransformations", [])):
        if tr.get("type") == "scale":
            scale = scale * np.asarray(tr["scale"], dtype=float)
            found = True
    if not found:
        raise InputError("voxel size missing: no 'scale' coordinate transformation; "
                         "pass --voxel-size Z,Y,X (mm)", p)
    factors = []
    missing = [a.get("name") if isinstance(a, dict) else str(a) for a in axes[-3:]
               if not isinstance(a, dict) or a.get("unit") is None]
    if missing:   # NGFF makes units optional; a µm scale read as mm would be 1000x too large
        raise InputError(f"voxel size unit missing: the OME-NGFF axes {', '.join(missing)} carry no 'unit', so "
                         f"the scale {[float(v) for v in scale[-3:]]} could be µm or mm; pass --voxel-size Z,Y,X "
                         "(mm)", p)
    for a in axes[-3:]:
        unit = a["unit"]
        if unit not in UNIT_TO_MM:
            raise InputError(f"unsupported spatial unit {unit!r} on axis {a.get('name')}", p)
        factors.append(UNIT_TO_MM[unit])
    vs = _check_voxel_size(scale[-3:] * np.asarray(factors), p)
    return Volume(str(p), shape, arr.dtype, vs, "ome-zarr", "OME-NGFF scale", _array=arr, _lead=lead)


def _raw_pixdim(p: Path, header_class) -> list[float]:
    """pixdim[1:4] as stored: nibabel's load replaces zeros with 1, which would hide a missing size."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(p), "rb") as f:
        raw = header_class.from_fileobj(f, check=False)
    return [float(v) for v in raw["pixdim"][1:4]]


def _open_nifti(p: Path, voxel_size) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        hdr = img.header
        dtype = hdr.get_data_dtype()
        shape_xyz = tuple(int(n) for n in img.shape)
        offset = int(img.dataobj.offset)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)   # nibabel moves scl_* here
    except MemoryError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise InputError(f"cannot be read as NIfTI ({type(exc).__name__}: {exc})", p) from None
    if len(shape_xyz) < 3 or any(n != 1 for n in shape_xyz[3:]):
        raise InputError(f"volume must be 3-D; got NIfTI shape {shape_xyz}", p)
    nx, ny, nz = shape_xyz[:3]
    if slope == 1 and inter == 0:
        slope = None
    info = {"dtype": dtype, "offset": offset, "slope": slope, "inter": inter}
    if voxel_size is not None:
        vs, source = voxel_size, "command line"
    else:
        zooms = _raw_pixdim(p, type(hdr))
        unit = hdr.get_xyzt_units()[0]
        if unit == "unknown":
            log.warning("%s: NIfTI spatial unit is 'unknown'; taking pixdim as millimetres", p)
            factor, source = 1.0, "NIfTI pixdim (unit unknown: millimetres assumed)"
        else:
            factor, source = UNIT_TO_MM[unit], "NIfTI pixdim"
        if any(not np.isfinite(z) or z <= 0 for z in zooms):
            raise InputError(f"voxel size missing or invalid in the NIfTI header (pixdim {zooms}); "
                             "pass --voxel-size Z,Y,X (mm)", p)
        vs = _check_voxel_size([zooms[2] * factor, zooms[1] * factor, zooms[0] * factor], p)
    return Volume(str(p), (nz, ny, nx), dtype, vs, "nifti", source, _nifti=info,
                  affine=np.asarray(img.affine))


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ScanResult:
    """Whole-volume facts gathered in one streaming pass."""

    minimum: float
    maximum: float
    n_nonfinite: int
    n_negative: int
    n_positive: int
    positive_p001: float   # 0.1th percentile of a sample of positive values
    positive_p999: float   # 99.9th percentile of the same sample
    digest: str = ""       # CRC-32 of every value as float32, with the shape: what the volume holds


def _crc32_mul(a: int, b: int) -> int:
    """``a(x) * b(x)`` modulo CRC-32's polynomial, in its bit-reflected form (bit 31 is x^0)."""
    prod, m = 0, 1 << 31
    while a:
        if a & m:
            prod ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
    return prod


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (bytes), as zlib's
    ``crc32_combine`` gives: ``crc32(A)`` times ``x^(8 len_b)``, plus ``crc32(B)``, modulo the polynomial
    (the pre- and post-inversions cancel).  Lets parts of a volume be digested in parallel."""
    power, square = 1 << 31, 1 << 23                    # x^0; x^8 (one byte)
    n = len_b
    while n:
        if n & 1:
            power = _crc32_mul(square, power)
        square = _crc32_mul(square, square)
        n >>= 1
    return _crc32_mul(crc_a, power) ^ crc_b


@dataclass
class ScanPart:
    """What one run of planes contributes to a :class:`ScanResult`."""

    crc: int = 0
    nbytes: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    nonfinite: int = 0
    negative: int = 0
    positive: int = 0
    picks: list = field(default_factory=list)    # samples of positive values, one array per slab


def _scan_slab(part: ScanPart, c0: int, pieces, per_slab: int) -> None:
    """Add the slab starting at plane ``c0``, given as consecutive runs of its planes, to ``part``."""
    pos = []
    for a in pieces:
        a = np.ascontiguousarray(a)
        part.crc = zlib.crc32(a, part.crc)
        part.nbytes += a.nbytes
        finite = np.isfinite(a)
        bad = a.size - int(finite.sum())
        if bad:
            part.nonfinite += bad
            a = a[finite]
        if a.size:
            part.minimum, part.maximum = min(part.minimum, float(a.min())), max(part.maximum, float(a.max()))
        part.negative += int((a < 0).sum())
        above = a > 0
        n = int(np.count_nonzero(above))
        pos.append(a.ravel() if n == a.size else a[above])      # all positive (the usual slab): no copy
        part.positive += n
    pos = pos[0] if len(pos) == 1 else np.concatenate(pos) if pos else np.zeros(0, np.float32)
    if pos.size:          # O(sample), not O(slab); one generator per slab, so any split of the planes agrees
        rng = np.random.default_rng([0, c0])
        part.picks.append(rng.choice(pos, size=min(per_slab, pos.size)))


def _scan_planes(vol: Volume, z0: int, z1: int, slab: int, per_slab: int) -> ScanPart:
    part = ScanPart()
    for c0 in range(z0, z1, slab):
        _scan_slab(part, c0, [vol.read(c0, min(z1, c0 + slab))], per_slab)
    return part


class RowScan:
    """:func:`scan_rows` of planes ``[z0, z1)`` taken from the planes another pass reads anyway.

    Give :meth:`feed` to a :class:`ForwardReader` (``on_read``): it sees every
    run of planes the reader decompresses, in ascending order, and scans the
    planes of its slabs as they arrive (a slab's planes are held until the
    slab is whole).  :meth:`result` reads what the pass did not reach and
    returns the :class:`ScanPart`, equal to ``scan_rows(vol, z0, z1)``.
    """

    def __init__(self, vol: Volume, z0: int, z1: int, *, slab: int = 16, sample: int = 2_000_000):
        self.vol = vol
        self.slab, self.per_slab = scan_plan(vol, slab=slab, sample=sample)
        self.start, self.end = scanned_planes(vol, z0, z1, slab=slab)
        self.part = ScanPart()
        self.next = self.start          # the first plane not yet scanned (or held)
        self.held: list[np.ndarray] = []
        self.broken = False             # a run arrived past a gap: the rest is read by result()

    def _slab_end(self, c0: int) -> int:
        return min(self.end, c0 + self.slab)

    def _slab_start(self) -> int:
        return self.next - sum(h.shape[0] for h in self.held)

    def feed(self, z0: int, planes) -> None:
        """Planes ``[z0, z0 + len(planes))`` of the volume, as just read."""
        if self.broken or self.next >= self.end:
            return
        z1 = z0 + planes.shape[0]
        if z0 > self.next:
            self.broken = True
            return
        while self.next < min(z1, self.end):
            c0 = self._slab_start()
            b = min(z1, self._slab_end(c0))
            self.held.append(planes[self.next - z0:b - z0])
            self.next = b
            if b == self._slab_end(c0):
                _scan_slab(self.part, c0, self.held, self.per_slab)
                self.held = []

    def result(self) -> ScanPart:
        if self.next < self.end:         # read the slab held in part, and any the pass did not reach
            c0 = self._slab_start()
            self.held, self.next = [], c0
            for a in range(c0, self.end, self.slab):
                _scan_slab(self.part, a, [self.vol.read(a, self._slab_end(a))], self.per_slab)
            self.next = self.end
        return self.part


def _scan_task(job) -> ScanPart:
    path, voxel_size, z0, z1, slab, per_slab = job
    return _scan_planes(open_volume(path, voxel_size=voxel_size), z0, z1, slab, per_slab)


def scan_plan(vol: Volume, *, slab: int = 16, sample: int = 2_000_000) -> tuple[int, int]:
    """``(slab, per_slab)`` of a scan of ``vol``: the slab grid (whole input chunks) and the positive
    values sampled from each slab, the same for every caller so that any split of the volume agrees."""
    z_total = vol.shape[0]
    slab = max(1, slab // vol.chunk_planes * vol.chunk_planes) if vol.chunk_planes <= slab else vol.chunk_planes
    return slab, max(1000, sample * slab // max(z_total, 1))


def scan_rows(vol: Volume, z0: int, z1: int, *, slab: int = 16, sample: int = 2_000_000) -> ScanPart:
    """The scan of the slabs (of :func:`scan_plan`'s grid) that start in planes ``[z0, z1)``: a section's
    share of :func:`scan_volume`, so the sections of a volume scanned apart and combined in Z order
    (:func:`combine_scan`) give its result exactly."""
    slab, per_slab = scan_plan(vol, slab=slab, sample=sample)
    a, b = scanned_planes(vol, z0, z1, slab=slab)
    return _scan_planes(vol, a, b, slab, per_slab) if a < b else ScanPart()


def scanned_planes(vol: Volume, z0: int, z1: int, *, slab: int = 16) -> tuple[int, int]:
    """The planes :func:`scan_rows` reads for ``[z0, z1)``: the slabs that start there, whole."""
    slab, _ = scan_plan(vol, slab=slab)
    return -(-z0 // slab) * slab, min(vol.shape[0], -(-z1 // slab) * slab)


def scan_part_dict(part: ScanPart) -> dict:
    """A :class:`ScanPart`'s counts as JSON (its samples travel apart, as an array)."""
    return {"crc": part.crc, "nbytes": part.nbytes, "nonfinite": part.nonfinite, "negative": part.negative,
            "positive": part.positive,
            "minimum": part.minimum if math.isfinite(part.minimum) else None,
            "maximum": part.maximum if math.isfinite(part.maximum) else None}


def scan_part_from(d: dict, picks) -> ScanPart:
    """The :class:`ScanPart` that :func:`scan_part_dict` wrote, with its samples ``picks``."""
    return ScanPart(int(d["crc"]), int(d["nbytes"]),
                     math.inf if d["minimum"] is None else float(d["minimum"]),
                     -math.inf if d["maximum"] is None else float(d["maximum"]),
                     int(d["nonfinite"]), int(d["negative"]), int(d["positive"]),
                     [np.asarray(picks)] if len(picks) else [])


def combine_scan(vol: Volume, parts) -> ScanResult:
    """The :class:`ScanResult` of ``vol`` from the scans of its runs of planes, given in Z order."""
    crc = zlib.crc32(repr(tuple(vol.shape)).encode())
    for part in parts:
        crc = crc32_combine(crc, part.crc, part.nbytes)
    picks = [p for part in parts for p in part.picks]
    pool = np.concatenate(picks) if picks else np.zeros(0, np.float32)
    p001, p999 = (np.percentile(pool, [0.1, 99.9]) if pool.size else (np.nan, np.nan))
    return ScanResult(min(p.minimum for p in parts), max(p.maximum for p in parts),
                      sum(p.nonfinite for p in parts), sum(p.negative for p in parts),
                      sum(p.positive for p in parts), float(p001), float(p999), f"crc32:{crc:08x}")


def scan_volume(vol: Volume, *, slab: int = 16, sample: int = 2_000_000, workers: int = 1) -> ScanResult:
    """Stream the volume once and gather the facts :func:`validate_scan` needs.

    With ``workers > 1`` (Zarr input) runs of slabs are scanned in a process
    pool and combined (the digest with :func:`crc32_combine`): the same
    result as one process.
    """
    z_total = vol.shape[0]
    slab, per_slab = scan_plan(vol, slab=slab, sample=sample)
    starts = list(range(0, z_total, slab))
    workers = max(1, min(workers, len(starts))) if vol.format != "nifti" else 1
    if workers == 1:
        parts = [_scan_planes(vol, 0, z_total, slab, per_slab)]
    else:
        runs = np.array_split(np.asarray(starts), min(len(starts), 4 * workers))
        jobs = [(vol.path, vol.voxel_size, int(r[0]), min(z_total, int(r[-1]) + slab), slab, per_slab)
                for r in runs if r.size]
        with worker_pool(workers, f"a process scanning the input was killed (most often out of memory: "
                                  f"{workers} workers each held {slab} planes); use fewer --workers or more "
                                  "memory") as pool:
            parts = list(pool.map(_scan_task, jobs))
    return combine_scan(vol, parts)


#: Linear OCT intensity spans decades (speckle alone spans >10x between its
#: 0.1th and 99.9th percentiles); dB-scaled data span a small ratio.
LOG_SCALE_MAX_RATIO = 4.0


def validate_scan(scan: ScanResult, path, *, check_log_scale: bool = True) -> None:
    """Raise :class:`InputError` for intensities N4 cannot work with."""
    if scan.n_nonfinite:
        raise InputError(f"volume contains {scan.n_nonfinite} NaN/Inf values; "
                         "replace them (e.g. with 0 outside the tissue) before correction", path)
    if scan.n_negative:
        raise InputError(f"volume contains {scan.n_negative} negative intensities (min {scan.minimum:.4g}): "
                         "octn4 needs linear, non-negative OCT intensity. If the data are log-scaled (dB), "
                         "convert them with 10**(v/10) first", path)
    if scan.n_positive == 0:
        raise InputError("volume is empty: no positive intensity", path)
    if scan.maximum == scan.minimum:
        raise InputError(f"volume is constant ({scan.minimum:.4g}): there is nothing to correct", path)
    ratio = scan.positive_p999 / scan.positive_p001
    if check_log_scale and ratio < LOG_SCALE_MAX_RATIO:
        raise InputError(
            f"intensities look log-scaled (dB): the 0.1-99.9 percentile range of positive values spans only "
            f"x{ratio:.2f}, where linear OCT intensity spans decades. Convert with 10**(v/10) first, or pass "
            "--skip-log-scale-check if the data really are linear", path)


# --------------------------------------------------------------------------- writers


def replace_path(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an existing ``final`` last."""
    trash = None
    if final.exists() or final.is_symlink():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        if trash.is_dir():
            shutil.rmtree(trash)
        else:
            trash.unlink()


def write_json(obj, path) -> None:
    """Write JSON under a temporary name, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


@contextmanager
def atomic_dir(outdir, *, overwrite: bool):
    """Yield a temporary folder that becomes ``outdir`` only if the block succeeds."""
    outdir = Path(outdir)
    if outdir.exists() and not overwrite:
        raise InputError("output directory already exists; pass --overwrite to replace it", outdir)
    tmp = outdir.with_name(f".{outdir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        replace_path(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_output(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise InputError("output already exists; pass --overwrite to replace it", final)


class _Writer:
    """Common part: temporary name, commit by rename, abort on error."""

    def __init__(self, path, overwrite):
        self.path = Path(path)
        _check_output(self.path, overwrite)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._remove(self.tmp)
        self.committed = False

    @staticmethod
    def _remove(p: Path):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def abort(self):
        self._remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.committed:
            self.abort()
        return False


def _pyramid_factors(shape, voxel_size, min_size=64, max_levels=6):
    """Per-level downsampling factors (relative to the previous level).

    Y and X halve at each level; Z halves only while its voxel is not
    larger than the lateral one, so the pyramid tends towards isotropy.
    """
    factors, shape, vs = [], list(shape), list(voxel_size)
    while len(factors) < max_levels - 1 and max(shape[1], shape[2]) >= 2 * min_size:
        fz = 2 if (vs[0] * 2 <= max(vs[1], vs[2]) * 2 and vs[0] <= vs[1] and shape[0] >= 2) else 1
        f = (fz, 2, 2)
        factors.append(f)
        shape = [s // k for s, k in zip(shape, f)]
        vs = [v * k for v, k in zip(vs, f)]
    return factors


def _downsample(block, f, reduce):
    """``block`` reduced by ``f`` (per axis) with ``reduce`` ('max', or 'mean': the float64 mean of each group).

    The mean adds the group's members into one float64 array, member by
    member (strided views instead of a 6-d reduction, which is slower:
    the finishing step of a 4 GiB run went 85 -> 42 s, README), with the
    result of ``mean(axis=(1, 3, 5), dtype=float64)``: a float64 sum of at
    most 8 float32 values is exact unless they span more than 2^26 in
    magnitude.
    """
    z, y, x = (s // k * k for s, k in zip(block.shape, f))
    if reduce == "max":
        return _max_downsample(block[:z, :y, :x], f)
    b = block[:z, :y, :x].reshape(z // f[0], f[0], y // f[1], f[1], x // f[2], f[2])
    acc = None
    for dz in range(f[0]):
        for dy in range(f[1]):
            for dx in range(f[2]):
                m = b[:, dz, :, dy, :, dx]
                acc = m.astype(np.float64) if acc is None else np.add(acc, m, out=acc)
    return (acc / math.prod(f)).astype(block.dtype)


def _max_downsample(block, f):
    """``block`` (whole groups only) reduced by its groups' maxima, one axis at a time: the maximum of
    strided views (X, then Y, then Z), the same values as the 6-d ``max(axis=(1, 3, 5))`` (a maximum is
    exact in any order) at about 20x its speed on a 16 x 2048^2 uint8 mask block."""
    out = block
    for axis in (2, 1, 0):
        k = f[axis]
        if k == 1:
            continue
        views = [out[(slice(None),) * axis + (slice(d, None, k),)] for d in range(k)]
        acc = views[0].copy()
        for v in views[1:]:
            np.maximum(acc, v, out=acc)
        out = acc
    return out if out is not block else block.copy()


def output_compressors(dtype):
    """The codec of an output array, chosen by ``benchmarks/codecs.py`` on octn4's own data.

    Float data (corrected intensities, bias fields): Blosc LZ4 with byte
    shuffle, level 5; on a 64 x 1024^2 stack it stored speckled intensities
    at 1.18x and a smooth bias at 1.90x (zarr's default zstd: 1.13x and
    1.23x), writing 1035 and 789 MB/s (default: 646, 325) and reading
    2374 and 2123 MB/s (1091, 1258).  Masks (uint8): zarr's default zstd,
    227x, where shuffling only loses (LZ4 with shuffle: 55x).
    """
    from zarr.codecs import BloscCodec

    if np.dtype(dtype).kind == "f":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    return "auto"


class _Level:
    """One coarser pyramid level being filled from the level above as its planes arrive in Z order.

    ``take`` reduces every whole group of ``factor[0]`` planes it has (the
    rest waits for the next block), queues the reduced planes and writes
    them a whole chunk row at a time (a whole shard: no read-modify-write);
    it returns the reduced planes for the next level.  Planes past the
    level's depth (the remainder of a depth that ``factor[0]`` does not
    divide) are dropped, as a rebuild drops them.
    """

    def __init__(self, array, factor, start: int = 0):
        self.array, self.factor = array, factor
        self.pending = None                         # planes of the level above not yet reduced
        self.queued = []                            # reduced planes not yet written
        self.written = start                        # the level's plane where the next write starts

    def put(self, planes):
        """Queue planes of this level itself (already reduced), written a whole chunk row at a time."""
        if planes.shape[0]:
            self.queued.append(planes)
            self._write(whole_rows=True)

    def take(self, block, reduce):
        buf = block if self.pending is None or not self.pending.shape[0] else \
            np.concatenate([self.pending, block])
        k = buf.shape[0] // self.factor[0] * self.factor[0]
        self.pending = buf[k:].copy() if k < buf.shape[0] else None
        room = self.array.shape[0] - self.written - sum(q.shape[0] for q in self.queued)
        # reduce a chunk row's worth of groups at a time: the float64 means stay a few planes deep
        step = self.factor[0] * self.array.chunks[0]
        reduced = [_downsample(buf[z:min(z + step, k)], self.factor, reduce) for z in range(0, k, step)]
        if not reduced:
            return buf[:0]                          # not a whole group yet: nothing for the levels below
        reduced = np.concatenate(reduced)[:max(0, room)]
        if reduced.shape[0]:
            self.queued.append(reduced)
            self._write(whole_rows=True)
        return reduced

    def flush(self):
        self._write(whole_rows=False)

    def _write(self, whole_rows: bool):
        if not self.queued:
            return
        rows = np.concatenate(self.queued)
        cz = self.array.chunks[0]
        n = rows.shape[0] // cz * cz if whole_rows else rows.shape[0]
        if n:
            self.array[self.written:self.written + n] = rows[:n]
            self.written += n
        self.queued = [rows[n:]] if n < rows.shape[0] else []


_hard_link = os.link


def _create_level(group, name, shape, chunks, dtype, sharded: bool):
    """One level's array in ``group``: ``chunks`` (clipped to the shape), one shard per chunk row of whole
    planes when ``sharded``, the codec of :func:`output_compressors`."""
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
    shards = (chunks[0],) + tuple(-(-n // c) * c for n, c in zip(shape[1:], chunks[1:])) if sharded else None
    return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                              compressors=output_compressors(dtype), fill_value=0,
                              dimension_names=list(SPATIAL_AXES))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``; copy it where the filesystem cannot (another device, object storage)."""
    try:
        _hard_link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def part_files(part, planes_per_file: int) -> list[tuple[Path, Path]]:
    """The level-0 files of a :class:`PartWriter` store, as ``(path, path relative to s0)``, checked to lie
    in the chunk rows the part owns (``planes_per_file`` planes each)."""
    root = Path(part).resolve()
    try:
        owned = json.loads((root / "zarr.json").read_text())["attributes"]["octn4_part"]["planes"]
        json.loads((root / "s0" / "zarr.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not an octn4 output part ({exc})", part) from None
    out = []
    for dirpath, _, names in os.walk(root / "s0" / "c"):
        for name in names:
            src = Path(dirpath) / name
            rel = src.relative_to(root / "s0")
            z = int(rel.parts[1]) * planes_per_file
            if not owned[0] <= z < owned[1]:
                raise InputError(f"holds chunk row {rel.parts[1]} (planes {z}..{z + planes_per_file}) outside "
                                 f"the planes {owned[0]}..{owned[1]} it owns", part)
            out.append((src, rel))
    return sorted(out)


def keeps_level1(shape, voxel_size, chunks=CHUNKS) -> bool:
    """Whether an output of this shape has a first pyramid level that its parts can keep (:class:`PartWriter`):
    the condition for storing it from level 1 down."""
    factors = _pyramid_factors(tuple(shape), _check_voxel_size(voxel_size, "output"))
    return bool(factors) and min(chunks[0], shape[0]) % factors[0][0] == 0


class PartWriter(_Writer):
    """The part of an output that one apply task writes: level 0 of the chunk rows it owns, and the first
    pyramid level of those planes.

    The store holds the output's level-0 array (``s0``) with the output's
    exact layout (:func:`_create_level`: shape, chunks, shards, codecs),
    but only the chunk rows of planes ``owned = (z0, z1)`` are written
    (``z0`` on a chunk row's edge; ``z1`` too, or the volume's end).  A
    finishing step takes the shard files into the output with
    :meth:`OmeZarrWriter.adopt`, by hard link: no voxel is read or written
    twice, and since no two parts own one shard, parts may be written at
    the same time by any number of processes or nodes, in any order.

    Given ``voxel_size`` (and ``reduce``), the planes written are also
    reduced into the output's first pyramid level (:func:`_pyramid_factors`,
    :func:`_downsample`) while they are in memory, and kept in ``s1``: the
    level-1 planes of the owned planes (a Z group never straddles two
    parts, since parts own whole 16-plane rows and Z factors are 1 or 2).
    ``s1`` is the part's own array, unsharded; the finishing step reads it
    (:meth:`OmeZarrWriter.take_level1`) instead of re-reading level 0, a
    quarter or an eighth of the voxels.  Planes must be written in Z order
    for ``s1``.  ``level0=False``: ``s1`` only (the ``s0`` array is created
    for its layout but holds no chunk), for an output stored from level 1
    down (``OmeZarrWriter(level0=False)``).
    """

    def __init__(self, path, shape, *, owned, dtype=np.float32, chunks=None, overwrite=False, shards: bool = True,
                 voxel_size=None, reduce: str = "mean", level0: bool = True):
        import zarr

        super().__init__(path, overwrite)
        self.shape = tuple(int(n) for n in shape)
        self.chunks = tuple(min(c, n) for c, n in zip(chunks or (16, 256, 256), self.shape))
        z0, z1 = (int(v) for v in owned)
        if z0 % self.chunks[0] or (z1 % self.chunks[0] and z1 != self.shape[0]) or not 0 <= z0 <= z1 <= self.shape[0]:
            raise ValueError(f"a part must own whole chunk rows of {self.chunks[0]} planes; got {z0}..{z1}")
        self.owned = (z0, z1)
        group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        self._s0 = _create_level(group, "s0", self.shape, self.chunks, np.dtype(dtype), bool(shards))
        self._group = group
        self.reduce = reduce
        self._level1, self._next = None, z0
        factors = _pyramid_factors(self.shape, _check_voxel_size(voxel_size, path)) if voxel_size else []
        if factors and self.chunks[0] % factors[0][0] == 0:
            f = factors[0]
            l1 = _create_level(group, "s1", tuple(n // k for n, k in zip(self.shape, f)), self.chunks,
                               np.dtype(dtype), False)
            self._level1 = _Level(l1, f, start=z0 // f[0])
        self.level0 = bool(level0)
        if not self.level0 and self._level1 is None:
            raise ValueError("a part that stores no level 0 keeps its first pyramid level, and this shape has none")

    def write(self, z0: int, block: np.ndarray) -> None:
        z1 = z0 + block.shape[0]
        if not self.owned[0] <= z0 <= z1 <= self.owned[1]:
            raise ValueError(f"planes {z0}..{z1} are outside this part's {self.owned[0]}..{self.owned[1]}")
        block = np.asarray(block, dtype=self._s0.dtype)
        if self.level0:
            self._s0[z0:z1] = block
        if self._level1 is not None:
            if z0 != self._next:
                raise ValueError(f"a part keeping its pyramid level takes planes in Z order: expected z0="
                                 f"{self._next}, got {z0}")
            self._next = z1
            self._level1.take(block, self.reduce)

    def commit(self) -> None:
        meta = {"planes": list(self.owned), "level0": self.level0}
        if self._level1 is not None:
            if self._next != self.owned[1]:
                raise ValueError(f"part incomplete: planes {self.owned[0]}..{self._next} of "
                                 f"{self.owned[0]}..{self.owned[1]} written")
            self._level1.flush()
            f = self._level1.factor
            meta["level1"] = {"factor": list(f), "planes": [self.owned[0] // f[0], self._level1.written]}
        self._group.attrs.update({"octn4_part": meta})
        replace_path(self.tmp, self.path)
        self.committed = True


class OmeZarrWriter(_Writer):
    """Write a multiscale OME-Zarr (NGFF 0.5) image slab by slab.

    Level 0 is written with :meth:`write`.  While the blocks arrive in Z
    order from plane 0 (as every octn4 stage writes them), each is reduced
    at once into the coarser levels from the planes in memory, which are
    written a whole chunk row at a time; otherwise :meth:`commit` builds
    the pyramid from level 0 as stored, level by level (streamed).  Both
    give the same voxels.  :meth:`commit` then writes the NGFF metadata with exact
    per-level scales (base voxel size times the integer factor) and the
    half-voxel translations of block averaging, adds ``attrs`` under the
    ``octn4`` key, and renames the store into place.

    ``reduce`` is 'mean' for intensities and 'max' for masks.
    ``level0=False``: the store begins at pyramid level 1 (its datasets
    ``s1``, ``s2``, ... with their own scales; no ``s0``), filled from the
    parts' level 1 (:meth:`take_level1`) or from level-0 blocks written in Z
    order, which are reduced and not kept: the bias, which ``fields.json``
    holds exactly (:mod:`octn4.bias`).

    Every level is stored in Zarr v3 shards of one chunk row of Z by whole
    planes (``shards=True``): a level of ``Z`` planes is ``Z / chunk_z``
    files whatever the plane size, instead of one file per chunk (a 1 TB
    float32 volume of 2048^2 planes: about 7,600 files per level instead of
    490,000).  A write that covers whole shards (octn4's apply writes
    chunk-aligned tiles) encodes each once; a partial one costs a
    read-modify-write of its shards but stays correct.  Codecs:
    :func:`output_compressors`.
    """

    def __init__(self, path, shape, voxel_size, *, dtype=np.float32, chunks=None, attrs=None,
                 overwrite=False, reduce="mean", name=None, shards: bool = True, level0: bool = True):
        import zarr

        super().__init__(path, overwrite)
        self.shape = tuple(int(n) for n in shape)
        self.voxel_size = _check_voxel_size(voxel_size, path)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(min(c, n) for c, n in zip(chunks or (16, 256, 256), self.shape))
        self.attrs = attrs or {}
        self.reduce = reduce
        self.name = name or self.path.name.split(".")[0]
        self.sharded = bool(shards)
        self._group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        self._s0 = self._create("s0", self.shape)
        self._factors = _pyramid_factors(self.shape, self.voxel_size)
        self._levels, shape = [], self.shape
        for level, f in enumerate(self._factors, start=1):
            shape = tuple(n // k for n, k in zip(shape, f))
            self._levels.append(_Level(self._create(f"s{level}", shape), f))
        self._next_z = 0            # where the next in-order block starts; None once a block came out of order
        self._level1_next = None    # where the next part's level-1 planes start (take_level1)
        self.level0 = bool(level0)
        if not self.level0 and not self._levels:
            raise ValueError(f"an output stored from level 1 down needs a pyramid level 1; {self.shape} has none")

    def _create(self, name, shape):
        return _create_level(self._group, name, shape, self.chunks, self.dtype, self.sharded)

    def adopt(self, part) -> int:
        """Take a :class:`PartWriter`'s level-0 shards into this output, by hard link (a copy where the
        filesystem cannot link).  Returns the number of files taken.

        The part's array must have this output's layout exactly (shape,
        chunks, shards, codecs), and its files must lie in the chunk rows it
        owns and that no other part gave: a violation is an error, never a
        silent overwrite.  After any adoption :meth:`commit` builds the
        pyramid from level 0 as stored.
        """
        if not self.level0:
            return 0                    # stored from level 1 down: take_level1 takes what there is
        root = Path(part).resolve()
        files = part_files(part, self._s0.chunks[0] if self._s0.shards is None else self._s0.shards[0])
        theirs, ours = (json.loads((r / "s0" / "zarr.json").read_text()) for r in (root, self.tmp))
        if theirs != ours:
            raise InputError("this part's array layout (shape, chunks, codecs) differs from the output's", part)
        for src, rel in files:
            dst = self.tmp / "s0" / rel
            if dst.exists():
                raise InputError(f"chunk row {rel.parts[1]} was written by two parts", part)
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dst)
        taken = len(files)
        self._next_z = None
        return taken

    def take_level1(self, part) -> bool:
        """Append a part's level-1 planes (:class:`PartWriter`'s ``s1``) to this output's level 1 and reduce
        them into the coarser levels from memory.  Parts must come in Z order, each one's level-1 planes
        starting where the previous one's ended; once level 1 is complete, :meth:`commit` builds no level
        from level 0.  Returns False (and changes nothing) when the part kept no level 1 for this
        output's first level, so the caller falls back to :meth:`commit`'s rebuild.
        """
        import zarr

        if not self._levels:
            return False
        try:
            level1 = json.loads((Path(part) / "zarr.json").read_text())["attributes"]["octn4_part"].get("level1")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"not an octn4 output part ({exc})", part) from None
        first = self._levels[0]
        if not level1 or tuple(level1["factor"]) != tuple(first.factor):
            return False
        a, b = level1["planes"]
        expected = self._level1_next or 0
        if a != expected:
            raise InputError(f"level-1 planes {a}..{b} do not follow the previous part's (next: {expected})", part)
        src = zarr.open_array(str(Path(part) / "s1"), mode="r")
        if tuple(src.shape) != tuple(first.array.shape):
            raise InputError(f"level-1 shape {tuple(src.shape)} differs from the output's {first.array.shape}", part)
        step = max(1, first.array.chunks[0])
        for z in range(a, b, step):
            block = np.asarray(src[z:min(b, z + step)])
            first.put(block)
            for level in self._levels[1:]:
                block = level.take(block, self.reduce)
                if block.shape[0] == 0:
                    break
        self._level1_next = b
        return True

    def write(self, z0: int, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=self.dtype)
        if self.level0:
            self._s0[z0:z0 + block.shape[0]] = block
        elif self._next_z != z0:
            raise ValueError(f"an output stored from level 1 down takes its planes in Z order: expected z0="
                             f"{self._next_z}, got {z0}")
        if self._next_z == z0:
            self._next_z += block.shape[0]
            for level in self._levels:              # reduce into every coarser level from memory
                block = level.take(block, self.reduce)
                if block.shape[0] == 0:
                    break
        else:
            self._next_z = None

    def commit(self) -> None:
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_multiscales_metadata

        datasets = [self._dataset("s0", (1, 1, 1))] if self.level0 else []
        streamed = self._next_z == self.shape[0] or (
            bool(self._levels) and self._level1_next == self._levels[0].array.shape[0])
        if not self.level0:
            if not streamed:
                raise ValueError("an output stored from level 1 down is incomplete: its level 1 came neither "
                                 "from every part nor from every plane in Z order")
            shutil.rmtree(self.tmp / "s0")
        prev, cum = self._s0, np.ones(3, int)
        for level_no, level in enumerate(self._levels, start=1):
            f, cur = level.factor, level.array
            if streamed:
                level.flush()
            else:                                   # blocks came out of order: rebuild from the level below
                step = f[0] * max(1, self.chunks[0])
                for z0 in range(0, cur.shape[0] * f[0], step):
                    block = np.asarray(prev[z0:min(z0 + step, cur.shape[0] * f[0])])
                    cur[z0 // f[0]:z0 // f[0] + block.shape[0] // f[0]] = _downsample(block, f, self.reduce)
            cum = cum * np.asarray(f)
            datasets.append(self._dataset(f"s{level_no}", cum))
            prev = cur
        write_multiscales_metadata(
            self._group, datasets=datasets, fmt=FormatV05(), axes=list(SPATIAL_AXES),
            axes_units=dict.fromkeys(SPATIAL_AXES, "millimeter"), name=self.name)
        self._group.attrs.update({"octn4": self.attrs})
        replace_path(self.tmp, self.path)
        self.committed = True

    def _dataset(self, path, factors):
        scale = [float(v * k) for v, k in zip(self.voxel_size, factors)]
        shift = [float((k - 1) / 2 * v) for v, k in zip(self.voxel_size, factors)]
        ct = [{"type": "scale", "scale": scale}]
        if any(shift):
            ct.append({"type": "translation", "translation": shift})
        return {"path": path, "coordinateTransformations": ct}


class NiftiWriter(_Writer):
    """Write a NIfTI-1 volume slab by slab, in increasing Z order.

    The ``(Z, Y, X)`` C-order slabs are exactly NIfTI's on-disk order of an
    ``(X, Y, Z)`` image, so the file is streamed without holding the volume.
    Provenance goes to a JSON sidecar (``name.json``) written on commit.
    """

    def __init__(self, path, shape, voxel_size, *, dtype=np.float32, attrs=None, overwrite=False,
                 affine=None):
        import nibabel as nib

        super().__init__(path, overwrite)
        self.shape = tuple(int(n) for n in shape)
        self.voxel_size = _check_voxel_size(voxel_size, path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.attrs = attrs or {}
        name = self.path.name
        self.sidecar = self.path.with_name(name[: -len(".nii.gz")] if name.endswith(".nii.gz")
                                           else name[: -len(".nii")]).with_suffix(".json")
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(self.shape[::-1])
        hdr.set_data_dtype(self.dtype)
        hdr.set_zooms(self.voxel_size[::-1])
        hdr.set_xyzt_units("mm")
        aff = np.diag(list(self.voxel_size[::-1]) + [1.0]) if affine is None else np.asarray(affine)
        hdr.set_qform(aff, code=1)
        hdr.set_sform(aff, code=1)
        hdr["vox_offset"] = 352
        opener = gzip.open(self.tmp, "wb", compresslevel=4) if name.endswith(".gz") else open(self.tmp, "wb")
        self._f = opener
        self._f.write(hdr.binaryblock + b"\x00" * 4)
        self._next = 0

    def write(self, z0: int, block: np.ndarray) -> None:
        if z0 != self._next:
            raise ValueError(f"NIfTI slabs must be written in order: expected z0={self._next}, got {z0}")
        self._f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self._next += block.shape[0]

    def commit(self) -> None:
        if self._next != self.shape[0]:
            raise ValueError(f"NIfTI incomplete: {self._next} of {self.shape[0]} planes written")
        self._f.close()
        tmp_json = self.sidecar.with_name(f".{self.sidecar.name}.partial-{os.getpid()}")
        tmp_json.write_text(json.dumps({"octn4": self.attrs}, indent=2, default=str))
        replace_path(tmp_json, self.sidecar)
        replace_path(self.tmp, self.path)
        self.committed = True

    def abort(self):
        if not self._f.closed:
            self._f.close()
        super().abort()


def create_writer(path, shape, voxel_size, **kwargs):
    """An :class:`OmeZarrWriter` or, for ``.nii``/``.nii.gz`` paths, a :class:`NiftiWriter`."""
    if is_nifti(path):
        kwargs.pop("chunks", None)
        kwargs.pop("reduce", None)
        return NiftiWriter(path, shape, voxel_size, **kwargs)
    kwargs.pop("affine", None)
    return OmeZarrWriter(path, shape, voxel_size, **kwargs)


def take_parts(writer, parts) -> int:
    """Take the :class:`PartWriter` stores ``parts`` (``(store, (z0, z1))``, in Z order, together the whole
    volume) into ``writer``: an :class:`OmeZarrWriter` adopts their shards by link and builds its pyramid
    from their level 1 (or, where a part kept none, from level 0 at commit); a :class:`NiftiWriter` gets
    their planes streamed in Z order.  Returns the number of files linked or copied (0 for NIfTI)."""
    import zarr

    taken = 0
    if not isinstance(writer, OmeZarrWriter):
        for store, (z0, z1) in parts:
            arr = zarr.open_array(str(Path(store) / "s0"), mode="r")
            step = max(1, arr.chunks[0])
            for a in range(z0, z1, step):
                writer.write(a, arr[a:min(z1, a + step)])
        return taken
    for store, _ in parts:
        taken += writer.adopt(store)
    for store, _ in parts:
        if not writer.take_level1(store):
            break                       # a part without it: commit rebuilds the pyramid from level 0
    return taken


def read_attrs(path) -> dict:
    """The ``octn4`` provenance stored with an output (zarr attrs or NIfTI sidecar; {} when there is none)."""
    p = Path(path)
    if is_nifti(p):
        name = p.name
        side = p.with_name(name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")])
        return json.loads(side.with_suffix(".json").read_text()).get("octn4", {})
    import zarr

    node = zarr.open(str(p), mode="r")            # an OME-Zarr group, or a bare array (an ingested copy)
    return dict(node.attrs).get("octn4", {})


def open_mask(path, vol: Volume) -> Volume:
    m = open_volume(path, voxel_size=vol.voxel_size)
    if m.shape != vol.shape:
        raise InputError(f"mask shape {m.shape} does not match the volume shape {vol.shape}", path)
    return m

