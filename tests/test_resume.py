"""An octn4 run killed part way leaves nothing that looks finished, never touches its input, and
``--resume`` finishes it with the outputs an uninterrupted run gives, reusing only what still matches."""

import fcntl
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from octn4.cli import main
from octn4.io import open_volume

pytestmark = pytest.mark.slow

FAST = ["--sections", "3", "--iterations", "6,6", "--global-iterations", "6", "--global-shrink", "4", "-q"]

#: Runs ``octn4 run`` and SIGKILLs it at a point: no handler, no cleanup, as the OOM killer or a scheduler does.
KILLER = r'''
import os, signal, sys
import octn4.io as io, octn4.mask_stage as mask_stage, octn4.pipeline as pipeline
point, argv = sys.argv[1], sys.argv[2:]
write = io.OmeZarrWriter.write
calls = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killing_write(self, z0, block):
    name = self.path.name
    if point == "mask" and name.startswith("mask"):
        calls.append(z0)
        if len(calls) == 2:            # the second of the mask's three slabs
            die()
    return write(self, z0, block)

io.OmeZarrWriter.write = killing_write
part_write = io.PartWriter.write

def killing_part_write(self, z0, block):
    if point == "apply" and self.path.name.startswith("bias"):
        die()                          # the first part's corrected has a tile, its bias none
    return part_write(self, z0, block)

io.PartWriter.write = killing_part_write
commit = io.OmeZarrWriter.commit

def killing_commit(self):
    if point == "outputs" and self.path.name.startswith("bias"):
        die()                          # corrected is complete in the partial folder, bias is not
    return commit(self)

io.OmeZarrWriter.commit = killing_commit
task = pipeline._section_task

def killing_task(args):
    if point == "sections" and args[3] == 2:    # sections 0 and 1 are done
        die()
    if point == "worker" and args[3] == 1:      # with --workers 2 this runs in a worker process
        die()
    return task(args)

pipeline._section_task = killing_task
mask_task = mask_stage._mask_part_task

def killing_mask_task(job):
    if point == "mask-worker" and job[3] == 1:  # with --workers 2 a worker process masks section 1
        die()
    return mask_task(job)

mask_stage._mask_part_task = killing_mask_task
if __name__ == "__main__":                     # not in spawned workers, which import this file too
    from octn4.cli import main
    sys.exit(main(argv))
'''


def read(path):
    v = open_volume(path)
    return v.read(0, v.shape[0])


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def killed_run(inp, out, point, *extra):
    r = subprocess.run([sys.executable, "-c", KILLER, point, "run", str(inp), str(out), *FAST, *extra],
                       capture_output=True, text=True)
    assert r.returncode == -9, (r.returncode, r.stderr)


