"""The one seam between octn4 and array libraries other than NumPy.

Library functions take arrays and return arrays on the same device; the
array decides the namespace (``xp``).  CuPy is never imported at import
time: it is reached through an array that already is a CuPy array, or
through :func:`cuda_namespace` when a user asks for ``device='cuda'``.
"""

from __future__ import annotations

import importlib

import numpy as np
from array_api_compat import array_namespace, device, is_cupy_array, is_numpy_array

from .errors import InputError

__all__ = ["array_namespace", "ndimage_for", "bincount", "nonzero_flat", "scatter", "to_numpy", "from_numpy",
           "cuda_namespace", "DEVICES"]

DEVICES = ("cpu", "cuda", "auto")


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
    out = np.bincount(to_numpy(x), weights=None if weights is None else to_numpy(weights), minlength=minlength)
    return out if is_numpy_array(x) else from_numpy(out, like=x)


def nonzero_flat(mask):
    """Indices (int64) of the true entries of a 1-D boolean array, ascending."""
    xp = array_namespace(mask)
    return xp.astype(xp.nonzero(mask)[0], xp.int64)


def scatter(n: int, idx, values):
    """A 1-D array of ``n`` zeros with ``values`` at ``idx`` (index assignment is not in the standard)."""
    if is_numpy_array(values) or is_cupy_array(values):
        xp = array_namespace(values)
        out = xp.zeros(n, dtype=values.dtype)
        out[idx] = values
        return out
    out = np.zeros(n, dtype=to_numpy(values).dtype)
    out[to_numpy(idx)] = to_numpy(values)
    return from_numpy(out, like=values)


def to_numpy(x) -> np.ndarray:
    """The array on the host as NumPy (a copy from a GPU; synchronises the device)."""
    if is_cupy_array(x):
        return x.get()
    if is_numpy_array(x) or np.isscalar(x):
        return np.asarray(x)
    return np.from_dlpack(x)     # other array API libraries on the CPU (e.g. array_api_strict)


def from_numpy(a: np.ndarray, *, like):
    """``a`` as an array of ``like``'s namespace, on ``like``'s device."""
    if is_numpy_array(like):
        return np.asarray(a)
    xp = array_namespace(like)
    return xp.asarray(a, device=device(like))


def cuda_namespace():
    """CuPy, checked to have a usable CUDA device; :class:`InputError` naming what is missing otherwise."""
    try:
        cp = importlib.import_module("cupy")
    except ImportError:
        raise InputError("device 'cuda' needs CuPy, which is not installed (pip install 'octn4[gpu]', or use "
                         "the CUDA container); run with --device cpu instead") from None
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except MemoryError:
        raise
    except Exception as exc:  # CUDA driver/runtime missing or broken: say which
        raise InputError(f"device 'cuda' was asked for but CUDA is not usable here ({exc})") from None
    if n < 1:
        raise InputError("device 'cuda' was asked for but no CUDA device is visible") from None
    return cp
