"""The depth model (stack curve + shrunk per-section deviations), its place in the fields, and the gain anchor."""

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from octn4 import defaults
from octn4.bias import read_bias
from octn4.bspline import BSplineField, axis_map
from octn4.cli import main
from octn4.depth import fit_depth_profiles, plane_log_medians
from octn4.gains import GainParams, drift_correction, histogram_offsets, level_bridged_runs, log_histogram
from octn4.global_stage import harmonise_gains
from octn4.io import open_volume, read_attrs
from octn4.sections import section_bounds
from octn4.synth import SynthParams, synth_stack


def read(path):
    v = open_volume(path)
    return v.read(0, v.shape[0])


def _confocal(d, focus, rayleigh, mu):
    return -mu * d - np.log1p(((d - focus) / rayleigh) ** 2)


def _section_rms(profile, truth, bounds, weights):
    out = []
    for a, b in bounds:
        w = weights[a:b]
        r = (profile - truth)[a:b]
        r = r - np.average(r, weights=w)
        out.append(float(np.sqrt(np.average(r ** 2, weights=w))))
    return np.array(out)


def test_depth_model_recovers_confocal_profiles_that_differ_between_sections():
    """Per-plane medians = confocal profile (focus and Rayleigh range per section) + gain + an anatomy walk."""
    rng = np.random.default_rng(3)
    bounds = section_bounds(8 * 20, n_sections=8)
    d = np.concatenate([np.arange(b - a) + 0.5 for a, b in bounds])
    sec = np.repeat(np.arange(8), 20)
    focus, rayl, mu = rng.uniform(4, 12, 8), rng.uniform(5, 10, 8), rng.uniform(0.02, 0.06, 8)
    truth = _confocal(d, focus[sec], rayl[sec], mu[sec])
    anatomy = np.cumsum(rng.normal(0, 0.005, d.size))              # slow, not periodic with the sections
    y = truth + rng.normal(0, 0.3, 8)[sec] + anatomy + rng.normal(0, 0.003, d.size)
    n = np.full(d.size, 5000)
    fit = fit_depth_profiles(y, n, bounds)
    rms = _section_rms(fit["profile"], truth, bounds, n.astype(float))
    assert rms.max() < 0.03, rms
    # each section keeps its own level out of the profile (the gains' business): zero mean per section
    for a, b in bounds:
        assert abs(np.mean(fit["profile"][a:b])) < 1e-9
    # a single straight line would not do: the curve is what the model is for
    line = np.concatenate([np.polyval(np.polyfit(d[a:b], y[a:b], 1), d[a:b]) for a, b in bounds])
    assert _section_rms(line, truth, bounds, n.astype(float)).max() > 3 * rms.max()


def test_a_section_with_little_tissue_follows_the_stack_curve():
    """A cap (its planes hold 2 % of a full plane) and an outlying plane do not get a profile of their own."""
    rng = np.random.default_rng(4)
    bounds = section_bounds(6 * 16, n_sections=6)
    d = np.concatenate([np.arange(b - a) + 0.5 for a, b in bounds])
    truth = _confocal(d, 6.0, 7.0, 0.03)
    y = truth + rng.normal(0, 0.004, d.size)
    n = np.full(d.size, 10000)
    n[:16] = 200                                                    # section 0: a cap
    y[:16] += rng.normal(0, 0.4, 16)                                # ... whose few pixels say little
    y[40] += 2.0                                                    # a bubble in one plane of section 2
    fit = fit_depth_profiles(y, n, bounds)
    rms = _section_rms(fit["profile"], truth, bounds, np.ones(d.size))
    assert rms[0] < 0.12, rms
    assert rms[2] < 0.02, rms
    # without the shrinkage the cap follows its own noise
    loose = fit_depth_profiles(y, n, bounds, prior=1e-9)
    assert _section_rms(loose["profile"], truth, bounds, np.ones(d.size))[0] > rms[0]


def test_too_little_data_gives_no_profile_rather_than_a_guess():
    bounds = [(0, 4), (4, 8)]
    fit = fit_depth_profiles(np.full(8, np.nan), np.zeros(8), bounds)
    assert np.array_equal(fit["profile"], np.zeros(8))


