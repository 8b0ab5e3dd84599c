"""Host round trips of the engine, counted: the budget a GPU run depends on, proven without a GPU.

On a GPU every value the host reads from the device waits for the device to
finish (a synchronisation), and every small host-to-device copy stalls the
queue.  The engine's budget: **one per iteration** (every member's CV, read
in one array), none at all when the threshold is 0, plus a fixed few per fit
and per level (the sizes of the voxel rows, the one ``nonzero``, the basis
and refinement matrices).  Counted here on ``array_api_strict``: every host
conversion of an array (``__float__``, ``__int__``, ``__bool__``,
``__index__``, ``__complex__``, ``__array__``, ``__dlpack__``,
``__iter__``, ``__buffer__``) and every call of the ``_backend`` host copies
(``to_numpy``, ``from_numpy``, ``nonzero_flat``).  Where CuPy has a CUDA
device the same fits run under ``cupyx.allow_synchronize(False)``, so any
synchronisation outside the counted copies fails the test.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest

from conftest import HAVE_CUDA, smooth_phantom
from octn4 import _backend
from octn4 import engine as E

CONVERSIONS = ("__float__", "__int__", "__bool__", "__index__", "__complex__", "__array__", "__dlpack__",
               "__iter__", "__buffer__")
COPIES = ("to_numpy", "from_numpy", "nonzero_flat")


class HostCounter:
    """Counts host round trips while active; a counted ``_backend`` copy is one, whatever it calls inside."""

    def __init__(self):
        self.n = 0
        self.by_kind: dict[str, int] = {}
        self._inside = 0

    def hit(self, kind):
        if self._inside == 0:
            self.n += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def wrap_copy(self, name, fn, allow=contextlib.nullcontext):
        def counted(*a, **kw):
            self.hit(name)
            self._inside += 1
            try:
                with allow():
                    return fn(*a, **kw)
            finally:
                self._inside -= 1
        return counted


@contextlib.contextmanager
def counting(monkeypatch, backend: str):
    """Count host round trips of the engine's arrays on ``backend`` ('array_api_strict' or 'cupy')."""
    counter = HostCounter()
    allow = contextlib.nullcontext
    outer = contextlib.nullcontext()
    if backend == "array_api_strict":
        from array_api_strict._array_object import Array

        for name in CONVERSIONS:
            original = getattr(Array, name, None)
            if original is None:
                continue

            def conversion(self, *a, _name=name, _original=original, **kw):
                counter.hit(_name)
                counter._inside += 1
                try:
                    return _original(self, *a, **kw)
                finally:
                    counter._inside -= 1
            monkeypatch.setattr(Array, name, conversion)
    else:
        import cupyx

        # CuPy's detector of implicit synchronisations (deprecated since CuPy 10, still shipped); where a
        # release has dropped it, only the engine's own host reads (the _backend copies) are counted
        if hasattr(cupyx, "allow_synchronize"):
            def allow():
                return cupyx.allow_synchronize(True)
            outer = cupyx.allow_synchronize(False)
    for name in COPIES:
        for module in (E, _backend):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counter.wrap_copy(name, getattr(_backend, name), allow))
    with outer:
        yield counter


SYNC_BACKENDS = ["array_api_strict",
                 pytest.param("cupy", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not HAVE_CUDA, reason="CuPy with a CUDA device "
                                                                "is not available here")])]


def _fit(xp, vols, masks, iterations, threshold, **kw):
    imgs = xp.asarray(np.stack(vols))
    msks = xp.asarray(np.stack(masks))
    return E.fit_lattice_batch(imgs, msks, m0=(4, 4, 4), levels_iterations=iterations, threshold=threshold, **kw)


