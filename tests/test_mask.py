"""The tissue mask against a plain scipy / scikit-image construction of the same recipe."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk

from octn4._backend import to_numpy
from octn4.mask import MaskParams, otsu_threshold, tissue_mask, write_tissue_mask
from octn4.reference import compute_tissue_mask
from octn4.sections import section_bounds


def reference_mask(vol, bounds, p: MaskParams):
    """The SPEC recipe written the obvious way, one plane at a time.

    Otsu runs in float64: scikit-image accumulates a float32 input in float32,
    which can move the threshold by a bin where the criterion is flat.
    """
    sm = ndi.gaussian_filter(vol.astype(np.float32), (p.smoothing_sigma_z, p.smoothing_sigma, p.smoothing_sigma))
    out = np.zeros(vol.shape, bool)
    for z0, z1 in bounds:
        pos = sm[z0:z1][sm[z0:z1] > 0]
        thr = threshold_otsu(pos.astype(np.float64)) if pos.size >= p.min_voxels else -np.inf
        for z in range(z0, z1):
            out[z] = closing(ndi.binary_fill_holes(sm[z] > thr), disk(p.closing_radius), mode="ignore")
    if len(bounds) > 1:
        k = p.z_closing_planes
        out = closing(out, np.ones((2 * k + 1, 1, 1), bool), mode="ignore")
    return out


def stack(seed=0, shape=(30, 48, 52)):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    tissue = (x - 0.2 * z) ** 2 + y ** 2 < 0.5          # oblique footprint
    tissue &= ~((np.abs(x) < 0.08) & (np.abs(y) < 0.08))  # a hole to fill
    vol = np.where(tissue, 1.0, 0.1) * np.exp(-0.8 * ((z + 1) % 0.67)) * rng.gamma(4, 0.25, shape)
    return vol.astype(np.float32), tissue


def test_otsu_matches_scikit_image(xp):
    v = np.random.default_rng(0).gamma(2, 1, 5000).astype(np.float32)
    assert otsu_threshold(xp.asarray(v)) == pytest.approx(threshold_otsu(v), rel=1e-6)
    assert otsu_threshold(xp.asarray(np.full(10, 3.0))) == 3.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_counts_the_bins_of_the_plain_formula(dtype):
    """The host histogram (in place, unweighted) gives the bins of the formula every backend uses."""
    from octn4.mask import _histogram

    v = np.random.default_rng(1).gamma(2, 100, 200_000).astype(dtype)
    lo, hi = float(v.min()), float(v.max())
    idx = np.clip(np.floor((v - lo) / ((hi - lo) / 256)).astype(np.int64), 0, 255)
    want = np.bincount(idx, weights=np.ones(idx.shape), minlength=256)
    got = _histogram(v, lo, hi, 256)
    assert got.dtype == np.float64 and np.array_equal(got, want) and got.sum() == v.size
    assert got[0] > 0 and got[-1] > 0                   # the range's two ends are counted in its end bins


@pytest.mark.parametrize("n_sections", [1, 3])
def test_mask_matches_plain_construction(xp, n_sections):
    vol, _ = stack()
    bounds = section_bounds(vol.shape[0], n_sections=n_sections)
    got = to_numpy(tissue_mask(xp.asarray(vol), bounds))
    want = reference_mask(vol, bounds, MaskParams())
    assert (got != want).sum() == 0


def test_mask_finds_the_tissue():
    vol, tissue = stack()
    m = tissue_mask(vol, section_bounds(vol.shape[0], n_sections=3))
    assert (m & tissue).sum() / tissue.sum() > 0.95
    assert (m & ~tissue).sum() / m.sum() < 0.1


class _Reader:
    def __init__(self, a):
        self.a, self.shape = a, a.shape

    def read(self, z0, z1):
        return self.a[z0:z1]


class _Sink:
    def __init__(self, shape):
        self.out = np.zeros(shape, np.uint8)

    def write(self, z0, block):
        self.out[z0:z0 + block.shape[0]] = block


@pytest.mark.parametrize("slab", [3, 16])
@pytest.mark.parametrize("params", [MaskParams(), MaskParams(smoothing_sigma_z=2.5, z_closing_planes=4),
                                    MaskParams(method="depth")])
def test_streamed_mask_equals_in_memory_mask(params, slab):
    vol, _ = stack(seed=1, shape=(40, 40, 40))
    bounds = section_bounds(40, planes=[9, 12, 5, 14])
    sink = _Sink(vol.shape)
    write_tissue_mask(_Reader(vol), bounds, sink, params=params, slab=slab)
    np.testing.assert_array_equal(sink.out.astype(bool), tissue_mask(vol, bounds, params=params))


class _Stats:
    def __init__(self):
        self.calls = []

    def __call__(self, z0, planes, tissue):
        self.calls.append((z0, np.array(planes), np.array(tissue)))


@pytest.mark.parametrize("slab", [3, 16])
@pytest.mark.parametrize("planes", [[9, 12, 5, 14], [40], [2, 29, 2, 7]])
@pytest.mark.parametrize("method", ["reference", "depth"])
def test_mask_from_kept_smoothed_planes_equals_the_mask_smoothed_twice(method, planes, slab, tmp_path):
    """With a scratch directory each section is smoothed once (its threshold pass keeps the planes its mask
    pass needs, neighbours' halo included): the same mask, thresholds and per-plane statistics, bit for bit,
    and the scratch is left empty."""
    params = MaskParams(method=method)
    vol, _ = stack(seed=2, shape=(40, 36, 44))
    bounds = section_bounds(40, planes=planes)
    runs = []
    for scratch in (None, tmp_path / "scratch"):
        sink, stats = _Sink(vol.shape), _Stats()
        thr = write_tissue_mask(_Reader(vol), bounds, sink, params=params, slab=slab, plane_stats=stats,
                                scratch=scratch)
        runs.append((sink.out, thr, stats.calls))
    (want, want_thr, want_stats), (got, got_thr, got_stats) = runs
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_thr, want_thr)
    assert 0.05 < want.mean() < 0.95                      # a mask with both classes, not all tissue
    assert [c[0] for c in got_stats] == [c[0] for c in want_stats]
    for (_, p1, t1), (_, p2, t2) in zip(got_stats, want_stats):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(t1, t2)
    assert list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.parametrize("k", [1, 2, 3])
def test_z_closing_bridges_gaps_of_up_to_2k_planes(k):
    """Guards: the Z closing's half-height is in planes (the system octn4 grew from called it sections).  A
    closing with a (2k+1)-plane element fills a gap of 2k planes and leaves one of 2k + 1 open; the old
    check (``closing only adds voxels``) held for any closing, one that ignored k included."""
    p = dict(smoothing_sigma=0, smoothing_sigma_z=0, closing_radius=0)
    for gap, filled in ((2 * k, True), (2 * k + 1, False)):
        vol = np.full((24, 20, 20), 0.1, np.float32)
        vol[:, 5:15, 5:15] = 1.0
        vol[8:8 + gap, 5:15, 5:15] = 0.1                         # the tissue is missing from `gap` planes
        m = tissue_mask(vol, section_bounds(24, n_sections=2), params=MaskParams(z_closing_planes=k, **p))
        assert m[8:8 + gap, 5:15, 5:15].all() == filled, (k, gap)
        assert not m[:, :5].any()                                # agarose stays out
        legacy = compute_tissue_mask(vol, n_serial_slices=2, z_closing_planes=k, smoothing_sigma=0,
                                     smoothing_sigma_z=0, closing_radius=0)
        np.testing.assert_array_equal(legacy, m)                  # the reference signature counts planes too


def test_sparse_section_is_all_tissue():
    vol = np.zeros((6, 10, 10), np.float32)
    vol[:, 5, 5] = 1.0   # 6 positive voxels: fewer than min_voxels=100
    assert tissue_mask(vol, [(0, 6)], params=MaskParams(smoothing_sigma=0, smoothing_sigma_z=0)).all()


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="closing_radius"):
        MaskParams(closing_radius=-1)


def test_plane_thresholds_in_one_batch_equal_the_plane_by_plane_ones():
    """The batched log-Otsu of every plane of a slab (one host read per slab on a device) gives each plane's own
    threshold to the last bit, including planes with too few positive voxels, a constant plane and an empty one."""
    from octn4.mask import _log_plane_threshold, _log_plane_thresholds

    rng = np.random.default_rng(4)
    planes = rng.gamma(2.0, 1.0, (9, 40, 50)).astype(np.float32)
    planes[1] = 0                                   # no positive voxel
    planes[2] = 2.5                                 # constant
    planes[3, :, 5:] = 0                            # 200 positive voxels only
    planes[4] *= rng.random((40, 50)) > 0.5         # half of them
    planes[5] = np.where(planes[5] > 2, 40.0, planes[5])
    params = MaskParams(min_voxels=300)
    got = _log_plane_thresholds(planes, params)
    want = np.array([_log_plane_threshold(p, params) for p in planes])
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[[1, 3]]).all() and got[2] == pytest.approx(np.log(2.5))
    # the host path (plane by plane, positive voxels only) and the batched array-API one agree to the bit
    import array_api_strict as xs

    for p in (params, MaskParams(min_voxels=0)):
        np.testing.assert_array_equal(_log_plane_thresholds(planes, p),
                                      np.asarray(_log_plane_thresholds(xs.asarray(planes), p)))


def test_smoothing_a_slab_of_planes_equals_gaussian_filter_sliced():
    """The Z pass over the block, then Y and X on the kept planes only: gaussian_filter's bits."""
    from octn4.mask import _smooth

    v = np.random.default_rng(6).gamma(2.0, 1.0, (20, 33, 41)).astype(np.float32)
    for p in (MaskParams(), MaskParams(smoothing_sigma_z=0.0), MaskParams(smoothing_sigma=0.0, smoothing_sigma_z=1.5)):
        full = ndi.gaussian_filter(v, (p.smoothing_sigma_z, p.smoothing_sigma, p.smoothing_sigma), mode="reflect",
                                   truncate=4.0)
        np.testing.assert_array_equal(_smooth(v, p), full)
        np.testing.assert_array_equal(_smooth(v, p, keep=(4, 13)), full[4:13])


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0, 5.0])
def test_host_in_plane_smoothing_equals_scipys_passes_bit_for_bit(sigma):
    """The blocked Y pass (float64 row sums in SciPy's order) then SciPy's X pass per block: the bits of
    gaussian_filter1d along Y then X, on planes narrower than the kernel (repeated reflection) as well."""
    from octn4.mask import _smooth_in_plane_host

    rng = np.random.default_rng(7)
    for shape in [(2, 1, 5), (2, 3, 4), (3, 9, 2), (2, 50, 37), (1, 23, 300)]:
        v = (rng.gamma(1.0, 1.0, shape) * rng.choice([1e-3, 1.0, 1e3], size=shape)).astype(np.float32)
        want = v
        for axis in (1, 2):
            want = ndi.gaussian_filter1d(want, sigma, axis=axis, mode="reflect", truncate=4.0)
        got = _smooth_in_plane_host(v, sigma)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        if shape[1] > 8:                                   # blocks of fewer rows than the halo on both sides
            np.testing.assert_array_equal(_smooth_in_plane_host(v, sigma, rows=3), want)


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5])
def test_host_z_smoothing_equals_scipys_pass_bit_for_bit(sigma):
    """The blocked Z pass (float64 plane sums in SciPy's order, the kept planes only) gives the bits of
    gaussian_filter1d along Z, at the block's faces (reflected, more than once in thin blocks) and inside."""
    from octn4.mask import _smooth_z_host

    rng = np.random.default_rng(11)
    for shape, keep in [((24, 9, 7), (4, 20)), ((13, 5, 33), (0, 13)), ((3, 6, 4), (0, 3)), ((20, 11, 3), (5, 20)),
                        ((1, 4, 4), (0, 1))]:
        v = (rng.gamma(1.0, 1.0, shape) * rng.choice([1e-3, 1.0, 1e3], size=shape)).astype(np.float32)
        want = ndi.gaussian_filter1d(v, sigma, axis=0, mode="reflect", truncate=4.0)[keep[0]:keep[1]]
        for rows in (4, 2, 16):
            got = _smooth_z_host(v, sigma, keep, rows=rows)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)


