"""N4 with SimpleITK: octn4's calls against direct SimpleITK calls."""

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import smooth_phantom
from octn4.bspline import shrink_grid
from octn4.errors import InputError
from octn4.n4 import apply_bias_field, correct
from octn4.params import N4Params, shrink_factors
from octn4.reference import n4_correct, n4_correct_per_section

VS = (0.05, 0.02, 0.02)


def sitk_log_field(vol, mask, *, shrink, iterations, m0, threshold=1e-3):
    """The SimpleITK recipe with explicit settings; returns the full-resolution log field."""
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(VS[::-1])
    msk = sitk.GetImageFromArray(mask.astype(np.uint8))
    msk.CopyInformation(img)
    small, small_mask = sitk.Shrink(img, [shrink] * 3), sitk.Shrink(msk, [shrink] * 3)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(iterations))
    f.SetConvergenceThreshold(threshold)
    f.SetNumberOfControlPoints(list(m0[::-1]))
    f.SetNumberOfThreads(1)
    f.Execute(small, small_mask)
    return sitk.GetArrayFromImage(f.GetLogBiasFieldAsImage(img))


#: octn4's engine (parity mode) vs SimpleITK, 3 levels x 5 iterations on this 10x20x22 fit grid: 1.10e-4, from
#: ITK's top-bin cliff (which way the brightest voxel's float32 bin index rounds is decided by the last bit of
#: each implementation's arithmetic; benchmarks/parity_survey.py: flipping that decision at one or two
#: iterations removes every such difference).  The bracket fails on an engine regression (> 3e-4) and on
#: the cliff's disappearance (< 5e-5), where a strict xfail let any error pass.
MULTILEVEL_CLIFF = (5e-5, 3e-4)


@pytest.mark.parametrize("engine", ["sitk", "octn4"])
@pytest.mark.parametrize("iterations,tol", [((3,), 1e-5), pytest.param((5, 5, 5), 1e-4, id="multilevel")])
def test_stretched_evaluation_matches_simpleitk(iterations, tol, engine):
    """Shrink + full-resolution evaluation through ``correct`` with either engine, against SimpleITK's recipe."""
    vol, mask, _ = smooth_phantom()
    want = sitk_log_field(vol, mask, shrink=2, iterations=iterations, m0=(4, 5, 4))
    p = N4Params(maximum_number_of_iterations=iterations, shrink_factor=2, number_of_control_points=(4, 5, 4),
                 evaluation="stretched", parity=True)
    corrected, bias, fit = correct(vol, mask, voxel_size=VS, params=p, engine=engine)
    assert fit.engine == engine
    diff = np.abs(np.log(bias) - want).max()
    if engine == "octn4" and len(iterations) > 1:
        assert MULTILEVEL_CLIFF[0] <= diff <= MULTILEVEL_CLIFF[1]
    else:
        assert diff <= tol
    np.testing.assert_allclose(corrected, vol / bias, rtol=1e-6)
    assert fit.status == "fitted" and len(fit.iterations) == len(iterations)


def test_n4_correct_reference_api_recovers_the_planted_bias():
    vol, mask, true_log = smooth_phantom()
    corrected, bias = n4_correct(vol, mask, shrink_factor=2, voxel_size_mm=VS)
    assert corrected.dtype == bias.dtype == np.float32 and bias.shape == vol.shape
    np.testing.assert_allclose(corrected, vol / bias, rtol=1e-6)
    err = np.log(bias)[mask] - true_log[mask]
    assert np.std(err) < 0.25 * np.std(true_log[mask])
    # SimpleITK's own full-resolution field (index-stretched) is no closer to the truth
    want = sitk_log_field(vol, mask, shrink=2, iterations=(50, 50, 50, 50), m0=(4, 4, 4))
    assert np.std(err) <= 1.1 * np.std(want[mask] - true_log[mask])


def test_n4_correct_matches_simpleitk_on_the_voxels_it_fitted():
    """SimpleITK's N4 on the voxels octn4 samples gives the field octn4 evaluates there.

    The samples are ITK's centred shrink (offset rounded half up).  They are
    built here rather than with ``sitk.Shrink``: that filter computes the
    offset in physical space, so on half-voxel ties it rounds either way
    depending on the spacing (0.05 mm and 1 mm differ on this shape).
    """
    vol, mask, _ = smooth_phantom(shape=(22, 41, 46))
    _, bias = n4_correct(vol, mask, shrink_factor=3, n_iterations=(20, 20, 20), voxel_size_mm=VS)
    sub = np.ix_(*[o + 3 * np.arange(m) for o, m in (shrink_grid(n, 3) for n in vol.shape)])
    small = sitk.GetImageFromArray(vol[sub])
    small.SetSpacing([3 * v for v in VS[::-1]])
    small_mask = sitk.GetImageFromArray(mask[sub].astype(np.uint8))
    small_mask.CopyInformation(small)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations([20, 20, 20])
    f.Execute(small, small_mask)
    want = sitk.GetArrayFromImage(f.GetLogBiasFieldAsImage(small))
    assert np.abs(np.log(bias[sub]) - want).max() <= 1e-5


def test_per_section_equals_sections_corrected_one_by_one():
    vol, mask, _ = smooth_phantom(shape=(24, 40, 40))
    kw = dict(shrink_factor=2, n_iterations=(5, 5), voxel_size_mm=VS)
    c1, b1 = n4_correct_per_section(vol, 3, mask=mask, **kw)
    c2, b2 = n4_correct_per_section(vol, 3, mask=mask, n_processes=2, **kw)
    np.testing.assert_array_equal(b1, b2)
    first, _ = n4_correct(vol[:8], mask[:8], **kw)
    np.testing.assert_array_equal(c1[:8], first)


def test_nothing_to_fit_gives_a_flagged_identity_field():
    vol, _, _ = smooth_phantom()
    corrected, bias, fit = correct(vol, np.zeros(vol.shape, bool), voxel_size=VS,
                                   params=N4Params(shrink_factor=2))
    assert fit.status == "no tissue" and not fit.converged
    np.testing.assert_array_equal(bias, 1.0)


def test_shrink_rules():
    assert shrink_factors((24, 400, 400), VS, N4Params(shrink_factor=4)) == (4, 4, 4)
    assert shrink_factors((5, 400, 400), VS, N4Params(shrink_factor=4)) == (2, 4, 4)   # keep 2 planes
    auto = shrink_factors((200, 1000, 1000), (0.02, 0.01, 0.01), N4Params(shrink_factor=None, fit_voxels=10**6))
    grid = [n // s for n, s in zip((200, 1000, 1000), auto)]
    assert np.prod(grid) <= 10**6 and np.prod(grid) > 10**6 / 8
    with pytest.raises(InputError, match="at least 2 voxels"):
        shrink_factors((1, 40, 40), VS, N4Params())


def test_apply_bias_field_floors_the_bias(xp):
    v = xp.asarray(np.ones((2, 2, 2), np.float32))
    b = xp.asarray(np.full((2, 2, 2), 1e-9, np.float32))
    assert float(apply_bias_field(v, b).max()) == pytest.approx(1e6)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="spline_order"):
        N4Params(spline_order=5)
    with pytest.raises(ValueError, match="shrink_factor"):
        N4Params(shrink_factor=0)
