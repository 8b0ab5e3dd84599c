"""The one seam between octn4 and array libraries other than NumPy.

Library functions take arrays and return arrays on the same device; the
array decides the namespace (``xp``).  CuPy is never imported here or
anywhere else at import time: it is reached only through an array that
already is a CuPy array.
"""

from __future__ import annotations

import importlib

import numpy as np
from array_api_compat import array_namespace, is_cupy_array

__all__ = ["array_namespace", "ndimage_for", "bincount", "to_numpy"]


def ndimage_for(x):
    """``scipy.ndimage`` for host arrays, ``cupyx.scipy.ndimage`` for CuPy arrays."""
    if is_cupy_array(x):
        return importlib.import_module("cupyx.scipy.ndimage")
    return importlib.import_module("scipy.ndimage")


def bincount(x, weights=None, minlength=0):
    """``bincount`` (not in the array API standard) on the array's device."""
    if is_cupy_array(x):
        cp = importlib.import_module("cupy")
        return cp.bincount(x, weights=weights, minlength=minlength)
    return np.bincount(np.asarray(x), weights=None if weights is None else np.asarray(weights),
                       minlength=minlength)


def to_numpy(x) -> np.ndarray:
    """Copy an array to the host (synchronises the device for CuPy arrays)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
