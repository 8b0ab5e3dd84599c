"""N4 bias-field correction: parameters, the SimpleITK backend, and the reference API.

N4 (Tustison et al. 2010, IEEE TMI 29(6); after Sled et al. 1998) models
``v = u * b`` with a smooth multiplicative field ``b`` and estimates
``log b`` by alternating histogram sharpening and B-spline fitting.  The
numerical reference is ITK's ``N4BiasFieldCorrectionImageFilter``, described
in ``docs/N4_ALGORITHM.md`` of the octn4 design notes.

How octn4 uses SimpleITK: the fit runs on a shrunk copy (on ITK's centred
sampling grid, :func:`octn4.bspline.shrink_grid`; the sampled voxels or
tissue block means, :mod:`octn4.shrink`), then the final control
lattice is recovered from SimpleITK by evaluating its log field on a tiny
``(2m+1)^3`` grid and solving the per-axis collocation systems (exact to
~1e-7).  The result is a :class:`~octn4.bspline.BSplineField` that is
evaluated at full resolution tile by tile: the full-resolution field comes
from the fitted B-spline itself, never from resampling a shrunk field, and
never needs the whole volume in memory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ._backend import DEVICES, array_namespace, cuda_namespace, from_numpy, is_cupy_array, to_numpy
from .bspline import BSplineField, axis_map, basis_matrix, shrink_grid
from .depth import DEPTH_MODELS, DEPTH_PRIOR
from .errors import InputError
from .mask import MaskParams, depth_trend, tissue_mask
from .sections import section_bounds
from .shrink import SHRINK_MODES, shrink_volume

log = logging.getLogger("octn4")

__all__ = [
    "N4Params",
    "FitResult",
    "control_points",
    "fit_schedule",
    "depth_line",
    "shrink_factors",
    "fit_bias",
    "fit_bias_sitk",
    "fit_bias_batch",
    "resolve_device",
    "choose_device",
    "correct",
    "compute_tissue_mask",
    "n4_correct",
    "n4_correct_per_section",
    "apply_bias_field",
]

#: Control-point rules (see :func:`fit_schedule`).
CONTROL_POINT_RULES = ("reference", "fit-grid")

#: Smallest bias value divided by (as in the reference ``vol / max(bias, 1e-6)``).
BIAS_FLOOR = 1e-6


@dataclass(frozen=True)
class N4Params:
    """N4 settings, with ITK's names and defaults (N4_ALGORITHM.md §1).

    Attributes
    ----------
    maximum_number_of_iterations : tuple of int
        Iterations per fitting level; the number of levels is its length.
    convergence_threshold : float
        A level stops when the CV of ``exp(f_old - f_new)`` over the mask is
        at or below this.
    spline_order : int
        B-spline order (1, 2 or 3).
    spline_distance_mm : float
        Reference control-point rule at level 0:
        ``m = max(order + 1, round(extent_mm / spline_distance_mm))`` per
        axis, ``extent_mm = n * voxel``.  Ignored when
        ``number_of_control_points`` is given.
    number_of_control_points : (z, y, x) ints, optional
        Control points at level 0; each level refines ``m <- 2m - order``.
    number_of_histogram_bins, bias_field_full_width_at_half_maximum, wiener_filter_noise
        Histogram sharpening (ITK defaults 200, 0.15, 0.01).
    shrink_factor : int or (z, y, x) ints or None
        Subsampling of the fit grid (ITK's centred ``ShrinkImageFilter``).
        ``None`` chooses per-axis factors so the fit grid holds at most
        ``fit_voxels`` voxels with near-isotropic physical spacing.
        Factors are capped so every axis keeps at least 2 voxels.
    fit_voxels : int
        Target size of the fit grid when ``shrink_factor`` is None.
    evaluation : 'centred' or 'stretched'
        Full-resolution geometry of the fitted spline (see
        :mod:`octn4.bspline`); 'stretched' reproduces SimpleITK's
        ``GetLogBiasFieldAsImage(full)``.
    parity : bool
        octn4 engine only: reproduce two SimpleITK quirks that the default
        fixes, quirk Q1 of the histogram's minimum scan and the top-bin
        rounding rule (see :mod:`octn4.engine`).
    shrink_mode : 'subsample' or 'mean'
        What a fit voxel holds (:mod:`octn4.shrink`): the voxel at its
        sample point (ITK, the reference) or the mean of the tissue voxels of
        its block.
    control_point_rule : 'reference' or 'fit-grid'
        'reference' fits every level asked for on the grid the shrink factor
        gives.  'fit-grid' keeps the lattice within the data, so a thin
        section is not fitted with more Z control points than it has fit
        planes: an axis's shrink factor is lowered until the fit grid has at
        least ``fit_voxels_per_control_point`` times as many voxels along it
        as the final lattice has control points (:func:`shrink_factors`), and
        where even shrink 1 leaves fewer voxels than control points, levels
        are dropped (:func:`fit_schedule`).
    fit_voxels_per_control_point : int
        With the 'fit-grid' rule, how many fit voxels per final control point
        an axis keeps where it has them (1: the lattice may interpolate its
        data; more: it is a least-squares fit along that axis too).
    fit_voxels_per_span : int
        0 (the reference): the shrink factor alone sizes the fit grid.  Else
        each axis's shrink factor is raised until the fit grid has at most
        this many voxels per span of the final lattice along it, so the fit
        grid is sized by the lattice and a fit's cost no longer grows with
        the plane size (:func:`shrink_factors`).
    depth_line : bool
        Start from the section's depth attenuation: a robust straight line
        through the fit planes' median log tissue intensity against Z
        (Beer-Lambert attenuation is a straight line in log) is divided out
        before N4 and added to the fitted field (:func:`depth_line`).  For
        per-section fits, where N4's slow, small updates otherwise leave part
        of a strong attenuation that the section gains then chain into a
        ramp across the stack.
    depth_model : 'none' or 'curve'
        Per-section fits only: 'curve' divides each section's depth profile
        out before N4 (one stack-wide curve in depth below the cut plus a
        per-section deviation shrunk towards it, fitted to the per-plane
        statistics the mask stage records; :mod:`octn4.depth`) and stores
        it with the field.
    depth_spans, depth_prior : int, float
        The curve's B-spline spans over the thickest section (0: one per 4
        planes of the thinnest, 1 to 6) and the ridge weight of each
        deviation coefficient, in full planes.
    """

    maximum_number_of_iterations: tuple[int, ...] = (50, 50, 50, 50)
    convergence_threshold: float = 1e-3
    spline_order: int = 3
    spline_distance_mm: float = 10.0
    number_of_control_points: tuple[int, int, int] | None = None
    number_of_histogram_bins: int = 200
    bias_field_full_width_at_half_maximum: float = 0.15
    wiener_filter_noise: float = 0.01
    shrink_factor: int | tuple[int, int, int] | None = 4
    fit_voxels: int = 1_500_000
    evaluation: str = "centred"
    parity: bool = False
    shrink_mode: str = "subsample"
    control_point_rule: str = "reference"
    fit_voxels_per_control_point: int = 1
    fit_voxels_per_span: int = 0
    depth_line: bool = False
    depth_model: str = "none"
    depth_spans: int = 0
    depth_prior: float = DEPTH_PRIOR

    def __post_init__(self):
        if self.depth_model not in DEPTH_MODELS:
            raise InputError(f"depth model must be one of {DEPTH_MODELS}; got {self.depth_model!r}")
        if self.depth_spans < 0 or not self.depth_prior > 0:
            raise InputError(f"depth spans must be >= 0 and depth prior > 0; got {self.depth_spans}, "
                             f"{self.depth_prior}")
        its = tuple(int(i) for i in self.maximum_number_of_iterations)
        if not its or any(i < 1 for i in its):
            raise InputError(f"maximum_number_of_iterations must be positive integers; got {its}")
        object.__setattr__(self, "maximum_number_of_iterations", its)
        if self.spline_order not in (1, 2, 3):
            raise InputError(f"spline_order must be 1, 2 or 3; got {self.spline_order}")
        if not self.convergence_threshold >= 0:
            raise InputError(f"convergence_threshold must be >= 0; got {self.convergence_threshold}")
        if not self.spline_distance_mm > 0:
            raise InputError(f"spline_distance_mm must be > 0; got {self.spline_distance_mm}")
        if self.number_of_control_points is not None:
            m = tuple(int(v) for v in self.number_of_control_points)
            if len(m) != 3 or any(v < self.spline_order + 1 for v in m):
                raise InputError(f"number_of_control_points must be 3 values >= order + 1; got {m}")
            object.__setattr__(self, "number_of_control_points", m)
        s = self.shrink_factor
        if s is not None:
            s = (int(s),) * 3 if np.isscalar(s) else tuple(int(v) for v in s)
            if len(s) != 3 or any(v < 1 for v in s):
                raise InputError(f"shrink_factor must be a positive integer or three of them; got {self.shrink_factor}")
            object.__setattr__(self, "shrink_factor", s)
        if self.fit_voxels < 64:
            raise InputError(f"fit_voxels must be >= 64; got {self.fit_voxels}")
        if self.evaluation not in ("centred", "stretched"):
            raise InputError(f"evaluation must be 'centred' or 'stretched'; got {self.evaluation!r}")
        if self.shrink_mode not in SHRINK_MODES:
            raise InputError(f"shrink_mode must be one of {SHRINK_MODES}; got {self.shrink_mode!r}")
        if self.control_point_rule not in CONTROL_POINT_RULES:
            raise InputError(f"control_point_rule must be one of {CONTROL_POINT_RULES}; "
                             f"got {self.control_point_rule!r}")
        if int(self.fit_voxels_per_control_point) < 1:
            raise InputError(f"fit_voxels_per_control_point must be >= 1; got {self.fit_voxels_per_control_point}")
        object.__setattr__(self, "fit_voxels_per_control_point", int(self.fit_voxels_per_control_point))
        if int(self.fit_voxels_per_span) < 0 or 0 < int(self.fit_voxels_per_span) < 2:
            raise InputError(f"fit_voxels_per_span must be 0 (off) or >= 2; got {self.fit_voxels_per_span}")
        object.__setattr__(self, "fit_voxels_per_span", int(self.fit_voxels_per_span))

    @property
    def levels(self) -> int:
        return len(self.maximum_number_of_iterations)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def control_points(shape, voxel_size, params: N4Params) -> tuple[int, int, int]:
    """Level-0 control points per axis (z, y, x) by the reference rule."""
    if params.number_of_control_points is not None:
        return params.number_of_control_points
    p = params.spline_order
    return tuple(max(p + 1, int(round(n * v / params.spline_distance_mm))) for n, v in zip(shape, voxel_size))


def final_control_points(m0, params: N4Params) -> tuple[int, int, int]:
    """Lattice size after the last level: ``2^(L-1) (m0 - p) + p``."""
    p = params.spline_order
    return tuple((2 ** (params.levels - 1)) * (m - p) + p for m in m0)


def fit_schedule(m0, fit_shape, params: N4Params) -> N4Params:
    """The parameters a fit really runs with: the levels cut by the control-point rule.

    With ``control_point_rule='fit-grid'``, levels are dropped from the end
    of the schedule while any axis would end with more control points than
    fit voxels (at least one level is kept); otherwise ``params`` unchanged.
    """
    if params.control_point_rule != "fit-grid":
        return params
    its = params.maximum_number_of_iterations
    p = params.spline_order
    levels = len(its)
    while levels > 1 and any((2 ** (levels - 1)) * (m - p) + p > n for m, n in zip(m0, fit_shape)):
        levels -= 1
    if levels < len(its):
        log.info("control points: %d of %d levels fit a %s grid (level-0 lattice %s)",
                 levels, len(its), tuple(fit_shape), tuple(m0))
        return replace(params, maximum_number_of_iterations=its[:levels])
    return params


#: Fit-mask voxels a fit plane needs to count in the depth line.
DEPTH_LINE_MIN_VOXELS = 50


def depth_line(shrunk, include, z_full) -> float | None:
    """Slope (log per full-resolution plane) of the depth line of a fit grid, or None.

    ``z_full``: the full-resolution plane of each fit plane.  The line is a
    Huber-weighted fit through each plane's median log intensity over its
    fit voxels (planes with at least ``DEPTH_LINE_MIN_VOXELS``); fewer than 3
    such planes give no line.
    """
    med, zs = [], []
    for j in range(shrunk.shape[0]):
        v = shrunk[j][include[j]]
        if v.size >= DEPTH_LINE_MIN_VOXELS:
            med.append(float(np.median(np.log(v))))
            zs.append(float(z_full[j]))
    if len(zs) < 3:
        return None
    return depth_trend(zs, med)[0]


def _flatten_depth(shrunk, include, shrink, full_shape, params: N4Params):
    """``(shrunk / exp(line), slope)`` when ``params.depth_line`` finds a line, else ``(shrunk, None)``."""
    if not params.depth_line:
        return shrunk, None
    oz, mz = shrink_grid(full_shape[0], shrink[0])
    z_full = oz + shrink[0] * np.arange(mz)
    slope = depth_line(shrunk, include, z_full)
    if slope is None:
        return shrunk, None
    line = slope * (z_full - _z_centre(full_shape, shrink))
    return (shrunk / np.exp(line)[:, None, None]).astype(np.float32), slope


def _add_depth_line(fit: FitResult, slope, z_centre: float, voxel_dz: float) -> FitResult:
    if slope is not None and fit.status == "fitted":
        fit.field = fit.field.plus_depth_line(slope, -slope * z_centre)
        fit.depth_slope_per_mm = float(slope / voxel_dz)
    return fit


def shrink_factors(shape, voxel_size, params: N4Params) -> tuple[int, int, int]:
    """Per-axis shrink factors for a volume of ``shape``.

    With ``fit_voxels_per_span``, each axis's factor is first raised until
    the axis keeps at most that many fit voxels per span of the final
    lattice.  Capped so each axis keeps 2 fit voxels ('reference' rule) or
    ``fit_voxels_per_control_point`` times as many as the final lattice has
    control points ('fit-grid' rule), where the axis has that many voxels.
    """
    if any(n < 2 for n in shape):
        raise InputError(f"N4 needs at least 2 voxels along every axis; got shape {tuple(shape)}")
    if params.shrink_factor is not None:
        s = list(params.shrink_factor)
    else:
        extent = [n * v for n, v in zip(shape, voxel_size)]
        h = (math.prod(extent) / params.fit_voxels) ** (1 / 3)
        s = [max(1, round(h / v)) for v in voxel_size]
        while math.prod(n // k for n, k in zip(shape, s)) > params.fit_voxels:
            # coarsen the axis whose shrunk voxel is physically smallest
            d = min((i for i in range(3) if shape[i] // s[i] > 2), key=lambda i: s[i] * voxel_size[i])
            s[d] += 1
    final = final_control_points(control_points(shape, voxel_size, params), params)
    if params.fit_voxels_per_span:
        spans = [c - params.spline_order for c in final]
        s = [max(k, -(-n // (params.fit_voxels_per_span * m))) for k, n, m in zip(s, shape, spans)]
    if params.control_point_rule == "fit-grid":
        # each axis keeps K fit voxels per final control point (when it has them)
        keep = [c * params.fit_voxels_per_control_point for c in final]
    else:
        keep = (2, 2, 2)
    return tuple(max(1, min(k, n // min(n, c))) for k, n, c in zip(s, shape, keep))


@dataclass
class FitResult:
    """A fitted field and how it was obtained."""

    field: BSplineField
    shrink: tuple[int, int, int]
    fit_shape: tuple[int, int, int]
    control_points: tuple[int, int, int]        # level 0
    fit_voxels: int                             # voxels inside the fit mask
    iterations: list[int] = field(default_factory=list)      # per level
    convergence: list[float] = field(default_factory=list)   # last CV per level
    converged: bool = True
    status: str = "fitted"                      # or 'no tissue'
    seconds: float = 0.0
    engine: str = "sitk"
    device: str = "cpu"
    batch_size: int = 1                         # members fitted together (octn4 engine)
    depth_slope_per_mm: float | None = None     # the depth line divided out before N4 (log per mm)
    depth_profile_range: float | None = None    # the depth model's profile divided out before N4 (log, max - min)

    def summary(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "field"}
        d["final_control_points"] = list(self.field.coeffs.shape)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _too_little_tissue(n_in: int, m0) -> bool:
    """Fewer fit voxels than 100 or than level-0 control points: nothing to fit (flagged 'no tissue')."""
    return n_in < max(100, int(np.prod(m0)))


def zero_field(shape, shrink, m, params: N4Params) -> BSplineField:
    """A zero log field with the lattice geometry of a fit (used when there is nothing to fit)."""
    maps = tuple(axis_map(n, mm - params.spline_order, shrink=s, mode=params.evaluation)
                 for n, mm, s in zip(shape, m, shrink))
    return BSplineField(np.zeros(m), params.spline_order, tuple(shape), maps)


def fit_bias_sitk(shrunk, shrunk_mask, *, full_shape, shrink, voxel_size, params: N4Params,
                  threads: int = 1) -> FitResult:
    """Fit N4 with SimpleITK on an already shrunk image.

    Parameters
    ----------
    shrunk : (Mz, My, Mx) float32 ndarray
        The volume sampled at ``o + s*j`` on every axis (:func:`shrink_grid`).
    shrunk_mask : (Mz, My, Mx) bool ndarray
        Voxels to fit; non-positive intensities are excluded (N4 takes logs).
    full_shape, shrink, voxel_size
        The full-resolution grid the field will be evaluated on.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    m0 = control_points(full_shape, voxel_size, params)
    params = fit_schedule(m0, np.shape(shrunk), params)
    include = np.asarray(shrunk_mask, bool) & (shrunk > 0)
    n_in = int(include.sum())
    result = dict(shrink=tuple(shrink), fit_shape=tuple(shrunk.shape), control_points=m0, fit_voxels=n_in)
    if _too_little_tissue(n_in, m0):
        return FitResult(zero_field(full_shape, shrink, final_control_points(m0, params), params),
                         status="no tissue", converged=False, **result)
    spacing = [v * s for v, s in zip(voxel_size, shrink)][::-1]
    img = sitk.GetImageFromArray(np.ascontiguousarray(shrunk, dtype=np.float32))
    img.SetSpacing(spacing)
    msk = sitk.GetImageFromArray(include.astype(np.uint8))
    msk.CopyInformation(img)

    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(params.maximum_number_of_iterations))
    f.SetConvergenceThreshold(params.convergence_threshold)
    f.SetSplineOrder(params.spline_order)
    f.SetNumberOfControlPoints([int(v) for v in m0[::-1]])
    f.SetNumberOfHistogramBins(params.number_of_histogram_bins)
    f.SetBiasFieldFullWidthAtHalfMaximum(params.bias_field_full_width_at_half_maximum)
    f.SetWienerFilterNoise(params.wiener_filter_noise)
    f.SetNumberOfThreads(int(threads))
    trace: dict[int, tuple[int, float]] = {}
    f.AddCommand(sitk.sitkIterationEvent, lambda: trace.__setitem__(
        f.GetCurrentLevel(), (f.GetElapsedIterations(), f.GetCurrentConvergenceMeasurement())))
    f.Execute(img, msk)

    m_final = final_control_points(m0, params)
    coeffs = _recover_lattice(f, m_final, params.spline_order)
    maps = tuple(axis_map(n, m - params.spline_order, shrink=s, mode=params.evaluation)
                 for n, m, s in zip(full_shape, m_final, shrink))
    fld = BSplineField(coeffs, params.spline_order, tuple(full_shape), maps)
    _check_recovery(f, fld, shrunk.shape, params.spline_order)
    iters = [trace.get(level, (0, math.nan))[0] for level in range(params.levels)]
    conv = [float(trace.get(level, (0, math.nan))[1]) for level in range(params.levels)]
    converged = all(c <= params.convergence_threshold or i < cap
                    for i, c, cap in zip(iters, conv, params.maximum_number_of_iterations))
    return FitResult(fld, iterations=iters, convergence=conv, converged=converged,
                     seconds=time.perf_counter() - t0, **result)