def _count(monkeypatch, backend, *args, **kw):
    xp = importlib.import_module(backend)
    vol, mask, _ = smooth_phantom(shape=(10, 20, 22))
    vols, masks = kw.pop("data", ([vol], [mask]))
    with monkeypatch.context() as m, counting(m, backend) as c:
        fits = _fit(xp, vols, masks, *args, **kw)
    return c, fits


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_one_host_round_trip_per_iteration(monkeypatch, backend):
    """Doubling the iterations (a threshold no fit reaches, so each needs its CV) adds exactly one per iteration."""
    short, fs = _count(monkeypatch, backend, (3, 3), 1e-30)
    long, fl = _count(monkeypatch, backend, (6, 6), 1e-30)
    assert fs[0].iterations == [3, 3] and fl[0].iterations == [6, 6]
    assert long.n - short.n == 6, (short.by_kind, long.by_kind)
    # the fixed part: 3 at the start (counts, nonzero, row offsets), 3 basis matrices per level, 3 refinement
    # matrices between levels, the lattice at the end
    assert short.n - 6 == 3 + 3 * 2 + 3 + 1, short.by_kind
    assert set(short.by_kind) <= set(COPIES), short.by_kind      # nothing behind the _backend seam's back


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_no_host_round_trip_per_iteration_at_threshold_zero(monkeypatch, backend):
    """With threshold 0 nothing can stop early: the CVs are read once per level, not per iteration."""
    short, _ = _count(monkeypatch, backend, (3, 3), 0.0)
    long, fl = _count(monkeypatch, backend, (9, 9), 0.0)
    assert long.n == short.n == 3 + 3 * 2 + 3 + 1 + 2, (short.by_kind, long.by_kind)
    assert all(np.isfinite(fl[0].convergence))


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_a_batch_costs_one_round_trip_per_iteration_not_per_member(monkeypatch, backend):
    """Four members, one CV array per iteration; a member that stops early costs two small copies (its
    leaving), not one per iteration."""
    vols, masks = [], []
    for seed in range(4):
        v, m, _ = smooth_phantom(shape=(10, 20, 22), seed=seed)
        vols.append(v ** (0.3 + 0.2 * seed))
        masks.append(m)
    c, fits = _count(monkeypatch, backend, (20, 20), 1e-3, data=(vols, masks))
    loops = max(f.iterations[0] for f in fits) + max(f.iterations[1] for f in fits)
    leaving = sum(len({f.iterations[level] for f in fits}) - 1 for level in range(2))
    assert c.n <= loops + 3 + 3 * 2 + 3 + 1 + 2 * leaving, (c.by_kind, [f.iterations for f in fits])
    assert len({tuple(f.iterations) for f in fits}) > 1      # the members did stop apart


def test_segment_sum_off_numpy_matches_bincount_and_is_exactly_order_free():
    """The keyed sum every non-NumPy backend uses: equal to NumPy's bincount to the fixed-point step, and the
    same bits whatever the order of its inputs (integer sums)."""
    import array_api_strict as xs

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 20000)
    w = rng.random(20000)
    got = np.asarray(_backend.segment_sum(xs.asarray(keys), xs.asarray(w), 60))
    np.testing.assert_allclose(got, np.bincount(keys, weights=w, minlength=60), rtol=0, atol=20000 * 2.0 ** -33)
    assert np.all(got[50:] == 0)
    perm = rng.permutation(20000)
    again = np.asarray(_backend.segment_sum(xs.asarray(keys[perm]), xs.asarray(w[perm]), 60))
    np.testing.assert_array_equal(got, again)


def test_the_engine_off_numpy_gives_numpys_field():
    """The engine on array_api_strict (sorted integer histogram sums) against NumPy (bincount): the fixed-point
    step moves nothing that matters."""
    import array_api_strict as xs

    vol, mask, _ = smooth_phantom(shape=(14, 30, 33))
    its = (20, 20, 20)
    on_np = E.fit_lattice(vol, mask, m0=(4, 4, 4), levels_iterations=its)
    off = E.fit_lattice(xs.asarray(vol), xs.asarray(mask), m0=(4, 4, 4), levels_iterations=its)
    assert off.iterations == on_np.iterations
    assert np.abs(off.coeffs - on_np.coeffs).max() < 1e-6


