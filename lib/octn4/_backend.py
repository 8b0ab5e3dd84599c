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

__all__ = ["array_namespace", "is_cupy_array", "ndimage_for", "segment_sum", "nonzero_flat", "scatter",
           "to_numpy", "from_numpy", "cuda_namespace", "device_free_bytes", "DEVICES"]

DEVICES = ("cpu", "cuda", "auto")


def ndimage_for(x):
    """``scipy.ndimage`` for host arrays, ``cupyx.scipy.ndimage`` for CuPy arrays."""
    if is_cupy_array(x):
        return importlib.import_module("cupyx.scipy.ndimage")
    return importlib.import_module("scipy.ndimage")


#: Fixed-point scale of :func:`segment_sum` off NumPy: weights are summed as integers in units of 2**-32.
SEGMENT_SUM_BITS = 32


def segment_sum(keys, weights, n: int):
    """Sums of the float64 ``weights`` by integer ``keys`` in ``[0, n)``: a weighted bincount of known length.

    Deterministic and free of host round trips on every backend.  NumPy:
    ``np.bincount``.  Elsewhere (CuPy, other array API libraries): a stable
    sort of the keys, then differences of a running sum at the key
    boundaries, with the running sum taken in 64-bit integers (the weights
    in units of ``2**-SEGMENT_SUM_BITS``).  Integer addition does not depend
    on its order, so neither a GPU's scan nor its thread scheduling can
    change a bit of the result, as the float atomics of a GPU ``bincount``
    would.  Quantising costs at most ``2**-33`` per weight; the integers
    hold up to ``2**(63 - SEGMENT_SUM_BITS)`` of summed weight (2e9 for
    weights of at most 1, the histogram splats; larger sums raise).
    """
    if is_numpy_array(keys):
        return np.bincount(keys, weights=weights, minlength=n)
    xp = array_namespace(keys)
    scale = float(2 ** SEGMENT_SUM_BITS)
    order = xp.argsort(keys, stable=True)
    sorted_keys = xp.take(keys, order)
    fixed = xp.astype(xp.round(xp.take(weights, order) * scale), xp.int64)
    if int(weights.shape[0]) * scale >= 2.0 ** 63 and weights.shape[0] > 0:
        raise ValueError(f"segment_sum: {weights.shape[0]} weights may overflow the 64-bit fixed-point sum")
    run = xp.cumulative_sum(fixed, include_initial=True)
    edges = xp.searchsorted(sorted_keys, xp.arange(n + 1, dtype=sorted_keys.dtype))
    return xp.astype(xp.take(run, edges[1:]) - xp.take(run, edges[:-1]), xp.float64) / scale


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
    if is_numpy_array(x) or np.isscalar(x) or isinstance(x, (list, tuple, range)):
        return np.asarray(x)
    return np.from_dlpack(x)     # other array API libraries on the CPU (e.g. array_api_strict)


def from_numpy(a: np.ndarray, *, like):
    """``a`` as an array of ``like``'s namespace, on ``like``'s device."""
    if is_numpy_array(like):
        return np.asarray(a)
    xp = array_namespace(like)
    return xp.asarray(a, device=device(like))


def device_free_bytes() -> int:
    """Bytes a CUDA fit can still allocate: the device's free memory plus what CuPy's pool holds unused."""
    cp = cuda_namespace()
    free, _ = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    return int(free) + int(pool.free_bytes())


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