@pytest.fixture(scope="module")
def reference(small_stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "ref"
    assert main(["run", str(small_stack / "volume.ome.zarr"), str(out), *FAST]) == 0
    return out


def assert_same_outputs(out, ref):
    for name in ("corrected.ome.zarr", "bias.ome.zarr", "mask.ome.zarr"):
        np.testing.assert_array_equal(read(out / name), read(ref / name))
    assert json.loads((out / "fields.json").read_text()) == json.loads((ref / "fields.json").read_text())


@pytest.mark.parametrize("point,reused", [
    ("mask", {"mask": False, "sections": []}),
    ("sections", {"mask": True, "sections": [0, 1]}),
    ("apply", {"mask": True, "sections": [0, 1, 2]}),
    ("outputs", {"mask": True, "sections": [0, 1, 2]}),
])
def test_a_killed_run_leaves_no_output_and_resume_finishes_it(small_stack, reference, tmp_path, point, reused):
    """Guards: a run that died started again from nothing (and a killed one left its temporary folder)."""
    inp = small_stack / "volume.ome.zarr"
    before = tree_digest(inp)
    out = tmp_path / "out"
    killed_run(inp, out, point)
    assert not out.exists()                                         # nothing that looks finished
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]  # hidden, and named as unfinished
    assert tree_digest(inp) == before                               # the input is untouched
    assert main(["run", str(inp), str(out), *FAST, "--resume"]) == 0
    assert not (tmp_path / ".out.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())   # no leftovers
    assert json.loads((out / "metrics.json").read_text())["provenance"]["resumed"] == reused
    assert_same_outputs(out, reference)
    assert tree_digest(inp) == before


def test_resume_recomputes_what_no_longer_matches(small_stack, tmp_path):
    """Stored stages are checked against the input's content and the parameters; a mismatch is recomputed."""
    import shutil

    import zarr

    inp = tmp_path / "v.ome.zarr"
    shutil.copytree(small_stack / "volume.ome.zarr", inp)
    out = tmp_path / "out"
    killed_run(inp, out, "apply")
    # other section parameters: the mask is reused, no section is
    assert main(["run", str(inp), str(out), *FAST, "--iterations", "5,5", "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["provenance"]["resumed"] == {"mask": True, "sections": []}
    assert main(["run", str(inp), str(tmp_path / "fresh"), *FAST, "--iterations", "5,5"]) == 0
    assert_same_outputs(out, tmp_path / "fresh")
    # one voxel of the input changed: nothing is reused
    killed_run(inp, tmp_path / "out2", "apply")
    arr = zarr.open_group(str(inp), mode="r+")["s0"]
    arr[20, 40, 40] = arr[20, 40, 40] * 1.5
    assert main(["run", str(inp), str(tmp_path / "out2"), *FAST, "--resume"]) == 0
    m2 = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert m2["provenance"]["resumed"] == {"mask": False, "sections": []}


def test_without_resume_leftovers_are_discarded_and_a_running_job_is_not_disturbed(small_stack, reference, tmp_path,
                                                                                      capsys):
    inp = small_stack / "volume.ome.zarr"
    out = tmp_path / "out"
    killed_run(inp, out, "sections")
    assert main(["run", str(inp), str(out), *FAST]) == 0            # no --resume: starts over
    assert json.loads((out / "metrics.json").read_text())["provenance"]["resumed"] is None
    assert_same_outputs(out, reference)
    partial = tmp_path / ".other.partial"
    partial.mkdir()
    with open(partial / ".lock", "w") as held:                     # another run holds this output
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["run", str(inp), str(tmp_path / "other"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"octn4: error: {partial}: another octn4 run is writing this output now (its partial folder is "
                   "locked)"]
    assert partial.exists()


@pytest.mark.parametrize("point,message", [
    ("worker", "a section worker process was killed (most often out of memory"),
    ("mask-worker", "a mask worker process was killed (most often out of memory"),
])
def test_a_killed_worker_exits_as_out_of_memory_and_resume_finishes(small_stack, reference, tmp_path, point, message):
    """Guards: a section worker killed by the OOM killer surfaced as BrokenProcessPool, an 'internal error'
    (exit 1) that the workflow's retry policy does not retry; it exits 137, as the worker did."""
    script = tmp_path / "killer.py"          # a file, so that spawned workers import the patch too
    script.write_text(KILLER)
    inp = small_stack / "volume.ome.zarr"
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, str(script), point, "run", str(inp), str(out), *FAST, "--workers", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 137, r.stderr
    assert "another octn4 run" not in r.stderr and "Traceback" not in r.stderr
    # the error is octn4's last line; Python's resource tracker may still warn after it about the dead worker's
    # semaphores
    errors = [line for line in r.stderr.splitlines() if line.startswith("octn4: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert not out.exists()
    assert main(["run", str(inp), str(out), *FAST, "--workers", "2", "--resume"]) == 0
    for name in ("corrected.ome.zarr", "bias.ome.zarr"):
        np.testing.assert_allclose(read(out / name), read(reference / name), rtol=1e-5)
