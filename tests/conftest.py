"""Shared fixtures: small generated stacks, the array-backend parameter, tolerances."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

from octn4.synth import SynthParams, synth_stack


def _cuda_present() -> bool:
    """An NVIDIA driver is on this machine (device nodes or nvidia-smi), whatever CuPy says."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _cuda_usable() -> bool:
    """CuPy with a CUDA device.  Without CuPy, or without any NVIDIA driver, the CuPy tests skip; a CuPy that
    is installed but fails where a driver exists is a broken install, and the suite fails here, loudly,
    rather than skipping every GPU test."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        if _cuda_present():
            raise RuntimeError(f"CuPy is installed and an NVIDIA driver is present, but CuPy cannot use it "
                               f"({type(exc).__name__}: {exc}); fix the CuPy install (cupy-cuda12x)") from exc
        return False
    if n < 1 and _cuda_present():
        raise RuntimeError("CuPy is installed and an NVIDIA driver is present, but CuPy sees no CUDA device")
    return n > 0


HAVE_CUDA = _cuda_usable()
_NO_CUDA = pytest.mark.skipif(not HAVE_CUDA, reason="CuPy with a CUDA device is not available here")

#: Backends each array-generic test runs on (CuPy shows as skipped where it cannot run).
BACKENDS = ["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, _NO_CUDA])]
#: The engine also runs on array_api_strict: proof that it keeps to the standard and the _backend seam.
ENGINE_BACKENDS = ["numpy", "array_api_strict", pytest.param("cupy", marks=[pytest.mark.gpu, _NO_CUDA])]


@pytest.fixture(params=BACKENDS)
def xp(request):
    return importlib.import_module(request.param)


@pytest.fixture(scope="session")
def small_stack(tmp_path_factory):
    """A 48x96x96 stack of 3 sections with its ground truth (octn4 synth)."""
    out = tmp_path_factory.mktemp("synth") / "stack"
    synth_stack(out, SynthParams(shape=(48, 96, 96), n_sections=3, seed=3))
    return out


@pytest.fixture(scope="session")
def demo_stack(tmp_path_factory):
    """The demo's stack size: 96x192x192, 4 sections of 1.2 mm (octn4 synth defaults)."""
    out = tmp_path_factory.mktemp("synth") / "demo"
    synth_stack(out, SynthParams(seed=0))
    return out


@pytest.fixture(scope="session")
def demo_run(demo_stack, tmp_path_factory):
    """``octn4 run`` with its default settings on the demo-size stack (shared by several test files)."""
    from octn4.cli import main

    out = tmp_path_factory.mktemp("run") / "demo"
    rc = main(["run", str(demo_stack / "volume.ome.zarr"), str(out), "--sections", "4", "--workers", "2", "-q"])
    assert rc == 0
    return out


def smooth_phantom(shape=(20, 40, 44), seed=0):
    """Volume with a smooth multiplicative bias, an ellipsoid mask, mild gamma noise.

    The noise is mild (100 looks): with OCT-like speckle (under ~10 looks)
    and two tissue classes, N4's histogram sharpening cannot separate the
    classes and recovers little of the bias, in SimpleITK as in octn4.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = (x / 0.9) ** 2 + (y / 0.85) ** 2 + (z / 1.2) ** 2 < 1
    clean = np.where(inside, np.where(x ** 2 + y ** 2 < 0.3, 2.0, 1.0), 0.1)
    log_bias = 0.3 * x - 0.2 * z + 0.25 * y * y
    vol = clean * np.exp(log_bias) * rng.gamma(100, 0.01, shape)
    return vol.astype(np.float32), inside, log_bias