def test_plane_log_medians_against_numpy():
    rng = np.random.default_rng(0)
    planes = rng.gamma(2.0, 1.0, (3, 10, 12)).astype(np.float32)
    mask = rng.random((3, 10, 12)) > 0.5
    mask[2] = False
    med, n = plane_log_medians(planes, mask)
    for k in range(2):
        assert med[k] == pytest.approx(np.median(np.log(planes[k][mask[k]])))
        assert n[k] == mask[k].sum()
    assert np.isnan(med[2]) and n[2] == 0


def test_a_field_carries_its_depth_profile_through_evaluation_and_json():
    shape = (6, 8, 9)
    maps = tuple(axis_map(k, 1) for k in shape)
    coeffs = np.random.default_rng(1).normal(0, 0.1, (4, 4, 4))
    prof = np.linspace(-0.3, 0.2, 6)
    plain = BSplineField(coeffs, 3, shape, maps)
    fld = plain.with_z_profile(prof)
    np.testing.assert_allclose(fld.evaluate(), plain.evaluate() + prof[:, None, None].astype(np.float32), atol=1e-6)
    np.testing.assert_allclose(fld.evaluate([1, 4], [0, 7], [2]),
                               plain.evaluate([1, 4], [0, 7], [2]) + prof[[1, 4], None, None], atol=1e-6)
    back = BSplineField.from_dict(json.loads(json.dumps(fld.to_dict())))
    np.testing.assert_array_equal(back.evaluate(), fld.evaluate())
    assert BSplineField.from_dict(plain.to_dict()).z_profile is None
    with pytest.raises(ValueError, match="needs 6 values"):
        plain.with_z_profile(np.zeros(5))


# --------------------------------------------------------------------------- gain anchor


def _bimodal(centre, white_fraction, n, rng):
    grey = rng.normal(centre, 0.08, int(n * (1 - white_fraction)))
    white = rng.normal(centre + 0.75, 0.08, int(n * white_fraction))
    return log_histogram(np.concatenate([grey, white]))


def test_histogram_offsets_find_planted_shifts_whatever_the_mix_of_tissue():
    """Sections with 5-60 % white matter: each is matched peak to peak, not by its mean."""
    rng = np.random.default_rng(5)
    shifts = np.array([0.0, 0.12, -0.08, 0.2, -0.15, 0.05])
    white = np.array([0.05, 0.6, 0.3, 0.45, 0.1, 0.5])
    hists = [_bimodal(s, w, 40000, rng) for s, w in zip(shifts, white)]
    got = histogram_offsets(hists, np.zeros(6))
    np.testing.assert_allclose(got - got.mean(), shifts - shifts.mean(), atol=0.01)
    # with the gains already known, nothing is left to find
    np.testing.assert_allclose(histogram_offsets(hists, shifts), 0, atol=0.01)


def test_drift_correction_takes_the_slow_part_only():
    centres = np.arange(6) * 20.0 + 10
    ramp = 0.05 * np.arange(6)
    noise = np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])
    corr = drift_correction(ramp + noise, centres, np.ones(6))
    np.testing.assert_allclose(corr, ramp - ramp.mean(), atol=0.02)
    many = np.arange(40) * 10.0
    wave = 0.2 * np.sin(many / many.max() * np.pi)
    corr = drift_correction(wave + 0.01 * np.sin(7.3 * many), many, np.ones(40), sections_per_span=8)
    assert np.abs(corr - (wave - wave.mean())).max() < 0.015
    # offsets that scatter without a drift (the sections' make-up moves their histograms) are left alone
    rng = np.random.default_rng(1)
    assert np.abs(drift_correction(rng.normal(0, 0.05, 6), centres, np.ones(6))).max() < 0.02


def _flat_record(index, z0, z1, shape, hist):
    maps = tuple(axis_map(n, 1, shrink=1) for n in (z1 - z0,) + shape[1:])
    fld = BSplineField(np.zeros((4, 4, 4)), 3, (z1 - z0,) + shape[1:], maps)
    return {"index": index, "z_start": z0, "z_stop": z1, "field": fld.to_dict(), "histogram": hist,
            "fit": {"fit_voxels": (z1 - z0) * shape[1] * shape[2], "shrink": [1, 1, 1]}}