ENGINES = ("sitk", "octn4")


def resolve_device(device: str, engine: str) -> str:
    """The device a fit runs on: 'cpu' or 'cuda' (:func:`choose_device` without the reason)."""
    return choose_device(device, engine)[0]


def choose_device(device: str, engine: str) -> tuple[str, str | None]:
    """The device a fit runs on, 'cpu' or 'cuda', and why, when it was chosen automatically.

    'cuda' is an error (naming what is missing) unless the octn4 engine has
    CuPy and a CUDA device; 'auto' becomes 'cuda' when it would work and
    'cpu' otherwise (for schedulers that may or may not grant a GPU).  An
    automatic choice is logged as a warning and returned as its reason (None
    for a device asked for by name), for the outputs to record.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}; got {engine!r}")
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "auto":
        if engine != "octn4":
            why = f"device auto: fitting on the CPU (the {engine} engine runs on the CPU only)"
        else:
            try:
                cuda_namespace()
            except InputError as exc:
                why = f"device auto: fitting on the CPU ({exc.problem})"
            else:
                why = "device auto: fitting on the GPU (CuPy found a CUDA device)"
                log.warning("%s", why)
                return "cuda", why
        log.warning("%s", why)
        return "cpu", why
    if engine == "sitk" and device != "cpu":
        raise InputError(f"the SimpleITK engine runs on the CPU only; device {device!r} needs --engine octn4")
    if device == "cuda":
        cuda_namespace()
    return device, None


def fit_bias(shrunk, shrunk_mask, *, full_shape, shrink, voxel_size, params: N4Params, threads: int = 1,
             engine: str = "octn4", device: str = "cpu") -> FitResult:
    """Fit N4 on a shrunk image with the chosen engine ('octn4' or 'sitk') and device; same result type."""
    if engine != "octn4":
        resolve_device(device, engine)          # an unknown engine, or a GPU asked of SimpleITK, is an error
        shrunk = np.asarray(shrunk, np.float32)
        include = np.asarray(shrunk_mask, bool) & (shrunk > 0)
        flat, slope = _flatten_depth(shrunk, include, shrink, full_shape, params)
        fit = fit_bias_sitk(flat, shrunk_mask, full_shape=full_shape, shrink=shrink, voxel_size=voxel_size,
                            params=params, threads=threads)
        return _add_depth_line(fit, slope, _z_centre(full_shape, shrink), voxel_size[0])
    return fit_bias_batch([shrunk], [shrunk_mask], full_shape=full_shape, shrink=shrink, voxel_size=voxel_size,
                          params=params, device=device)[0]


def fit_bias_batch(shrunk, shrunk_masks, *, full_shape, shrink, voxel_size, params: N4Params,
                   device: str = "cpu") -> list[FitResult]:
    """Fit N4 with octn4's engine on several equal-shaped shrunk images at once (one batched loop).

    All members share ``full_shape``, ``shrink`` and ``params`` (the
    sections of one stack with equal plane counts).  Members with too
    little tissue get the flagged zero field, as in :func:`fit_bias_sitk`.
    On ``device='cuda'`` the fit grids are copied to the GPU (CuPy) and only
    the lattices come back.
    """
    from .engine import fit_lattice_batch

    device = resolve_device(device, "octn4")
    xp = cuda_namespace() if device == "cuda" else None
    t0 = time.perf_counter()
    m0 = control_points(full_shape, voxel_size, params)
    images = [np.asarray(a, np.float32) for a in shrunk]
    if images:
        params = fit_schedule(m0, images[0].shape, params)
    m_final = final_control_points(m0, params)
    include = [np.asarray(k, bool) & (a > 0) for a, k in zip(images, shrunk_masks)]
    flattened = [_flatten_depth(a, inc, shrink, full_shape, params) for a, inc in zip(images, include)]
    images = [f[0] for f in flattened]
    if len({a.shape for a in images}) > 1:
        raise ValueError(f"a batch needs equal shapes; got {sorted({a.shape for a in images})}")
    common = dict(shrink=tuple(shrink), control_points=m0, engine="octn4", device=device)
    out: list[FitResult | None] = [None] * len(images)
    todo = []
    for j, (a, inc) in enumerate(zip(images, include)):
        n_in = int(inc.sum())
        if _too_little_tissue(n_in, m0):
            out[j] = FitResult(zero_field(full_shape, shrink, m_final, params), fit_shape=a.shape,
                               fit_voxels=n_in, status="no tissue", converged=False, **common)
        else:
            todo.append(j)
    if todo:
        batch_img, batch_mask = np.stack([images[j] for j in todo]), np.stack([include[j] for j in todo])
        if xp is not None:
            batch_img, batch_mask = xp.asarray(batch_img), xp.asarray(batch_mask)
        fits = fit_lattice_batch(batch_img, batch_mask, m0=m0, levels_iterations=params.maximum_number_of_iterations,
                                 threshold=params.convergence_threshold, order=params.spline_order,
                                 bins=params.number_of_histogram_bins,
                                 fwhm=params.bias_field_full_width_at_half_maximum, noise=params.wiener_filter_noise,
                                 parity=params.parity)
        seconds = (time.perf_counter() - t0) / len(todo)
        maps = tuple(axis_map(n, m - params.spline_order, shrink=s, mode=params.evaluation)
                     for n, m, s in zip(full_shape, m_final, shrink))
        for j, fit in zip(todo, fits):
            converged = all(c <= params.convergence_threshold or i < cap for i, c, cap in
                            zip(fit.iterations, fit.convergence, params.maximum_number_of_iterations))
            out[j] = FitResult(BSplineField(fit.coeffs, params.spline_order, tuple(full_shape), maps),
                               fit_shape=images[j].shape, fit_voxels=int(include[j].sum()),
                               iterations=fit.iterations, convergence=fit.convergence, converged=converged,
                               seconds=seconds, batch_size=len(todo), **common)
    z_centre = _z_centre(full_shape, shrink)
    return [_add_depth_line(f, slope, z_centre, voxel_size[0]) for f, (_, slope) in zip(out, flattened)]


def _z_centre(full_shape, shrink) -> float:
    """Mean full-resolution plane of the fit planes (where the depth line is zero)."""
    oz, mz = shrink_grid(full_shape[0], shrink[0])
    return oz + shrink[0] * (mz - 1) / 2


def _stretched_basis(n: int, m: int, order: int) -> np.ndarray:
    """Basis of SimpleITK's evaluation on an ``n``-voxel reference axis (t = S*i/(n-1))."""
    spans = m - order
    return basis_matrix(spans * np.arange(n) / (n - 1.0), m, order, 1e-3 * spans / (n - 1.0))


