"""Which machines skip the CuPy tests: those without CuPy or without an NVIDIA driver, and no others."""

import importlib.util
import sys
import types

import pytest

import conftest


def fake_cupy(monkeypatch, count):
    """A stand-in CuPy whose device count is ``count`` (an exception instance: raised)."""
    def get_device_count():
        if isinstance(count, Exception):
            raise count
        return count

    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cupy" else real(name, *a))
    monkeypatch.setitem(sys.modules, "cupy", mod)


def test_a_broken_cupy_where_a_driver_exists_fails_the_suite(monkeypatch):
    """Guards: conftest's ``except Exception: return False`` made a broken CuPy on a GPU machine skip every GPU
    test, so the suite passed there without running them."""
    fake_cupy(monkeypatch, RuntimeError("cudaErrorInsufficientDriver"))
    monkeypatch.setattr(conftest, "_cuda_present", lambda: True)
    with pytest.raises(RuntimeError, match="CuPy cannot use it .*cudaErrorInsufficientDriver"):
        conftest._cuda_usable()
    fake_cupy(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="CuPy sees no CUDA device"):
        conftest._cuda_usable()


def test_no_driver_or_no_cupy_skips(monkeypatch):
    fake_cupy(monkeypatch, RuntimeError("cudaErrorNoDevice"))
    monkeypatch.setattr(conftest, "_cuda_present", lambda: False)
    assert conftest._cuda_usable() is False
    fake_cupy(monkeypatch, 1)
    assert conftest._cuda_usable() is True
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert conftest._cuda_usable() is False
