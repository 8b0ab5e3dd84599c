"""Generated stacks: two anatomies, two extents, four depth-profile families, one ground-truth layout.

The profiles are checked against direct NumPy constructions of their
formulas (docs/QUALITY.md gives the physics).
"""

import json
import shutil

import numpy as np
import pytest

from octn4.anatomy import MNI152_FILES, data_dir, mni152_maps
from octn4.errors import InputError
from octn4.io import open_volume
from octn4.synth import SynthParams, _Design, synth_stack


def read(path):
    v = open_volume(path)
    return v.read(0, v.shape[0])


@pytest.mark.parametrize("anatomy", ["phantom", "mni152"])
def test_stack_is_clean_times_speckle_times_bias(tmp_path, anatomy):
    out = synth_stack(tmp_path / "s", SynthParams(shape=(24, 48, 48), n_sections=3, seed=1, anatomy=anatomy))
    vol, bias, clean, labels = (read(out / f"{n}.ome.zarr") for n in ("volume", "truth_bias", "clean", "labels"))
    speckle = vol / (clean * bias)
    assert 0.9 < float(np.mean(speckle)) < 1.1                       # gamma speckle of mean 1
    assert set(np.unique(labels)) == {0, 1, 2}
    # white brighter than grey brighter than agarose, in the clean volume
    med = [np.median(clean[labels == k]) for k in (0, 1, 2)]
    assert med[0] < med[1] < med[2]
    assert json.loads((out / "synth.json").read_text())["params"]["anatomy"] == anatomy


@pytest.mark.parametrize("profile", ["beer-lambert", "confocal"])
def test_the_bias_does_not_depend_on_the_anatomy(tmp_path, profile):
    a = synth_stack(tmp_path / "a", SynthParams(shape=(24, 48, 48), n_sections=3, seed=4, profile=profile))
    b = synth_stack(tmp_path / "b", SynthParams(shape=(24, 48, 48), n_sections=3, seed=4, anatomy="mni152",
                                                profile=profile))
    np.testing.assert_array_equal(read(a / "truth_bias.ome.zarr"), read(b / "truth_bias.ome.zarr"))


def test_mni152_maps_are_checked(tmp_path):
    gm, wm = mni152_maps()
    assert gm.shape == wm.shape == (197, 233, 189) and 0 <= gm.min() and wm.max() <= 1
    bad = tmp_path / "mni152"
    shutil.copytree(data_dir() / "mni152", bad)
    path = bad / MNI152_FILES["wm"][0].rsplit("/", 1)[1]
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(InputError, match="checksum mismatch"):
        mni152_maps(bad)


def test_unknown_anatomy_is_refused(tmp_path):
    with pytest.raises(InputError, match="anatomy must be one of"):
        synth_stack(tmp_path / "x", SynthParams(anatomy="mouse"))


def _depth_mm(bounds, dz):
    return np.concatenate([(np.arange(b - a) + 0.5) * dz for a, b in bounds])


def _sections(bounds):
    return np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(bounds)])


@pytest.mark.parametrize("planes", [None, (5, 9, 6, 8)])
def test_confocal_profile_is_the_lorentzian_gate_times_the_attenuation(tmp_path, planes):
    """confocal / beer-lambert = 1 / (1 + ((d - f_s) / r_s)^2), with f_s and r_s recorded per section."""
    kw = dict(shape=(28, 40, 40), n_sections=4, seed=6, planes=planes, voxel_size=(0.005, 0.01, 0.01))
    a = synth_stack(tmp_path / "a", SynthParams(**kw))
    c = synth_stack(tmp_path / "c", SynthParams(profile="confocal", **kw))
    meta = json.loads((c / "synth.json").read_text())
    bounds = meta["sections"]
    if planes:
        assert [b - a for a, b in bounds] == list(planes)
    d, sec = _depth_mm(bounds, 0.005), _sections(bounds)
    f, r = np.array(meta["focus_depth_mm"])[sec], np.array(meta["rayleigh_range_mm"])[sec]
    want = -np.log1p(((d - f) / r) ** 2)
    got = np.log(read(c / "truth_bias.ome.zarr").astype(np.float64)) - np.log(read(a / "truth_bias.ome.zarr"))
    np.testing.assert_allclose(got, np.broadcast_to(want[:, None, None], got.shape), atol=2e-6)
    # the focus lies inside each section (a fraction of the mean thickness below the cut)
    thick = 28 / 4 * 0.005
    assert np.all((np.array(meta["focus_depth_mm"]) >= 0.2 * thick) & (np.array(meta["focus_depth_mm"]) <= 0.6 * thick))


