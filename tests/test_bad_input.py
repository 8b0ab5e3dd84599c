"""Every bad input: a one-line error naming the file and the problem, exit 2, no output left."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from octn4.cli import main
from octn4.io import OmeZarrWriter

VS = (0.05, 0.05, 0.05)
BIN = Path(__file__).resolve().parent.parent / "bin"


def ome(path, data, vs=VS):
    with OmeZarrWriter(path, data.shape, vs) as w:
        w.write(0, data)
        w.commit()
    return path


def good(shape=(12, 40, 40), seed=0):
    rng = np.random.default_rng(seed)
    v = rng.gamma(4, 0.25, shape).astype(np.float32)
    v[:, 10:30, 10:30] *= 8
    return v


def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def assert_rejected(tmp_path, capsys, inp, problem, extra=(), sections="3", names="input"):
    """``names``: the file the message must name ('input', 'output', a path, or None for a bad option)."""
    out = tmp_path / "out"
    rc, err = run_cli(["run", str(inp), str(out), "--sections", sections, "-q", *extra], capsys)
    assert rc == 2
    assert len(err) == 1, err
    if names is not None:
        expected = {"input": inp, "output": out}.get(names, names)
        assert err[0].startswith(f"octn4: error: {expected}: "), err[0]
    assert problem in err[0], err[0]
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".out") or p == "out"]
    assert leftovers == ([] if "already exists" not in problem else ["out"])


def test_missing_input(tmp_path, capsys):
    assert_rejected(tmp_path, capsys, tmp_path / "nope.ome.zarr", "input does not exist")


def test_unreadable_input(tmp_path, capsys):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file")
    assert_rejected(tmp_path, capsys, tmp_path / "bad.nii.gz", "cannot be read as NIfTI")
    (tmp_path / "folder.zarr").mkdir()
    assert_rejected(tmp_path, capsys, tmp_path / "folder.zarr", "cannot be read as Zarr")


def test_not_3d(tmp_path, capsys):
    zarr.create_array(str(tmp_path / "flat.zarr"), shape=(40, 40), dtype="f4", fill_value=1)
    assert_rejected(tmp_path, capsys, tmp_path / "flat.zarr", "must be 3-D", ["--voxel-size", "1,1,1"])
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    assert_rejected(tmp_path, capsys, tmp_path / "t.nii.gz", "must be 3-D")


def test_empty(tmp_path, capsys):
    zarr.create_array(str(tmp_path / "e.zarr"), shape=(0, 4, 4), dtype="f4")
    assert_rejected(tmp_path, capsys, tmp_path / "e.zarr", "volume is empty", ["--voxel-size", "1,1,1"])
    inp = ome(tmp_path / "z.ome.zarr", np.zeros((6, 8, 8), np.float32))
    assert_rejected(tmp_path, capsys, inp, "no positive intensity")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, capsys, bad):
    v = good()
    v[3, 4, 5] = bad
    assert_rejected(tmp_path, capsys, ome(tmp_path / "n.ome.zarr", v), "1 NaN/Inf values")


def test_negative_or_db_intensities(tmp_path, capsys):
    db = 10 * np.log10(good())   # dB-scaled: has negatives
    assert_rejected(tmp_path, capsys, ome(tmp_path / "db.ome.zarr", db), "10**(v/10)")
    shifted = db - db.min() + 40   # dB with an offset: all positive, narrow range
    inp = ome(tmp_path / "db2.ome.zarr", shifted)
    assert_rejected(tmp_path, capsys, inp, "look log-scaled (dB)")


def test_sections_against_depth(tmp_path, capsys):
    inp = ome(tmp_path / "v.ome.zarr", good())
    assert_rejected(tmp_path, capsys, inp, "13 sections requested but the volume has only 12", sections="13")
    out = tmp_path / "out"
    rc, err = run_cli(["run", str(inp), str(out), "--planes", "4,4,3", "-q"], capsys)
    assert rc == 2 and "sum to 11 but the volume has 12" in err[0] and not out.exists()


def test_voxel_size_missing_zero_negative(tmp_path, capsys):
    zarr.create_array(str(tmp_path / "bare.zarr"), shape=(12, 40, 40), dtype="f4", fill_value=1)
    assert_rejected(tmp_path, capsys, tmp_path / "bare.zarr", "voxel size missing")
    inp = ome(tmp_path / "v.ome.zarr", good())
    assert_rejected(tmp_path, capsys, inp, "voxel size must be positive", ["--voxel-size", "0,0.05,0.05"])
    assert_rejected(tmp_path, capsys, inp, "voxel size must be positive", ["--voxel-size=-1,0.05,0.05"])
    hdr = nib.Nifti1Header()   # written by hand: nibabel's save would take pixdim from the affine
    hdr.set_data_shape((40, 40, 12))
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = [0.0, 1.0, 1.0]
    hdr["vox_offset"] = 352
    (tmp_path / "p.nii").write_bytes(hdr.binaryblock + b"\x00" * 4 + good().tobytes())
    assert_rejected(tmp_path, capsys, tmp_path / "p.nii", "voxel size missing or invalid")


def test_existing_output_is_refused(tmp_path, capsys):
    inp = ome(tmp_path / "v.ome.zarr", good())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_rejected(tmp_path, capsys, inp, "already exists; pass --overwrite", names="output")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_mask_shape_mismatch(tmp_path, capsys):
    inp = ome(tmp_path / "v.ome.zarr", good())
    mask = ome(tmp_path / "m.ome.zarr", np.ones((12, 40, 39), np.float32))
    assert_rejected(tmp_path, capsys, inp, "mask shape (12, 40, 39) does not match", ["--mask", str(mask)],
                    names=mask)
    r = subprocess.run([sys.executable, str(BIN / "octn4_section.py"), str(inp), str(mask), str(tmp_path / "s.json"),
                        "--index", "0", "--sections", "3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"octn4_section.py: error: {mask}: mask shape (12, 40, 39) does not match the volume shape (12, 40, 40)"]
    assert not (tmp_path / "s.json").exists()


def test_gpu_requested_for_the_simpleitk_engine(tmp_path, capsys):
    inp = ome(tmp_path / "v.ome.zarr", good())
    assert_rejected(tmp_path, capsys, inp, "runs on the CPU only", ["--engine", "sitk", "--device", "cuda"],
                    names=None)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_requested_without_cupy(tmp_path, capsys):
    inp = ome(tmp_path / "v.ome.zarr", good())
    assert_rejected(tmp_path, capsys, inp, "needs CuPy, which is not installed",
                    ["--engine", "octn4", "--device", "cuda"], names=None)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_device_auto_falls_back_to_the_cpu_and_says_so(tmp_path):
    from octn4.io import read_attrs

    inp = ome(tmp_path / "v.ome.zarr", good())
    out = tmp_path / "out"
    assert main(["run", str(inp), str(out), "--sections", "2", "--engine", "octn4", "--device", "auto",
                 "--iterations", "2", "--global-iterations", "2", "-q"]) == 0
    attrs = read_attrs(out / "corrected.ome.zarr")
    assert attrs["device"] == "cpu" and attrs["parameters"]["device"] == "cpu"


def test_integer_input_is_accepted_and_input_is_untouched(tmp_path):
    data = (good() * 1000).astype(np.uint16)
    img = nib.Nifti1Image(data.T.copy(), np.diag([0.05, 0.05, 0.05, 1]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "u.nii.gz"))
    before = (tmp_path / "u.nii.gz").read_bytes()
    r = subprocess.run([sys.executable, str(BIN / "octn4_mask.py"), str(tmp_path / "u.nii.gz"),
                        str(tmp_path / "m.ome.zarr"), "--sections", "3", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")["s0"][:].sum() > 0
    assert (tmp_path / "u.nii.gz").read_bytes() == before
