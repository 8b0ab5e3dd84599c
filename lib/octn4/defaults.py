"""octn4's default settings for each stage, in one place.

:class:`~octn4.params.N4Params` and :class:`~octn4.mask.MaskParams` default to
the reference recipe (ITK's N4 settings, per-section Otsu, subsampling),
which the reference API (:func:`octn4.reference.n4_correct`, ...) reproduces.  The
pipeline, the command line and the workflow use these instead; each choice
and the measurements behind it are in ``docs/QUALITY.md``
(``benchmarks/accuracy_synth.py`` reproduces them).
"""

from __future__ import annotations

from .gains import GainParams
from .mask import MaskParams
from .params import N4Params

__all__ = ["MASK", "SECTION_N4", "GLOBAL_N4", "GAINS", "REFERENCE_SECTION_N4", "REFERENCE_GLOBAL_N4", "REFERENCE_MASK"]

#: Tissue mask: per-plane log-Otsu thresholds on a robust depth line per section.
MASK = MaskParams(method="depth")

#: N4 per section: the depth model (a stack-wide depth curve plus per-section deviations, octn4.depth)
#: divided out first, two levels of 100 iterations (the iteration count, not the CV test, ends each level),
#: tissue block means, and a lattice kept within the fit grid with at least two fit voxels per control point
#: along each axis (a thin section's Z axis is shrunk less); at most 32 fit voxels per lattice span, so wide
#: planes are shrunk more and a section fit costs the same whatever the plane size.
SECTION_N4 = N4Params(maximum_number_of_iterations=(100, 100), convergence_threshold=1e-5,
                      shrink_mode="mean", control_point_rule="fit-grid", fit_voxels_per_control_point=2,
                      fit_voxels_per_span=32, depth_model="curve")

#: Global N4 over the re-assembled stack: one level (a single B-spline span per axis at the reference
#: spacing), for drift across the stack, on a fit grid of about 1.5 M voxels.
GLOBAL_N4 = N4Params(maximum_number_of_iterations=(100,), convergence_threshold=1e-5, shrink_factor=None,
                     shrink_mode="mean", control_point_rule="fit-grid")

#: Section gains: each boundary's step from the two planes that touch it (per-pixel log ratios, smoothed),
#: chained, then anchored against drift by the sections' histograms.
GAINS = GainParams(estimator="touching", anchor="histogram")

#: The reference recipe (SPEC.md): ITK defaults, subsampling, per-section Otsu.
REFERENCE_MASK = MaskParams()
REFERENCE_SECTION_N4 = N4Params()
REFERENCE_GLOBAL_N4 = N4Params(shrink_factor=None)
