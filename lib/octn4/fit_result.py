"""What a fit returns: the field, the grid and lattice it was fitted with, and how the fit went.

Shared by both engines (:mod:`octn4.sitk_backend`, :mod:`octn4.engine`
through :mod:`octn4.n4`), the stages that store fits in their records, and
the zero field a section with too little tissue gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bspline import BSplineField, axis_map
from .params import N4Params

__all__ = ["FitResult", "too_little_tissue", "zero_field"]


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


def too_little_tissue(n_in: int, m0) -> bool:
    """Fewer fit voxels than 100 or than level-0 control points: nothing to fit (flagged 'no tissue')."""
    return n_in < max(100, int(np.prod(m0)))


def zero_field(shape, shrink, m, params: N4Params) -> BSplineField:
    """A zero log field with the lattice geometry of a fit (used when there is nothing to fit)."""
    maps = tuple(axis_map(n, mm - params.spline_order, shrink=s, mode=params.evaluation)
                 for n, mm, s in zip(shape, m, shrink))
    return BSplineField(np.zeros(m), params.spline_order, tuple(shape), maps)

