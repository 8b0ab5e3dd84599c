"""A fitted N4 bias field, kept as its B-spline control lattice.

N4 fits a tensor-product B-spline of order ``p`` to the log bias on a
shrunk copy of the volume (N4_ALGORITHM.md §2, §6).  octn4 keeps the
result as the control lattice ``coeffs`` plus, per axis, the affine map from
a full-resolution voxel index ``i`` to the spline's parametric coordinate
``t = scale * i + offset``.  Evaluating it on any Z range of the full grid is
three small per-axis contractions (§7), so the full-resolution field is
produced tile by tile and never has to exist whole.

Two maps are offered (§8):

``centred``
    the geometry of the shrunk grid: shrunk voxel ``j`` is full-resolution
    voxel ``o + s*j`` (ITK's centred shrink offset ``o``), so
    ``t = S * (i - o) / (s * (M - 1))``.  Full-resolution voxels just outside
    the shrunk grid's extent get the end spans' polynomials continued.
    This is octn4's default.
``stretched``
    SimpleITK's ``GetLogBiasFieldAsImage(full)``: ``t = S * i / (N - 1)``,
    laying the shrunk fit end to end over the full grid (a 1-2 % stretch).
    Kept for parity with SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._backend import array_namespace, from_numpy, to_numpy
from .errors import InputError

__all__ = ["AxisMap", "BSplineField", "basis_matrix", "axis_map", "shrink_grid"]


def shrink_grid(n: int, s: int) -> tuple[int, int]:
    """ITK ``ShrinkImageFilter`` sampling along one axis: ``(offset o, size M)``.

    The shrunk image has ``M = n // s`` voxels taken at full indices
    ``o + s*j``, with ``o`` the round-half-up of ``(n-1)/2 - s*(M-1)/2``
    (N4_ALGORITHM.md §8).
    """
    m = n // s
    if m < 1:
        raise InputError(f"shrink factor {s} is larger than the axis ({n} voxels)")
    o = int(np.floor((n - 1) / 2 - s * (m - 1) / 2 + 0.5))
    return o, m


@dataclass(frozen=True)
class AxisMap:
    """``t = scale * i + offset`` for full-resolution index ``i``; ``spans = m - p``.

    ``eps`` is ITK's end clamp (``t`` within ``eps`` of ``spans`` becomes
    ``spans - eps``): ``1e-3 * spans / (n - 1)`` for the grid that was fitted.
    """

    scale: float
    offset: float
    spans: int
    eps: float = 0.0

    def t(self, index) -> np.ndarray:
        return self.scale * np.asarray(index, dtype=np.float64) + self.offset


def axis_map(n_full: int, spans: int, *, shrink: int = 1, mode: str = "centred") -> AxisMap:
    """The index-to-parameter map of an axis of ``n_full`` voxels fitted at ``shrink``."""
    o, m = shrink_grid(n_full, shrink)
    if m < 2:
        raise InputError(f"an axis of {n_full} voxels shrunk by {shrink} leaves {m} voxel; N4 needs at least 2")
    if mode == "centred":
        scale = spans / (shrink * (m - 1.0))
        return AxisMap(scale, -o * scale, spans, 1e-3 * spans / (m - 1.0))
    if mode == "stretched":
        return AxisMap(spans / (n_full - 1.0), 0.0, spans, 1e-3 * spans / (n_full - 1.0))
    raise ValueError(f"mode must be 'centred' or 'stretched'; got {mode!r}")


def _weights(tau, order):
    """Cardinal B-spline weights of the ``order + 1`` control points of a span."""
    if order == 3:
        return [(1 - tau) ** 3 / 6, (3 * tau ** 3 - 6 * tau ** 2 + 4) / 6,
                (-3 * tau ** 3 + 3 * tau ** 2 + 3 * tau + 1) / 6, tau ** 3 / 6]
    if order == 2:
        return [(1 - tau) ** 2 / 2, 0.75 - (tau - 0.5) ** 2, tau ** 2 / 2]
    if order == 1:
        return [1 - tau, tau]
    raise ValueError(f"spline order must be 1, 2 or 3; got {order}")


def basis_matrix(t, n_ctrl: int, order: int, eps: float = 0.0) -> np.ndarray:
    """Dense ``(len(t), n_ctrl)`` B-spline basis at parametric positions ``t``.

    ``B[i, j] = beta_p(t_i - j + (p - 1)/2)`` for ``j - floor(t_i)`` in
    ``0..p`` (N4_ALGORITHM.md §2), with ITK's end clamp ``t = S - eps``.
    Positions outside ``[0, S]`` use the end spans' polynomials continued.
    """
    t = np.asarray(t, dtype=np.float64)
    spans = n_ctrl - order
    if spans < 1:
        raise ValueError(f"{n_ctrl} control points are too few for order {order}")
    t = np.where(np.abs(t - spans) <= eps, spans - eps, t)
    first = np.clip(np.floor(t), 0, spans - 1).astype(np.int64)
    tau = t - first
    b = np.zeros((t.shape[0], n_ctrl))
    rows = np.arange(t.shape[0])
    for k, w in enumerate(_weights(tau, order)):
        b[rows, first + k] = w
    return b


def _evaluate(xp, phi, bz, by, bx, prof):
    """``phi`` contracted with the basis rows ``bz``, ``by``, ``bx`` (float32 result) plus a depth profile."""
    a = xp.tensordot(bz, phi, axes=([1], [0]))             # (nz, my, mx)
    a = xp.tensordot(by, a, axes=([1], [1]))               # (ny, nz, mx)
    a = xp.astype(xp.permute_dims(a, (1, 0, 2)), xp.float32)
    out = xp.matmul(a, xp.astype(xp.permute_dims(bx, (1, 0)), xp.float32))   # (nz, ny, nx)
    if prof is not None:
        out = out + prof[:, None, None]
    return out


@dataclass
class BSplineField:
    """A log bias field: B-spline control lattice + full-resolution geometry.

    Attributes
    ----------
    coeffs : (mz, my, mx) float64 ndarray
    order : int
    shape : (Z, Y, X) full-resolution grid the maps refer to
    maps : three :class:`AxisMap` (z, y, x)
    z_profile : (Z,) float64 ndarray or None
        A log depth profile added to every plane (one value per
        full-resolution plane): the depth model the fit divided out first
        (:mod:`octn4.depth`).  ``None``: none.
    """

    coeffs: np.ndarray
    order: int
    shape: tuple[int, int, int]
    maps: tuple[AxisMap, AxisMap, AxisMap]
    z_profile: np.ndarray | None = None

    def basis(self, axis: int, index) -> np.ndarray:
        m = self.coeffs.shape[axis]
        return basis_matrix(self.maps[axis].t(index), m, self.order, self.maps[axis].eps)

    def evaluate(self, z=None, y=None, x=None, *, like=None):
        """The log field at the outer product of index arrays ``z, y, x``.

        ``None`` means the whole axis.  The indices may be host or device
        arrays (they are read on the host, where the small basis matrices
        are built).  The result is float32, on the device of ``like`` when
        given (NumPy otherwise).  Cost is about ``len(z)*len(y)*len(x)*mx``
        multiply-adds; intermediates are small.
        """
        idx = [np.arange(n) if a is None else np.asarray(to_numpy(a)) for a, n in zip((z, y, x), self.shape)]
        xp = np if like is None else array_namespace(like)
        put = np.asarray if like is None else (lambda a: from_numpy(a, like=like))
        bz, by, bx = (put(self.basis(d, idx[d])) for d in range(3))
        prof = None if self.z_profile is None else put(np.asarray(self.z_profile, np.float32)[idx[0]])
        return _evaluate(xp, put(self.coeffs), bz, by, bx, prof)

    def tiles(self, tile_planes: int, *, like=None):
        """``(z0, z1, log field of planes z0..z1)`` over the whole grid, ``tile_planes`` planes at a time.

        Every basis matrix (all planes' Z rows, the Y and X matrices), the
        lattice and the depth profile go to ``like``'s device once; each
        tile is then three contractions there, with no host round trip.
        """
        xp = np if like is None else array_namespace(like)
        put = np.asarray if like is None else (lambda a: from_numpy(a, like=like))
        bz, by, bx = (put(self.basis(d, np.arange(n))) for d, n in enumerate(self.shape))
        phi = put(self.coeffs)
        prof = None if self.z_profile is None else put(np.asarray(self.z_profile, np.float32))
        for z0 in range(0, self.shape[0], tile_planes):
            z1 = min(self.shape[0], z0 + tile_planes)
            yield z0, z1, _evaluate(xp, phi, bz[z0:z1, :], by, bx, None if prof is None else prof[z0:z1])

    def plus_depth_line(self, slope: float, intercept: float = 0.0) -> BSplineField:
        """This field plus ``slope * z + intercept`` (``z`` the full-resolution plane index), exactly.

        B-splines reproduce straight lines: with basis ``j`` centred at
        ``t = j - (p - 1)/2``, coefficients ``c_j = a (j - (p - 1)/2) + b`` give
        ``a t + b`` on every span.  The line, written in the Z axis's
        parameter ``t = scale * z + offset``, goes on every (y, x) column of
        the lattice (each column's Y/X weights sum to one).
        """
        zmap = self.maps[0]
        a = slope / zmap.scale
        b = intercept - a * zmap.offset
        c = a * (np.arange(self.coeffs.shape[0]) - (self.order - 1) / 2) + b
        return BSplineField(self.coeffs + c[:, None, None], self.order, self.shape, self.maps, self.z_profile)

    def with_z_profile(self, profile) -> BSplineField:
        """This lattice with ``profile`` (one log value per full-resolution plane) as its depth profile."""
        profile = None if profile is None else np.asarray(profile, np.float64)
        if profile is not None and profile.shape != (self.shape[0],):
            raise ValueError(f"a depth profile needs {self.shape[0]} values; got {profile.shape}")
        return BSplineField(self.coeffs, self.order, self.shape, self.maps, profile)

    def to_dict(self) -> dict:
        return {
            "order": self.order,
            "shape": list(self.shape),
            "maps": [{"scale": m.scale, "offset": m.offset, "spans": m.spans, "eps": m.eps} for m in self.maps],
            "coeffs": np.asarray(self.coeffs, dtype=np.float64).tolist(),
            "z_profile": None if self.z_profile is None else np.asarray(self.z_profile, np.float64).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BSplineField:
        maps = tuple(AxisMap(float(m["scale"]), float(m["offset"]), int(m["spans"]), float(m["eps"]))
                     for m in d["maps"])
        prof = d.get("z_profile")
        return cls(np.asarray(d["coeffs"], dtype=np.float64), int(d["order"]),
                   tuple(int(n) for n in d["shape"]), maps, None if prof is None else np.asarray(prof, np.float64))