def _recover_lattice(corrector, m_final, order) -> np.ndarray:
    """SimpleITK's final control lattice, from its log field on a ``(2m+1)^3`` grid."""
    import SimpleITK as sitk

    n = [2 * m + 1 for m in m_final]
    ref = sitk.Image([n[2], n[1], n[0]], sitk.sitkFloat32)
    f = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(ref)).astype(np.float64)
    for axis, (nn, m) in enumerate(zip(n, m_final)):
        pinv = np.linalg.pinv(_stretched_basis(nn, m, order))
        f = np.moveaxis(np.tensordot(pinv, f, axes=([1], [axis])), 0, axis)
    return f


def _check_recovery(corrector, fld: BSplineField, shrunk_shape, order) -> None:
    """The recovered lattice must reproduce SimpleITK's field on the fit grid."""
    import SimpleITK as sitk

    ref = sitk.Image([int(v) for v in shrunk_shape[::-1]], sitk.sitkFloat32)
    want = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(ref))
    b = [_stretched_basis(n, fld.coeffs.shape[d], order) for d, n in enumerate(shrunk_shape)]
    got = np.einsum("za,yb,xc,abc->zyx", b[0], b[1], b[2], fld.coeffs)
    err = float(np.abs(got - want).max())
    if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
        raise RuntimeError(f"internal error: recovered N4 lattice differs from SimpleITK by {err:.3g}")


