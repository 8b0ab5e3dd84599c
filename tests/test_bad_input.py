"""Every bad input: a one-line error naming the file and the problem, exit 2, no output left."""

import importlib.util
import os
import re
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


def test_bad_values_are_refused_by_the_mask_stages_scan_in_worker_processes(tmp_path, capsys):
    """octn4 run validates the input on the mask stage's read: a NaN in the last section is refused by its
    thresholds task in a worker, naming its planes; a log-scaled volume once every section is scanned."""
    v = good((24, 40, 40))
    v[20, 4, 5] = np.nan
    assert_rejected(tmp_path, capsys, ome(tmp_path / "n.ome.zarr", v), "planes 16..24 (scanned by section 2's",
                    ["--workers", "2"])
    assert_rejected(tmp_path, capsys, ome(tmp_path / "db.ome.zarr", 10 * np.log10(good((24, 40, 40))) + 60),
                    "look log-scaled (dB)", ["--workers", "2"])


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
def test_device_auto_falls_back_to_the_cpu_and_says_so(tmp_path, caplog):
    import json

    from octn4.io import read_attrs

    inp = ome(tmp_path / "v.ome.zarr", good())
    out = tmp_path / "out"
    assert main(["run", str(inp), str(out), "--sections", "2", "--engine", "octn4", "--device", "auto",
                 "--iterations", "2", "--global-iterations", "2", "-q"]) == 0
    assert any(r.levelname == "WARNING" and "device auto" in r.getMessage() for r in caplog.records)
    attrs = read_attrs(out / "corrected.ome.zarr")
    assert attrs["device"] == "cpu" and attrs["parameters"]["device"] == "cpu"
    # guards: the automatic choice was one INFO line; now a warning, a field in every output and in the report
    why = "device auto: fitting on the CPU (device 'cuda' needs CuPy, which is not installed"
    assert attrs["parameters"]["device_requested"] == "auto" and attrs["parameters"]["device_choice"].startswith(why)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["device_fallback"].startswith(why)
    page = (out / "report" / "report.html").read_text()
    assert page.count("device auto: fitting on the CPU") == 2      # the summary's warning and the facts row


