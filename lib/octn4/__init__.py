"""octn4: N4 bias-field correction for serial-section OCT brain volumes.

The package is organised by stage:

- :mod:`octn4.io` reads and writes OME-Zarr and NIfTI volumes, streamed along Z;
- :mod:`octn4.sections` turns a section count or a plane list into Z ranges;
- :mod:`octn4.mask` computes the tissue mask (NumPy or CuPy);
- :mod:`octn4.bspline` holds the fitted field as a control lattice and
  evaluates it at full resolution tile by tile;
- :mod:`octn4.params` holds the N4 settings and schedule rules, :mod:`octn4.n4`
  fits them with octn4's engine (:mod:`octn4.engine`) or SimpleITK
  (:mod:`octn4.sitk_backend`), and :mod:`octn4.reference` is the reference API;
- :mod:`octn4.pipeline` runs mask -> per-section N4 -> global N4 -> outputs;
- :mod:`octn4.synth` generates serial-OCT-like stacks with a known bias.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("octn4")
except _metadata.PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.1.0+unknown"

from .errors import InputError  # noqa: E402
from .n4 import apply_bias_field  # noqa: E402
from .params import N4Params  # noqa: E402
from .reference import compute_tissue_mask, n4_correct, n4_correct_per_section  # noqa: E402
from .sections import section_bounds  # noqa: E402

__all__ = [
    "InputError",
    "N4Params",
    "__version__",
    "apply_bias_field",
    "compute_tissue_mask",
    "n4_correct",
    "n4_correct_per_section",
    "section_bounds",
]