def test_the_anchor_removes_a_ramp_that_the_boundary_chain_integrates(tmp_path):
    """Every boundary reads 0.06 too high (a systematic end error): the chain ramps, the anchor does not."""
    from test_quality import _write

    rng = np.random.default_rng(9)
    shape = (48, 96, 96)
    bounds = section_bounds(shape[0], n_sections=6)
    yy, xx = np.mgrid[:96, :96]
    tissue = (yy - 47.5) ** 2 + (xx - 47.5) ** 2 < 40 ** 2
    sec = np.repeat(np.arange(6), 8)
    ramp = 0.06 * sec                                  # what the section fields left: a step of 0.06 at each cut
    clean = np.where(tissue, 1.0 + 1.1 * (xx > 48), 0.1)
    vol = (clean[None] * rng.gamma(6.0, 1 / 6.0, shape) * np.exp(ramp)[:, None, None]).astype(np.float32)
    v = _write(tmp_path / "v.ome.zarr", vol)
    m = _write(tmp_path / "m.ome.zarr", np.broadcast_to(tissue, shape).astype(np.uint8))
    hists = []
    for a, b in bounds:            # what a section task records: its fit grid's corrected log intensities
        blocks = vol[a:b].reshape(b - a, 24, 4, 24, 4).mean((2, 4))
        inside = tissue.reshape(24, 4, 24, 4).all((1, 3))
        hists.append(log_histogram(np.log(blocks[:, inside])))
    records = [_flat_record(i, a, b, shape, h) for i, ((a, b), h) in enumerate(zip(bounds, hists))]
    want = ramp[[a for a, _ in bounds]] - ramp.mean()
    for anchor in ("none", "histogram"):
        out, _ = harmonise_gains(v, m, records, params=GainParams(estimator="touching", anchor=anchor))
        got = np.array([r["gain_log"] for r in out])
        assert np.abs(got - want).max() < 0.03, (anchor, got, want)     # a real ramp in the data is kept
    # now the sections' data are flat, but the chain is told every boundary steps by 0.06
    flat = (clean[None] * rng.gamma(6.0, 1 / 6.0, shape)).astype(np.float32)
    v2 = _write(tmp_path / "v2.ome.zarr", flat)
    hists = []
    for a, b in bounds:
        blocks = flat[a:b].reshape(b - a, 24, 4, 24, 4).mean((2, 4))
        hists.append(log_histogram(np.log(blocks[:, tissue.reshape(24, 4, 24, 4).all((1, 3))])))
    for i, (a, b) in enumerate(bounds):   # section fields that are 0.03 off at each end (tilted by 0.06)
        maps = tuple(axis_map(n, 1, shrink=1) for n in (b - a,) + shape[1:])
        tilt = BSplineField(np.zeros((4, 4, 4)), 3, (b - a,) + shape[1:], maps).plus_depth_line(-0.06 / 7, 0.03)
        records[i] = dict(_flat_record(i, a, b, shape, hists[i]), field=tilt.to_dict())
    chained, _ = harmonise_gains(v2, m, records, params=GainParams(estimator="touching", anchor="none"))
    anchored, _ = harmonise_gains(v2, m, records, params=GainParams(estimator="touching", anchor="histogram"))
    g_chain = np.array([r["gain_log"] for r in chained])
    g_anchor = np.array([r["gain_log"] for r in anchored])
    assert abs(g_chain[-1] - g_chain[0]) > 0.2                         # the chain integrates the end errors
    assert np.abs(g_anchor).max() < 0.03, g_anchor                      # the histograms hold the level


# --------------------------------------------------------------------------- in the pipeline


