"""N4 parameters and the schedule rules that turn them into a fit's grid and lattice.

:class:`N4Params` holds ITK's settings with its names and defaults
(``docs/N4_ALGORITHM.md`` §1 of the design notes) and octn4's additions;
:func:`shrink_factors` sizes a fit grid, :func:`control_points` and
:func:`final_control_points` size its lattice, and :func:`fit_schedule`
cuts the levels the 'fit-grid' rule does not allow.  Pure arithmetic: no
array work, no backend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .depth import DEPTH_MODELS, DEPTH_PRIOR
from .errors import InputError
from .shrink import SHRINK_MODES

log = logging.getLogger("octn4")

__all__ = ["CONTROL_POINT_RULES", "N4Params", "control_points", "final_control_points", "fit_schedule",
           "shrink_factors"]

#: Control-point rules (see :func:`fit_schedule`).
CONTROL_POINT_RULES = ("reference", "fit-grid")


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