def test_correct_on_a_device_array_stays_there_and_costs_nothing_per_tile(monkeypatch):
    """``correct`` given a device array shrinks, applies and returns on that device, with the same voxels as on
    NumPy; its host round trips (the fit grid out, the bases in) do not grow with the number of tiles."""
    import array_api_strict as xs
    from array_api_strict._array_object import Array

    from octn4 import bspline, n4, shrink
    from octn4.n4 import N4Params, correct

    vol, mask, _ = smooth_phantom(shape=(22, 41, 46))
    vs = (0.05, 0.02, 0.02)
    counts = {}
    for mode in ("subsample", "mean"):
        p = N4Params(maximum_number_of_iterations=(4, 4), shrink_factor=2, shrink_mode=mode)
        want = correct(vol, mask, voxel_size=vs, params=p, tile_planes=4)
        for tile in (2, 22):
            with monkeypatch.context() as m, counting(m, "array_api_strict") as c:
                for module in (bspline, n4, shrink):       # the apply's own host copies, counted too
                    for name in COPIES:
                        if hasattr(module, name):
                            m.setattr(module, name, c.wrap_copy(name, getattr(_backend, name)))
                got = correct(xs.asarray(vol), xs.asarray(mask), voxel_size=vs, params=p, tile_planes=tile)
            counts[mode, tile] = c.n
            assert isinstance(got[0], Array) and isinstance(got[1], Array)
            for g, w in zip(got[:2], want[:2]):
                np.testing.assert_array_equal(np.asarray(g), w)
        assert counts[mode, 2] == counts[mode, 22], counts


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="CuPy with a CUDA device is not available here")
def test_cupy_engine_gives_numpys_field_and_repeats_bit_for_bit():
    """On a GPU: the field of the NumPy path to 1e-5 in log, the same iteration counts, and two runs (alone and
    in a batch) with the same lattice bit for bit (no reduction whose order changes between runs)."""
    import cupy

    from octn4.engine import _contract, _grid_basis

    def field(fit, shape):
        return _contract(fit.coeffs, [_grid_basis(n, m, 3) for n, m in zip(shape, fit.coeffs.shape)], np)

    vols, masks = [], []
    for seed in range(3):
        v, m, _ = smooth_phantom(shape=(14, 30, 33), seed=seed)
        vols.append(v ** (0.4 + 0.2 * seed))
        masks.append(m)
    its = (20, 20, 20)
    for j in range(3):
        want = E.fit_lattice(vols[j], masks[j], m0=(4, 4, 4), levels_iterations=its)
        a = E.fit_lattice(cupy.asarray(vols[j]), cupy.asarray(masks[j]), m0=(4, 4, 4), levels_iterations=its)
        b = E.fit_lattice(cupy.asarray(vols[j]), cupy.asarray(masks[j]), m0=(4, 4, 4), levels_iterations=its)
        assert a.iterations == want.iterations
        assert np.abs(field(a, vols[j].shape) - field(want, vols[j].shape)).max() <= 1e-5
        np.testing.assert_array_equal(a.coeffs, b.coeffs)
    batch = [E.fit_lattice_batch(cupy.asarray(np.stack(vols)), cupy.asarray(np.stack(masks)), m0=(4, 4, 4),
                                 levels_iterations=its) for _ in range(2)]
    for x, y in zip(*batch):
        np.testing.assert_array_equal(x.coeffs, y.coeffs)


def test_the_gpu_check_runs_every_step_with_numpy_standing_in(tmp_path):
    """benchmarks/gpu_check.py, the figures a GPU machine records, run end to end on small data with NumPy as
    the device: every measurement is made and the JSON holds them (the GPU figures themselves need a GPU)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--xp", "numpy", "--small", "64", "--big", "32,64,64", "--threads", "1",
                           "--repeat", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["environment"]["xp"] == "numpy"
    for case in ("small", "big"):
        assert set(res[case]["fit_seconds"]) >= {"simpleitk", "numpy", "device"}
        assert all(t > 0 for t in res[case]["fit_seconds"].values())
        assert res[case]["parity"]["device_vs_numpy"] == 0.0     # the same code on the same backend
    assert res["small"]["parity"]["device_runs_bit_identical"] is True
    assert res["small"]["parity"]["device_vs_simpleitk"] < 1e-2          # a 16^3 fit grid, parity mode
    assert res["big"]["fit_grid"] == [8, 16, 16]
    assert set(res["criteria"]) == {"device_vs_numpy_log_field_at_most_1e-5", "two_device_runs_bit_identical",
                                    "big_fit_and_apply_100x_simpleitk_fit"}