def correct(volume, mask=None, *, voxel_size=(1.0, 1.0, 1.0), params: N4Params = N4Params(),
            threads: int = 1, tile_planes: int = 32, engine: str = "octn4", device: str | None = None):
    """N4-correct a volume held in memory, on the volume's own device.

    Parameters
    ----------
    volume : (Z, Y, X) array, positive intensities in tissue
        NumPy, or a device array (CuPy, any array API library): then the
        shrink and the tile-by-tile apply run on that device and the
        results are arrays of its namespace.
    mask : (Z, Y, X) bool array, optional
        Voxels to fit; all voxels when omitted.
    voxel_size : (z, y, x) floats, mm
    params : N4Params
    engine : 'octn4' (octn4's engine, the default) or 'sitk' (SimpleITK, the reference)
    device : where the fit runs: 'cpu', 'cuda' or 'auto'; by default 'cuda'
        for a CuPy volume and 'cpu' otherwise.  Only the fit grid travels
        between host and device, never the volume.

    Returns
    -------
    corrected : (Z, Y, X) float32 array, ``volume / bias``
    bias : (Z, Y, X) float32 array, ``exp(log field)``
    fit : FitResult
    """
    host = isinstance(volume, (np.ndarray, list, tuple)) or np.isscalar(volume)
    xp = np if host else array_namespace(volume)
    vol = np.asarray(volume, dtype=np.float32) if host else xp.astype(volume, xp.float32)
    if device is None:
        device = "cuda" if is_cupy_array(vol) else "cpu"
    if vol.ndim != 3:
        raise InputError(f"volume must be 3-D (Z, Y, X); got shape {tuple(vol.shape)}")
    if mask is None:
        msk = xp.ones(vol.shape, dtype=xp.bool)
    else:
        on_host = isinstance(mask, (np.ndarray, list, tuple))
        msk = np.asarray(mask, bool) if host else \
            (from_numpy(np.asarray(mask, bool), like=vol) if on_host else xp.astype(mask, xp.bool))
    if tuple(msk.shape) != tuple(vol.shape):
        raise InputError(f"mask shape {tuple(msk.shape)} does not match volume shape {tuple(vol.shape)}")
    s = shrink_factors(vol.shape, voxel_size, params)
    sub, sub_mask = shrink_volume(vol, msk, s, params.shrink_mode)
    fit = fit_bias(to_numpy(sub), to_numpy(sub_mask), full_shape=tuple(vol.shape), shrink=s, voxel_size=voxel_size,
                   params=params, threads=threads, engine=engine, device=device)
    corrected = xp.empty(vol.shape, dtype=xp.float32)
    bias = xp.empty(vol.shape, dtype=xp.float32)
    for z0, z1, log_b in fit.field.tiles(tile_planes, like=None if host else vol):
        b = xp.exp(log_b)
        bias[z0:z1, ...] = b
        corrected[z0:z1, ...] = apply_bias_field(vol[z0:z1, ...], b)
    return corrected, bias, fit