def test_hole_filling_of_a_slab_in_one_labelling_equals_plane_by_plane():
    from scipy import ndimage as ndi

    from octn4.mask import _fill_holes_planewise

    rng = np.random.default_rng(5)
    m = ndi.binary_opening(rng.random((6, 60, 70)) > 0.35, iterations=1)
    cross = ndi.generate_binary_structure(2, 1)
    want = np.stack([ndi.binary_fill_holes(p, structure=cross) for p in m])
    got = _fill_holes_planewise(m)
    np.testing.assert_array_equal(got, want)
    assert (got & ~m).sum() > 0                      # holes were there to fill


def test_streamed_mask_on_the_array_device_equals_numpys(xp):
    """write_tissue_mask with the slabs on ``xp``'s device (CuPy where present) writes NumPy's mask."""
    vol, _ = stack(seed=2, shape=(30, 40, 40))
    bounds = section_bounds(30, planes=[9, 12, 9])
    want, got = _Sink(vol.shape), _Sink(vol.shape)
    write_tissue_mask(_Reader(vol), bounds, want, slab=8)
    write_tissue_mask(_Reader(vol), bounds, got, slab=8, xp=xp)
    np.testing.assert_array_equal(got.out, want.out)


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 4, 5, 7])
def test_disk_closing_by_rectangles_equals_the_generic_closing(radius):
    """The disk is a union of rectangles (exactly), and the closing by running max/min lines equals scipy's
    binary_dilation (border 0) then binary_erosion (border 1) with the disk, voxel for voxel, faces included."""
    from scipy import ndimage as ndi

    from octn4.mask import _disk, _disk_closing, _disk_rectangles

    union = np.zeros((2 * radius + 1,) * 2, bool)
    for h, w in _disk_rectangles(radius):
        union[radius - h:radius + h + 1, radius - w:radius + w + 1] = True
    np.testing.assert_array_equal(union, _disk(radius))
    rng = np.random.default_rng(radius)
    m = rng.random((3, 45, 52)) > 0.8
    m[:, :2, :] = True                                   # tissue at the faces, which must not be eroded
    structure = _disk(radius)[None]
    want = ndi.binary_erosion(ndi.binary_dilation(m, structure=structure, border_value=0), structure=structure,
                              border_value=1)
    got = _disk_closing(m, radius)
    np.testing.assert_array_equal(got, want)
    assert radius == 0 or (got & ~m).any()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_z_closing_by_lines_equals_the_generic_closing(k):
    from scipy import ndimage as ndi

    from octn4.mask import _line_closing

    m = np.random.default_rng(k).random((23, 12, 13)) > 0.6
    m[:2] = True
    structure = np.ones((2 * k + 1, 1, 1), bool)
    want = ndi.binary_erosion(ndi.binary_dilation(m, structure=structure, border_value=0), structure=structure,
                              border_value=1)
    np.testing.assert_array_equal(_line_closing(m, k, axis=0), want)


def test_tissue_by_intensity_erodes_by_the_cross_exactly():
    from scipy import ndimage as ndi

    from octn4.mask import above_in_plane

    rng = np.random.default_rng(9)
    planes = rng.gamma(2.0, 1.0, (4, 30, 31)).astype(np.float32)
    thr = np.array([1.0, 2.0, 3.0, 0.1], np.float32)
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    smoothed = ndi.gaussian_filter(planes, sigma=(0, 1.5, 1.5), mode="reflect", truncate=4.0)
    want = ndi.binary_erosion(smoothed > thr[:, None, None], structure=cross, border_value=1)
    np.testing.assert_array_equal(above_in_plane(planes, thr, 1.5), want)
