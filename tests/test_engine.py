"""octn4's N4 engine against SimpleITK on the same fit grid (N4_ALGORITHM.md §12 recipe)."""

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import smooth_phantom
from octn4.engine import _contract, _grid_basis, fit_lattice, refinement_matrix

SPACING = (0.02, 0.02, 0.05)   # x, y, z as SimpleITK takes it


def sitk_run(vol, mask, iterations, m0, threshold):
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(SPACING)
    msk = sitk.GetImageFromArray(mask.astype(np.uint8))
    msk.CopyInformation(img)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(iterations))
    f.SetConvergenceThreshold(threshold)
    f.SetNumberOfControlPoints(list(m0[::-1]))
    f.SetNumberOfThreads(1)
    done = {}
    f.AddCommand(sitk.sitkIterationEvent, lambda: done.__setitem__(f.GetCurrentLevel(), f.GetElapsedIterations()))
    f.Execute(img, msk)
    field = sitk.GetArrayFromImage(f.GetLogBiasFieldAsImage(img)).astype(np.float64)
    return field, [done.get(level, 0) for level in range(len(iterations))]


def engine_run(vol, mask, iterations, m0, threshold, **kw):
    fit = fit_lattice(vol, mask, m0=m0, levels_iterations=iterations, threshold=threshold, **kw)
    basis = [_grid_basis(n, m, 3) for n, m in zip(vol.shape, fit.coeffs.shape)]
    return _contract(fit.coeffs, basis, np), fit.iterations


@pytest.mark.parametrize("order", [1, 2, 3])
def test_refinement_is_exact(order):
    for m in (order + 1, order + 3, 9):
        c = np.random.default_rng(m).normal(size=m)
        coarse = _grid_basis(57, m, order) @ c
        fine = _grid_basis(57, 2 * m - order, order) @ (refinement_matrix(m, order) @ c)
        np.testing.assert_allclose(fine, coarse, atol=1e-12)


@pytest.mark.parametrize("iterations,m0", [((1,), (4, 4, 4)), ((5,), (4, 5, 4))])
def test_few_iterations_match_simpleitk(iterations, m0):
    vol, mask, _ = smooth_phantom(shape=(14, 30, 33))
    want, want_its = sitk_run(vol, mask, iterations, m0, 0.0)
    got, its = engine_run(vol, mask, iterations, m0, 0.0)
    assert np.abs(got - want).max() <= 1e-5
    assert its == want_its


@pytest.mark.parametrize("shape,iterations,threshold", [
    ((30, 40, 44), (3, 3, 3), 0.0),
    ((30, 40, 44), (3, 3, 3, 3), 0.0),
    ((14, 30, 33), (50, 50, 50), 1e-3),
])
def test_multilevel_matches_simpleitk_with_the_same_iteration_counts(shape, iterations, threshold):
    vol, mask, _ = smooth_phantom(shape=shape)
    want, want_its = sitk_run(vol, mask, iterations, (4, 4, 4), threshold)
    got, its = engine_run(vol, mask, iterations, (4, 4, 4), threshold)
    assert np.abs(got - want).max() <= 1e-4
    assert its == want_its


@pytest.mark.xfail(strict=True, reason=(
    "ITK's histogram cliff: the brightest voxel sits at c = bins - 1 in float32 and is counted (offset 0) or "
    "dropped (c rounds above) depending on the last ulp of log(v) - f; on this small grid ITK drops it at the "
    "third iteration and octn4 does not, giving ~1e-4 after 3 levels. Nudging that voxel by +1 ulp at that "
    "iteration brings the difference to 1e-8."))
def test_multilevel_on_a_tiny_grid_matches_simpleitk():
    vol, mask, _ = smooth_phantom(shape=(14, 30, 33))
    want, _ = sitk_run(vol, mask, (3, 3, 3), (4, 4, 4), 0.0)
    got, _ = engine_run(vol, mask, (3, 3, 3), (4, 4, 4), 0.0)
    assert np.abs(got - want).max() <= 1e-4


def test_quirk_q1_first_voxel_is_the_strict_minimum():
    vol, mask, _ = smooth_phantom(shape=(14, 30, 33))
    mask = mask.copy()
    mask[0, 0, 0] = True
    vol = vol.copy()
    vol[0, 0, 0] = vol[mask].min() * 0.5          # first included voxel, strict minimum
    want, _ = sitk_run(vol, mask, (2,), (4, 4, 4), 0.0)
    got, _ = engine_run(vol, mask, (2,), (4, 4, 4), 0.0, q1=True)
    plain, _ = engine_run(vol, mask, (2,), (4, 4, 4), 0.0, q1=False)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(plain - want).max() > 10 * np.abs(got - want).max()


def test_correct_with_either_engine_gives_the_same_field():
    """Through octn4.n4.correct: same shrink, lattice and geometry; the fields agree to <1 % of their range."""
    from octn4.n4 import N4Params, correct

    vol, mask, true_log = smooth_phantom(shape=(24, 48, 52))
    p = N4Params(shrink_factor=2, maximum_number_of_iterations=(50, 50, 50))
    _, b_sitk, f_sitk = correct(vol, mask, voxel_size=(0.05, 0.02, 0.02), params=p, engine="sitk")
    _, b_ours, f_ours = correct(vol, mask, voxel_size=(0.05, 0.02, 0.02), params=p, engine="octn4")
    lo, ls = np.log(b_ours), np.log(b_sitk)
    assert np.abs(lo - ls).max() < 0.01 * np.ptp(ls)
    assert f_ours.engine == "octn4" and f_sitk.engine == "sitk"
    assert f_ours.field.coeffs.shape == f_sitk.field.coeffs.shape
    err = lambda lb: np.std(lb[mask] - true_log[mask])  # noqa: E731
    assert err(lo) <= 1.05 * err(ls)


def test_pipeline_runs_with_the_octn4_engine(small_stack, tmp_path):
    from octn4.cli import main
    from octn4.io import read_attrs

    out = tmp_path / "out"
    assert main(["run", str(small_stack / "volume.ome.zarr"), str(out), "--sections", "3", "--engine", "octn4",
                 "--iterations", "10,10", "--global-iterations", "10,10", "-q"]) == 0
    attrs = read_attrs(out / "corrected.ome.zarr")
    assert attrs["engine"] == "octn4" and attrs["global_fit"]["engine"] == "octn4"
    assert all(f["engine"] == "octn4" for f in attrs["section_fits"])
