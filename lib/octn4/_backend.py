"""The one seam between octn4 and array libraries other than NumPy.

Library functions take arrays and return arrays on the same device; the
array decides the namespace (``xp``).  CuPy is never imported here or
anywhere else at import time: it is reached only through an array that
already is a CuPy array, or through :func:`require_device` when a user
asks for ``cuda`` at the command line.
"""

from __future__ import annotations

import importlib

import numpy as np
from array_api_compat import array_namespace, is_cupy_array

__all__ = ["array_namespace", "ndimage_for", "bincount", "to_numpy", "require_device"]


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


def require_device(device: str):
    """Return the array module for ``device`` ('cpu' or 'cuda').

    A CUDA device that was asked for but is not usable is an error, never
    a silent fall-back to the CPU.
    """
    if device == "cpu":
        return np
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")
    try:
        cp = importlib.import_module("cupy")
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, CUDARuntimeError, driver errors
        raise RuntimeError(f"device 'cuda' was requested but CuPy/CUDA is not usable: {exc}") from exc
    if n < 1:
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible")
    return cp