def test_integer_input_is_accepted_and_input_is_untouched(tmp_path):
    data = (good() * 1000).astype(np.uint16)
    img = nib.Nifti1Image(data.T.copy(), np.diag([0.05, 0.05, 0.05, 1]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "u.nii.gz"))
    before = (tmp_path / "u.nii.gz").read_bytes()
    inp = str(tmp_path / "u.nii.gz")
    for i in range(3):
        r = subprocess.run([sys.executable, str(BIN / "octn4_mask_thresholds.py"), inp, str(tmp_path / f"t{i}"),
                            "--index", str(i), "--sections", "3", "-q"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    thresholds = [str(tmp_path / f"t{i}") for i in range(3)]
    for i in range(3):
        r = subprocess.run([sys.executable, str(BIN / "octn4_mask_section.py"), inp, str(tmp_path / f"p{i}"),
                            *thresholds, "--index", str(i), "--sections", "3", "-q"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(BIN / "octn4_mask_finish.py"), inp, str(tmp_path / "m.ome.zarr"),
                        "--thresholds", *thresholds, "--parts", *(str(tmp_path / f"p{i}") for i in range(3)),
                        "--sections", "3", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")["s0"][:].sum() > 0
    assert (tmp_path / "u.nii.gz").read_bytes() == before


# --------------------------------------------------------------------------- errors that are not the user's


def test_a_missing_ngff_unit_is_an_input_error_not_millimetres(tmp_path, capsys):
    """Guards: a µm-scaled OME-Zarr without 'unit' fields was read as mm (1000x too large), silently."""
    inp = ome(tmp_path / "v.ome.zarr", good(), vs=(5.0, 10.0, 10.0))
    meta = zarr.open_group(str(inp), mode="r+")
    attrs = dict(meta.attrs)
    for axis in attrs["ome"]["multiscales"][0]["axes"]:
        axis.pop("unit")
    meta.attrs.put(attrs)
    assert_rejected(tmp_path, capsys, inp, "voxel size unit missing: the OME-NGFF axes z, y, x carry no 'unit'")
    _, err = run_cli(["run", str(inp), str(tmp_path / "o"), "--sections", "3", "-q"], capsys)
    assert "pass --voxel-size Z,Y,X (mm)" in err[0]
    # with the voxel size given, the same file runs
    assert main(["run", str(inp), str(tmp_path / "ok"), "--sections", "3", "--voxel-size", "0.005,0.01,0.01",
                 "--iterations", "2", "--global-iterations", "2", "-q"]) == 0


def test_a_section_of_one_plane_is_refused_before_any_work(tmp_path, capsys):
    """Guards: a 1-plane section failed in its section task, after the whole mask stage had run."""
    inp = ome(tmp_path / "v.ome.zarr", good())
    out = tmp_path / "out"
    rc, err = run_cli(["run", str(inp), str(out), "--planes", "5,1,6", "-q"], capsys)
    assert rc == 2 and err == [f"octn4: error: {inp}: section 1 would have 1 plane; N4 needs at least 2 planes per "
                               "section (1 section too thin): give fewer sections (at most 6 for 12 planes) or "
                               "other --planes"]
    r = subprocess.run([sys.executable, str(BIN / "octn4_mask_thresholds.py"), str(inp), str(tmp_path / "t0"),
                        "--index", "0", "--planes", "5,1,6", "-q"], capture_output=True, text=True)
    assert r.returncode == 2 and "section 1 would have 1 plane" in r.stderr
    assert not (tmp_path / "t0").exists() and not out.exists()


def test_sections_of_two_planes_run_and_say_what_was_not_measured(tmp_path, capsys):
    """Guards: a valid 6x40x40 stack in 3 sections ran every stage, then failed on NaN slopes in JSON."""
    import json

    inp = ome(tmp_path / "v.ome.zarr", good((6, 40, 40)))
    out = tmp_path / "out"
    rc, err = run_cli(["run", str(inp), str(out), "--sections", "3", "-q"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["summary"]["depth_slope_abs_mean_after"] is None
    assert all("fewer than 3 planes: depth slope not measured" in s["flags"] for s in m["sections"])


def test_bad_parameters_are_input_errors(tmp_path, capsys):
    """Guards: parameter checks raised plain ValueError, which only the blanket catch made exit 2."""
    inp = ome(tmp_path / "v.ome.zarr", good())
    assert_rejected(tmp_path, capsys, inp, "maximum_number_of_iterations must be positive integers",
                    ["--iterations", "0"], names=None)
    assert_rejected(tmp_path, capsys, inp, "smoothing_px must be >= 0", ["--gain-smoothing", "-1"], names=None)
    assert_rejected(tmp_path, capsys, inp, "closing_radius must be a non-negative integer",
                    ["--mask-closing-radius", "-2"], names=None)


def test_an_internal_error_is_not_blamed_on_the_input(tmp_path, capsys, monkeypatch, caplog):
    """Guards: every ValueError became 'octn4: error: ...', exit 2, no traceback, as if the input were bad."""
    import octn4.pipeline

    def broken(*a, **k):
        raise ValueError("Out of range float values are not JSON compliant: nan")

    monkeypatch.setattr(octn4.pipeline, "stage_global", broken)
    inp = ome(tmp_path / "v.ome.zarr", good())
    rc = main(["run", str(inp), str(tmp_path / "out"), "--sections", "3", "--iterations", "2", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("octn4: internal error: ValueError: Out of range float")
    assert "not a problem with the input" in err
    # nothing that looks finished; the finished stages are kept, hidden, for --resume
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / "mask.ome.zarr").exists()
    assert any("run the same command with --resume" in r.getMessage() for r in caplog.records)


def test_out_of_memory_exits_as_out_of_memory(tmp_path, capsys, monkeypatch):
    """Guards: MemoryError was caught as 'cannot be read' (exit 2), which the workflow's retry policy does
    not retry; 137 is what an OOM-killed task reports, and conf/base.config retries it with more memory."""
    import octn4.pipeline

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 48.0 GiB")

    inp = ome(tmp_path / "v.ome.zarr", good())
    monkeypatch.setattr(zarr, "open", no_memory)     # inside io._open_zarr's 'cannot be read' guard
    rc, err = run_cli(["run", str(inp), str(tmp_path / "out"), "--sections", "3", "-q"], capsys)
    oom = "out of memory (Unable to allocate 48.0 GiB); give the task more memory (exit 137)"
    assert rc == 137 and err == [f"octn4: error: {oom}"]
    monkeypatch.undo()
    monkeypatch.setattr(octn4.pipeline, "_fit_sections", no_memory)
    rc, err = run_cli(["run", str(inp), str(tmp_path / "out"), "--sections", "3", "-q"], capsys)
    assert rc == 137 and not (tmp_path / "out").exists()
    base = (Path(__file__).resolve().parent.parent / "conf" / "base.config").read_text()
    assert "task.exitStatus in ((130..145) + [104, 175]) ? 'retry'" in base


def test_formats_and_metadata_octn4_cannot_use(tmp_path, capsys):
    (tmp_path / "v.tif").write_bytes(b"II*\x00")
    assert_rejected(tmp_path, capsys, tmp_path / "v.tif",
                    "unsupported input format: expected .ome.zarr, .zarr, .nii or .nii.gz")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    assert_rejected(tmp_path, capsys, tmp_path / "g.zarr", "Zarr group has no OME-NGFF 'multiscales' metadata")
    inp = ome(tmp_path / "u.ome.zarr", good())
    meta = zarr.open_group(str(inp), mode="r+")
    attrs = dict(meta.attrs)
    attrs["ome"]["multiscales"][0]["axes"][0]["unit"] = "parsec"
    meta.attrs.put(attrs)
    assert_rejected(tmp_path, capsys, inp, "unsupported spatial unit 'parsec' on axis z")


def test_a_constant_volume_has_nothing_to_correct(tmp_path, capsys):
    inp = ome(tmp_path / "c.ome.zarr", np.full((12, 40, 40), 2.5, np.float32))
    assert_rejected(tmp_path, capsys, inp, "volume is constant (2.5): there is nothing to correct")


README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_table_lists_the_cases_the_suite_tries():
    """Every message in the README's bad-input table is one a test asserts (a literal part of it), with the
    exit status that test expects; and every problem this file rejects is in the table."""
    text = README.read_text()
    table = text[text.index("<!-- bad-input table -->"):text.index("<!-- end bad-input table -->")]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| case") and "---" not in r]
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py")
                      if p.name != "test_bad_input.py") + Path(__file__).read_text().split("README = Path")[0]
    assert len(rows) >= 25
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        fragments = [f.replace("\\|", "|") for f in re.findall(r"`([^`]+)`", cells[1])]
        assert fragments and cells[2] in {"1", "2", "137"}, row
        for f in fragments:
            assert f in tests, f"README bad-input message not asserted by any test: {f!r}"
    listed = "\n".join(rows)
    for problem in re.findall(r'assert_rejected\(tmp_path, capsys, [^,]+, "([^"]+)"', tests):
        assert any(problem.startswith(f) or f in problem
                   for f in re.findall(r"`([^`]+)`", listed)), f"rejected but not in the README table: {problem!r}"


def test_the_mask_tasks_refuse_bad_input_where_they_can_see_it(tmp_path):
    """The workflow's mask tasks: a NaN is refused by the thresholds task that scans its slab, naming the
    planes; what only the whole volume shows (log-scaled values), by the finishing task, as octn4 run refuses
    it; a mask task without its neighbours' thresholds, or with thresholds made for another layout or other
    mask parameters, says so.  Nothing is left behind."""
    from octn4.errors import InputError
    from octn4.mask import MaskParams
    from octn4.mask_stage import (
        stage_mask_finish_files,
        stage_mask_section_files,
        stage_mask_thresholds_files,
    )

    data = good((24, 40, 40))
    data[20, 5, 5] = np.nan
    inp = ome(tmp_path / "nan.ome.zarr", data)
    bounds, params = [(0, 10), (10, 18), (18, 24)], MaskParams()
    stage_mask_thresholds_files(inp, bounds, 0, tmp_path / "t0", params=params)
    stage_mask_thresholds_files(inp, bounds, 2, tmp_path / "t2", params=params)   # plane 20: section 1's slab
    with pytest.raises(InputError, match=r": planes 16\.\.24 \(scanned by section 1's thresholds task\): volume "
                                         "contains 1 NaN/Inf") as e:
        stage_mask_thresholds_files(inp, bounds, 1, tmp_path / "t1", params=params)
    assert str(e.value.path) == str(inp) and not (tmp_path / "t1").exists()

    logged = ome(tmp_path / "db.ome.zarr", 10 * np.log10(good((24, 40, 40)) + 1) + 30)
    thr = [tmp_path / f"d{i}" for i in range(3)]
    for i in range(3):
        stage_mask_thresholds_files(logged, bounds, i, thr[i], params=params)
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i in range(3):
        stage_mask_section_files(logged, bounds, i, thr, parts[i], params=params)
    with pytest.raises(InputError, match="intensities look log-scaled") as e:
        stage_mask_finish_files(logged, bounds, thr, parts, tmp_path / "m.ome.zarr", params=params, attrs={})
    assert str(e.value.path) == str(logged) and not (tmp_path / "m.ome.zarr").exists()
    stage_mask_finish_files(logged, bounds, thr, parts, tmp_path / "m.ome.zarr", params=params, attrs={},
                            check_log_scale=False)

    with pytest.raises(InputError, match=r"thresholds missing for sections \[2\]"):
        stage_mask_section_files(logged, bounds, 1, thr[:2], tmp_path / "x", params=params)
    with pytest.raises(InputError, match="thresholds made with mask parameters"):
        stage_mask_section_files(logged, bounds, 1, thr, tmp_path / "x", params=MaskParams(smoothing_sigma=1.5))
    with pytest.raises(InputError, match="thresholds made for sections"):
        stage_mask_section_files(logged, [(0, 12), (12, 24)], 1, thr, tmp_path / "x", params=params)
    with pytest.raises(InputError, match=r"parts missing for sections \[1\]"):
        stage_mask_finish_files(logged, bounds, thr, [parts[0], parts[2]], tmp_path / "m2.ome.zarr", params=params,
                                attrs={}, check_log_scale=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "m2.ome.zarr").exists()