@pytest.mark.parametrize("anatomy", ["phantom", "mni152"])
def test_tissue_attenuation_integrates_along_each_a_line(tmp_path, anatomy):
    """tissue / beer-lambert = exp(-mu_s * (optical depth - depth)), the optical depth summed from the cut."""
    kw = dict(shape=(24, 40, 40), n_sections=3, seed=2, anatomy=anatomy)
    a = synth_stack(tmp_path / "a", SynthParams(**kw))
    t = synth_stack(tmp_path / "t", SynthParams(profile="tissue", **kw))
    meta = json.loads((t / "synth.json").read_text())
    p = SynthParams(**kw)
    bounds, mu = meta["sections"], np.array(meta["attenuation_per_mm"])
    labels = read(t / "labels.ome.zarr").astype(np.int64)
    if anatomy == "phantom":
        rel = np.array([p.agarose_attenuation, 1.0, p.white_attenuation])[labels]
    else:   # partial volumes: the grey and white probabilities the stack was made from
        gm, wm = _Design(p).mni
        rel = p.agarose_attenuation * np.clip(1 - gm - wm, 0, 1) + gm + p.white_attenuation * wm
    dz = p.voxel_size[0]
    optical = np.empty_like(rel, dtype=np.float64)
    for a0, b0 in bounds:
        csum = np.cumsum(rel[a0:b0], axis=0) * dz
        optical[a0:b0] = csum - 0.5 * dz * rel[a0:b0]
    sec = _sections(bounds)
    depth = _depth_mm(bounds, dz)
    want = -mu[sec][:, None, None] * (optical - depth[:, None, None])
    got = np.log(read(t / "truth_bias.ome.zarr").astype(np.float64)) - np.log(read(a / "truth_bias.ome.zarr"))
    np.testing.assert_allclose(got, want, atol=2e-5)
    # white matter decays faster: deep in a section, white voxels carry a lower bias than grey ones
    last = bounds[0][1] - 1
    assert got[last][labels[last] == 2].mean() < got[last][labels[last] == 1].mean()


@pytest.mark.parametrize("anatomy", ["phantom", "mni152"])
def test_a_whole_brain_runs_from_cap_to_cap(tmp_path, anatomy):
    out = synth_stack(tmp_path / "w", SynthParams(shape=(32, 48, 48), n_sections=4, seed=1, anatomy=anatomy,
                                                  extent="whole"))
    tissue = (read(out / "labels.ome.zarr") > 0).reshape(32, -1).sum(1)
    middle = tissue[12:20].mean()
    assert tissue[0] < 0.1 * middle and tissue[-1] < 0.15 * middle      # almost nothing at each end
    assert tissue[3] < tissue[7] < middle                                 # the footprint grows across the cap


def test_a_damaged_section_keeps_a_small_disc_of_tissue(tmp_path):
    kw = dict(shape=(24, 48, 48), n_sections=3, seed=3)
    whole = read(synth_stack(tmp_path / "a", SynthParams(**kw)) / "labels.ome.zarr") > 0
    hurt = read(synth_stack(tmp_path / "b", SynthParams(damaged_section=1, **kw)) / "labels.ome.zarr") > 0
    assert np.array_equal(whole[:8], hurt[:8]) and np.array_equal(whole[16:], hurt[16:])
    frac = hurt[8:16].sum() / (8 * 48 * 48)
    assert 0 < frac <= 0.06
    assert (hurt[8:16] <= whole[8:16]).all()


def test_new_families_are_checked(tmp_path):
    with pytest.raises(InputError, match="depth profile must be one of"):
        synth_stack(tmp_path / "x", SynthParams(profile="gaussian"))
    with pytest.raises(InputError, match="extent must be one of"):
        synth_stack(tmp_path / "y", SynthParams(extent="half"))
    with pytest.raises(InputError, match="damaged section 7"):
        synth_stack(tmp_path / "z", SynthParams(damaged_section=7))
