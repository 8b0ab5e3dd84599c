import numpy as np
import pytest
import SimpleITK as sitk

from octn4.bspline import BSplineField, axis_map, basis_matrix, shrink_grid


@pytest.mark.parametrize("order", [1, 2, 3])
def test_basis_is_a_partition_of_unity_with_p_plus_1_nonzeros(order):
    t = np.linspace(0, 5, 37)
    b = basis_matrix(t, 5 + order, order)
    np.testing.assert_allclose(b.sum(axis=1), 1.0, atol=1e-12)
    assert (np.count_nonzero(b, axis=1) <= order + 1).all()


@pytest.mark.parametrize("n,s", [(256, 4), (33, 3), (24, 4), (7, 2), (10, 1)])
def test_shrink_grid_matches_sitk_shrink(n, s):
    a = np.arange(n * 3 * 3, dtype=np.float32).reshape(n, 3, 3)
    shrunk = sitk.GetArrayFromImage(sitk.Shrink(sitk.GetImageFromArray(a), [1, 1, s]))
    o, m = shrink_grid(n, s)
    np.testing.assert_array_equal(shrunk, a[o::s][:m])


def _field(shape=(9, 14, 11), m=(5, 6, 4), shrink=(2, 3, 2), mode="centred", seed=0):
    maps = tuple(axis_map(n, mm - 3, shrink=s, mode=mode) for n, mm, s in zip(shape, m, shrink))
    return BSplineField(np.random.default_rng(seed).normal(size=m), 3, shape, maps)


@pytest.mark.parametrize("mode", ["centred", "stretched"])
def test_separable_evaluation_equals_dense_tensor_product(mode):
    f = _field(mode=mode)
    b = [f.basis(d, np.arange(n)) for d, n in enumerate(f.shape)]
    dense = np.einsum("za,yb,xc,abc->zyx", *b, f.coeffs)
    np.testing.assert_allclose(f.evaluate(), dense, atol=1e-5)


def test_tiles_equal_whole_and_serialisation_round_trips():
    f = _field()
    whole = f.evaluate()
    tiles = np.concatenate([f.evaluate(np.arange(z0, min(z0 + 4, 9))) for z0 in range(0, 9, 4)])
    np.testing.assert_array_equal(tiles, whole)
    g = BSplineField.from_dict(f.to_dict())
    np.testing.assert_array_equal(g.evaluate(), whole)


def test_centred_map_puts_shrunk_samples_on_their_full_resolution_voxels():
    # shrunk voxel j sits at full index o + s*j, where t must be S*j/(M-1)
    n, s, spans = 24, 4, 5
    o, m = shrink_grid(n, s)
    amap = axis_map(n, spans, shrink=s, mode="centred")
    np.testing.assert_allclose(amap.t(o + s * np.arange(m)), spans * np.arange(m) / (m - 1))
