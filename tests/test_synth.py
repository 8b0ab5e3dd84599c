"""Generated stacks: the phantom and the MNI152 anatomy share one bias family and one ground-truth layout."""

import json
import shutil

import numpy as np
import pytest

from octn4.anatomy import MNI152_FILES, data_dir, mni152_maps
from octn4.errors import InputError
from octn4.io import open_volume
from octn4.synth import SynthParams, synth_stack


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


def test_the_bias_does_not_depend_on_the_anatomy(tmp_path):
    a = synth_stack(tmp_path / "a", SynthParams(shape=(24, 48, 48), n_sections=3, seed=4))
    b = synth_stack(tmp_path / "b", SynthParams(shape=(24, 48, 48), n_sections=3, seed=4, anatomy="mni152"))
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