def apply_bias_field(volume, bias, out=None, *, floor: float = BIAS_FLOOR):
    """``volume / max(bias, floor)`` on the arrays' device (``out`` may alias ``volume``)."""
    xp = array_namespace(volume, bias)
    denom = xp.maximum(bias, xp.asarray(floor, dtype=bias.dtype))
    if out is None:
        return xp.astype(volume / denom, xp.float32)
    out[...] = volume / denom
    return out


# --------------------------------------------------------------------------- reference API


def _reference_params(shrink_factor, n_iterations, spline_distance_mm) -> N4Params:
    return N4Params(maximum_number_of_iterations=tuple(n_iterations), shrink_factor=shrink_factor,
                    spline_distance_mm=spline_distance_mm)


def compute_tissue_mask(vol, smoothing_sigma=2.0, n_serial_slices=1, closing_radius=3,
                        z_closing_planes=2, smoothing_sigma_z=1.0):
    """Reference tissue mask (see :mod:`octn4.mask`); ``z_closing_planes`` counts Z planes."""
    bounds = section_bounds(np.shape(vol)[0], n_sections=n_serial_slices)
    params = MaskParams(smoothing_sigma=smoothing_sigma, smoothing_sigma_z=smoothing_sigma_z,
                        closing_radius=closing_radius, z_closing_planes=z_closing_planes)
    return tissue_mask(vol, bounds, params=params)


