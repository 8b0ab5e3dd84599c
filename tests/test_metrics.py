"""The per-plane statistics against NumPy's own reductions."""

import numpy as np
import pytest

from octn4.metrics import PlaneStats, median_in_place


@pytest.mark.parametrize("n", [1, 2, 3, 4, 11, 1000, 1001, 200_000, 200_001])
@pytest.mark.parametrize("kind", ["speckle", "ties"])
def test_the_in_place_median_is_numpys_to_the_last_bit(n, kind):
    rng = np.random.default_rng(n)
    v = rng.gamma(2, 100, n) if kind == "speckle" else rng.integers(0, 4, n)
    v = v.astype(np.float32)
    want = np.median(v)
    got = median_in_place(v.copy())
    assert got == float(want) and isinstance(got, float)


def test_plane_stats_are_the_plain_reductions():
    rng = np.random.default_rng(3)
    vol = rng.gamma(2, 100, (3, 64, 64)).astype(np.float32)
    vol[1, :10] = 0                                      # zeros are not tissue
    tissue = rng.random((3, 64, 64)) < 0.6
    tissue[2] = False                                    # a plane without tissue
    stats = PlaneStats(5)
    stats.add(1, tissue, before=vol, after=vol * 2)
    for k in range(3):
        v = vol[k][tissue[k] & (vol[k] > 0)]
        assert stats.count[1 + k] == tissue[k].sum()
        if not v.size:
            assert np.isnan(stats.median["before"][1 + k]) and stats.sum["before"][1 + k] == 0
            continue
        for name, w in (("before", v), ("after", v * 2)):
            assert stats.median[name][1 + k] == float(np.median(w))
            assert stats.sum[name][1 + k] == float(w.sum(dtype=np.float64))
            assert stats.sumsq[name][1 + k] == float(np.square(w, dtype=np.float64).sum())
    assert np.isnan(stats.median["before"][0]) and np.isnan(stats.median["after"][4])