def test_the_mask_stage_records_the_statistics_the_depth_model_reads(small_stack, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(small_stack / "volume.ome.zarr"), str(out), "--sections", "3", "-q"]) == 0
    attrs = read_attrs(out / "mask.ome.zarr")
    vol, mask = read(small_stack / "volume.ome.zarr"), read(out / "mask.ome.zarr") > 0
    # tissue by intensity: mask voxels whose value, smoothed within its plane, is above the plane's threshold
    thr = np.array([-np.inf if t is None else t for t in attrs["plane_thresholds"]], np.float32)
    sigma = defaults.MASK.smoothing_sigma
    above = ndi.gaussian_filter(vol, (0, sigma, sigma), mode="reflect", truncate=4.0) > thr[:, None, None]
    above = ndi.binary_erosion(above, structure=ndi.generate_binary_structure(3, 1) * [[[0]], [[1]], [[0]]],
                               border_value=1)
    med, n = plane_log_medians(vol, mask & above)
    assert 0 < n.sum() < mask.sum()
    np.testing.assert_allclose(np.array(attrs["plane_log_median"], float), med, rtol=1e-6)
    assert attrs["plane_tissue_pixels"] == n.tolist()
    fields = json.loads((out / "fields.json").read_text())
    assert all(len(s["field"]["z_profile"]) == s["z_stop"] - s["z_start"] for s in fields["sections"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["parameters"]["section_n4"]["depth_model"] == "curve"
    assert metrics["provenance"]["parameters"]["gains"]["anchor"] == "histogram"


@pytest.mark.slow
def test_a_whole_brain_cap_gets_a_bounded_field(tmp_path):
    """Cap to cap, confocal: the first and last sections' footprints grow from almost nothing."""
    stack = synth_stack(tmp_path / "stack", SynthParams(shape=(48, 96, 96), n_sections=4, seed=3,
                                                         profile="confocal", extent="whole"))
    out = tmp_path / "run"
    assert main(["run", str(stack / "volume.ome.zarr"), str(out), "--sections", "4", "--workers", "2", "-q"]) == 0
    tissue = read(stack / "labels.ome.zarr") > 0
    e = np.log(read_bias(out).astype(np.float64)) - np.log(read(stack / "truth_bias.ome.zarr"))
    e -= e[tissue].mean()
    planes = [z for z in range(48) if tissue[z].sum() >= 20]
    worst_plane = max(abs(float(e[z][tissue[z]].mean())) for z in planes)
    assert worst_plane < 0.3, worst_plane
    assert float(np.sqrt(np.mean(e[tissue] ** 2))) < 0.08


@pytest.mark.slow
def test_planted_gains_are_recovered_on_a_confocal_stack(tmp_path):
    """Confocal gate x attenuation, focus and Rayleigh range per section, gains of SD 0.3 log: after the
    whole pipeline every section's mean log-bias error is within 2 % of the truth's (a constant removed)."""
    stack = synth_stack(tmp_path / "stack", SynthParams(shape=(48, 128, 128), n_sections=4, seed=11,
                                                         profile="confocal", gain_sigma=0.3))
    out = tmp_path / "run"
    assert main(["run", str(stack / "volume.ome.zarr"), str(out), "--sections", "4", "--workers", "2", "-q"]) == 0
    tissue = read(stack / "labels.ome.zarr") > 0
    e = np.log(read_bias(out).astype(np.float64)) - np.log(read(stack / "truth_bias.ome.zarr"))
    e -= e[tissue].mean()
    bounds = json.loads((stack / "synth.json").read_text())["sections"]
    per_section = np.array([e[a:b][tissue[a:b]].mean() for a, b in bounds])
    assert np.abs(np.exp(per_section) - 1).max() < 0.02, per_section
    planted = np.array(json.loads((stack / "synth.json").read_text())["gains_log"])
    assert np.ptp(planted) > 0.3                                     # the gains were there to be found


def test_a_mask_that_bleeds_into_a_damaged_section_does_not_fool_the_gains(tmp_path):
    """The mask's Z smoothing and closing carry section 2's tissue into section 1's last plane, where
    section 1 (damaged) has agarose: the touching planes use tissue by intensity, so the step is the gain's."""
    from octn4.io import OmeZarrWriter

    rng = np.random.default_rng(2)
    shape = (24, 96, 96)
    bounds = section_bounds(shape[0], n_sections=3)
    yy, xx = np.mgrid[:96, :96]
    full = (yy - 47.5) ** 2 + (xx - 47.5) ** 2 < 40 ** 2
    disc = (yy - 47.5) ** 2 + (xx - 47.5) ** 2 < 20 ** 2
    tissue = np.broadcast_to(full, shape).copy()
    tissue[8:16] = disc                                            # section 1 kept only a small disc
    planted = np.array([0.0, 0.2, -0.1])
    gain = np.repeat(planted, 8)
    clean = np.where(tissue, 1.0, 0.12)
    vol = (clean * rng.gamma(6.0, 1 / 6.0, shape) * np.exp(gain)[:, None, None]).astype(np.float32)
    mask = tissue.copy()
    mask[14:16] = full                                             # the bleed
    thresholds = [float(np.exp(np.log(0.35) + g)) for g in gain]  # between agarose and tissue, per plane
    paths = {}
    for name, arr, attrs in (("v", vol, {}), ("m", mask.astype(np.uint8), {"plane_thresholds": thresholds})):
        w = OmeZarrWriter(tmp_path / f"{name}.ome.zarr", shape, (0.05, 0.05, 0.05), dtype=arr.dtype,
                          reduce="max" if arr.dtype == np.uint8 else "mean", attrs=attrs)
        w.write(0, arr)
        w.commit()
        paths[name] = open_volume(tmp_path / f"{name}.ome.zarr")
    records = [_flat_record(i, a, b, shape, None) for i, (a, b) in enumerate(bounds)]
    # no smoothing: this is about which pixels count, not about speckle (a small footprint smoothed by
    # 8 pixels takes in the agarose around it: docs/QUALITY.md, what is not met)
    params = GainParams(estimator="touching", smoothing_px=0.0)
    out, report = harmonise_gains(paths["v"], paths["m"], records, params=params)
    got = np.array([r["gain_log"] for r in out])
    w = np.array([tissue[a:b].sum() for a, b in bounds], float)
    want = planted - np.average(planted, weights=[r["fit"]["fit_voxels"] for r in records])
    assert np.abs(np.diff(got) - np.diff(want)).max() < 0.05, (got, want, report)   # unsmoothed: noise ~0.035
    assert report[1]["shared_tissue_pixels"] < 0.3 * full.sum()   # only the disc is shared at the second cut
    assert w[1] < 0.3 * w[0]
    # without the thresholds (a mask from elsewhere) the bleed is taken for tissue, and the step is wrong
    bare = OmeZarrWriter(tmp_path / "m2.ome.zarr", shape, (0.05, 0.05, 0.05), dtype=np.uint8, reduce="max")
    bare.write(0, mask.astype(np.uint8))
    bare.commit()
    out2, _ = harmonise_gains(paths["v"], open_volume(tmp_path / "m2.ome.zarr"), records, params=params)
    assert abs(np.diff([r["gain_log"] for r in out2])[1] - np.diff(want)[1]) > 0.5


def test_runs_split_by_bridged_boundaries_are_levelled_by_their_histograms():
    """A damaged section bridges both its boundaries: the chain knows nothing of the three runs' levels."""
    rng = np.random.default_rng(8)
    planted = np.array([0.0, 0.1, 0.35, 0.25, 0.3])        # sections 0-1 | 2 | 3-4 (section 2 is damaged)
    white = [0.3, 0.4, 0.1, 0.5, 0.35]
    sizes = [40000, 40000, 3000, 40000, 40000]
    hists = [_bimodal(g, w, n, rng) for g, w, n in zip(planted, white, sizes)]
    chained = np.array([0.0, 0.1, 0.1, 0.1, 0.15])          # measured steps inside runs, bridges assumed flat
    bridged = [False, True, True, False]
    got = chained + level_bridged_runs(hists, chained, bridged, sizes)
    np.testing.assert_allclose(got - got[0], planted - planted[0], atol=0.02)
    # nothing bridged: nothing to level
    assert np.array_equal(level_bridged_runs(hists, chained, [False] * 4, sizes), np.zeros(5))