def n4_correct(vol, mask=None, shrink_factor=4, n_iterations=(50, 50, 50, 50), spline_distance_mm=10.0,
               voxel_size_mm=(1.0, 1.0, 1.0), *, threads: int = 1):
    """Reference N4 with SimpleITK: returns ``(corrected, bias)``, float32, full size.

    The full-resolution bias is the fitted B-spline evaluated on the full
    grid (not the shrunk field resampled).
    """
    corrected, bias, _ = correct(vol, mask, voxel_size=voxel_size_mm, threads=threads, engine="sitk",
                                 params=_reference_params(shrink_factor, n_iterations, spline_distance_mm))
    return corrected, bias


def _section_job(args):
    vol, mask, params, voxel_size, threads = args
    corrected, bias, _ = correct(vol, mask, voxel_size=voxel_size, params=params, threads=threads, engine="sitk")
    return corrected, bias


def n4_correct_per_section(vol, n_serial_slices, mask=None, n_processes=1, shrink_factor=4,
                           n_iterations=(50, 50, 50, 50), spline_distance_mm=10.0,
                           voxel_size_mm=(1.0, 1.0, 1.0)):
    """Reference per-section N4: each section corrected on its own, concatenated along Z."""
    vol = np.asarray(vol, dtype=np.float32)
    bounds = section_bounds(vol.shape[0], n_sections=n_serial_slices)
    params = _reference_params(shrink_factor, n_iterations, spline_distance_mm)
    jobs = [(vol[a:b], None if mask is None else np.asarray(mask)[a:b], params, voxel_size_mm, 1)
            for a, b in bounds]
    if n_processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_processes) as pool:
            results = list(pool.map(_section_job, jobs))
    else:
        results = [_section_job(j) for j in jobs]
    return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))
