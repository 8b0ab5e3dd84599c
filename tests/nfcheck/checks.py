"""The contract check and the rendered run of the workflow's process blocks."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .project import Project, argparse_problem, bin_parser, commands, with_label_blocks, with_name_blocks

PINNED_IMAGE = re.compile(r"^[\w.\-/]+(:[\w.\-]+)$")


def schema_params(root: Path) -> set[str]:
    schema = json.loads((root / "nextflow_schema.json").read_text())
    return {k for group in schema.get("$defs", {}).values() for k in group.get("properties", {})}


def example_bindings(process: str, meta: dict, accelerator=None) -> dict:
    """Task variables for rendering ``process`` the way the workflow calls it (file names as staged)."""
    task = {"cpus": 2, "accelerator": accelerator, "ext": {}, "process": process, "attempt": 1}
    mid = meta["id"]
    inputs = {
        "MASK_THRESHOLDS": {"index": 1, "volume": f"{mid}.ome.zarr"},
        "MASK_SECTION": {"index": 1, "volume": f"{mid}.ome.zarr",
                         "thresholds": " ".join(f"thresholds/{mid}.thresholds_{i}" for i in range(meta["n_sections"]))},
        "MASK_FINISH": {"volume": f"{mid}.ome.zarr",
                        "thresholds": " ".join(f"thresholds/{mid}.thresholds_{i}" for i in range(meta["n_sections"])),
                        "parts": " ".join(f"parts/{mid}.mask_part_{i}" for i in range(meta["n_sections"]))},
        "N4_SECTION": {"index": 1, "volume": f"{mid}.ome.zarr", "mask": f"{mid}.mask.ome.zarr"},
        "ASSEMBLE": {"records": " ".join(f"records/{mid}.section_{i}.json" for i in range(meta["n_sections"]))},
        "N4_GLOBAL": {"volume": f"{mid}.ome.zarr", "mask": f"{mid}.mask.ome.zarr", "sections": f"{mid}.sections.json",
                      "summaries": " ".join(f"summaries/{mid}.summary_{i}" for i in range(meta["n_sections"]))},
        "APPLY_SECTION": {"index": 1, "volume": f"{mid}.ome.zarr", "mask": f"{mid}.mask.ome.zarr",
                          "solution": f"{mid}.global.json"},
        "FINISH": {"volume": f"{mid}.ome.zarr", "mask": f"{mid}.mask.ome.zarr", "solution": f"{mid}.global.json",
                   "parts": " ".join(f"parts/{mid}.part_{i}" for i in range(meta["n_sections"]))},
        "REPORT": {"results": mid, "mask": f"{mid}.mask.ome.zarr"},
    }.get(process, {})
    return {"meta": meta, "task": task, **inputs}


EXAMPLE_METAS = [
    {"id": "brain01", "sections": 3, "planes": None, "n_sections": 3, "voxel_size": None},
    {"id": "brain02", "sections": None, "planes": "10,12,9", "n_sections": 3, "voxel_size": "0.02,0.01,0.01"},
]


def contract_problems(project: Project) -> list[str]:
    """Everything the contract requires; an empty list when the workflow keeps it."""
    procs = project.processes
    problems = list(project.parse_errors)
    labels = with_label_blocks(project.config_text("conf/base.config"))
    for p in procs.values():
        where = f"{p.file.relative_to(project.root)} {p.name}"
        if not p.script:
            problems.append(f"{where}: no script: block")
        if not p.stub:
            problems.append(f"{where}: no stub: block")
        if len(p.labels) != 1:
            problems.append(f"{where}: needs exactly one resource label, has {p.labels}")
        for label in p.labels:
            if label not in labels:
                problems.append(f"{where}: label '{label}' has no resources in conf/base.config")
            if label == "process_gpu" and not re.search(r"\baccelerator\s*=", labels.get(label, "")):
                problems.append(f"{where}: label 'process_gpu' without an accelerator in conf/base.config")
        if not p.container or not PINNED_IMAGE.match(p.container) or p.container.endswith(":latest"):
            problems.append(f"{where}: container must be pinned by tag, got {p.container!r}")
        for name, text in (("directives", p.directives), ("inputs", p.inputs), ("outputs", p.outputs),
                           ("script", p.script or ""), ("stub", p.stub or "")):
            if re.search(r"\bparams\.", text):
                problems.append(f"{where}: reads params in its {name} (options go through task.ext.args)")
        if p.script and "task.ext.args" not in p.script:
            problems.append(f"{where}: script does not pass task.ext.args")
    for cfg in project.config_files:
        for selector in with_name_blocks(cfg.read_text()):
            if selector not in procs:
                problems.append(f"{cfg.relative_to(project.root)}: withName '{selector}' names no process")
    in_config, in_schema = set(project.params()), schema_params(project.root)
    for name in sorted(in_config - in_schema):
        problems.append(f"nextflow.config: parameter '{name}' is not in nextflow_schema.json")
    for name in sorted(in_schema - in_config):
        problems.append(f"nextflow_schema.json: parameter '{name}' is not in nextflow.config")
    problems += command_problems(project)
    return problems


def command_problems(project: Project) -> list[str]:
    """Render every script and stub (both example brains; GPU and CPU for process_gpu) and parse each
    bin/ command with that script's own argparse, ext.args included."""
    params = dict(project.params(), input="brain01.ome.zarr", outdir="results")
    jobs = []
    for p in project.processes.values():
        accels = [None, {"request": 1}] if "process_gpu" in p.labels else [None]
        for block in ("script", "stub"):
            if getattr(p, block):
                jobs += [{"process": p.name, "block": block, "bindings": example_bindings(p.name, m, a)}
                         for m in EXAMPLE_METAS for a in accels]
    problems = []
    for job, out in zip(jobs, project.render(jobs, params)):
        if "error" in out:
            problems.append(f"{job['process']}.{job['block']} cannot be rendered: {out['error']}")
            continue
        bin_calls = [argv for argv in commands(out["command"]) if (project.root / "bin" / argv[0]).is_file()]
        if job["block"] == "script" and len(bin_calls) != 1:
            problems.append(f"{job['process']}.script calls {len(bin_calls)} bin/ scripts; expected one")
        for argv in bin_calls:
            msg = argparse_problem(bin_parser(project.root, argv[0]), argv[1:])
            if msg:
                problems.append(f"{job['process']}.{job['block']} (meta {job['bindings']['meta']['id']}): "
                                f"`{argv[0]}` rejects its arguments: {msg}")
    return problems


class TaskFailed(RuntimeError):
    pass


def _task(process: str, meta: dict, staged: dict[str, Path], extra: dict, accelerator=None) -> dict:
    bindings = {"meta": meta, "task": {"cpus": 1, "accelerator": accelerator, "ext": {}, "process": process,
                                      "attempt": 1}, **extra}
    return {"process": process, "bindings": bindings, "staged": staged}


def plan_workflow(work: Path, volume: Path, meta: dict, *, section_order=None, apply_order=None) -> list[dict]:
    """The workflow's tasks for one brain, in workflow order, each reading the outputs of earlier tasks.

    The per-section tasks (mask thresholds, mask parts, N4 sections) come in ``section_order`` and apply
    tasks in ``apply_order`` (arrival order must not matter); what they write reaches the gathering tasks
    ordered by index, as the workflow's gathers sort it.  The mask part tasks form one ``concurrent``
    group, and so do the apply tasks: parts of one output written at the same time.  Task folders are
    ``work/NN_PROCESS[_index]``.
    """
    mid, vol = meta["id"], volume.name
    tasks = []
    order = list(section_order or range(meta["n_sections"]))

    def folder(i, t):
        index = t["bindings"].get("index")
        return work / f"{i:02d}_{t['process']}{'' if index is None else f'_{index}'}"

    def gathered(outputs: dict, stage: str):
        ordered = [outputs[i] for i in sorted(outputs)]
        return {f"{stage}/{p.name}": p for p in ordered}, " ".join(f"{stage}/{p.name}" for p in ordered)

    thresholds = {}
    for i in order:
        tasks.append(_task("MASK_THRESHOLDS", meta, {vol: volume}, {"index": i, "volume": vol}))
        thresholds[i] = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.thresholds_{i}"
    staged_thr, thr_arg = gathered(thresholds, "thresholds")
    mask_parts = {}
    for i in order:
        tasks.append(_task("MASK_SECTION", meta, {vol: volume, **staged_thr},
                           {"index": i, "volume": vol, "thresholds": thr_arg}))
        tasks[-1]["concurrent"] = "mask"
        mask_parts[i] = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.mask_part_{i}"
    staged_parts, parts_arg = gathered(mask_parts, "parts")
    tasks.append(_task("MASK_FINISH", meta, {vol: volume, **staged_thr, **staged_parts},
                       {"volume": vol, "thresholds": thr_arg, "parts": parts_arg}))
    mask = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.mask.ome.zarr"
    records, summaries = {}, {}
    for i in order:
        tasks.append(_task("N4_SECTION", meta, {vol: volume, mask.name: mask},
                           {"index": i, "volume": vol, "mask": mask.name}))
        records[i] = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.section_{i}.json"
        summaries[i] = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.summary_{i}"
    ordered = [records[i] for i in sorted(records)]
    tasks.append(_task("ASSEMBLE", meta, {f"records/{p.name}": p for p in ordered},
                       {"records": " ".join(f"records/{p.name}" for p in ordered)}))
    sections = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.sections.json"
    staged_sum, sum_arg = gathered(summaries, "summaries")
    tasks.append(_task("N4_GLOBAL", meta, {vol: volume, mask.name: mask, sections.name: sections, **staged_sum},
                       {"volume": vol, "mask": mask.name, "sections": sections.name, "summaries": sum_arg}))
    solution = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.global.json"
    parts = {}
    for i in apply_order or range(meta["n_sections"]):
        tasks.append(_task("APPLY_SECTION", meta, {vol: volume, mask.name: mask, solution.name: solution},
                           {"index": i, "volume": vol, "mask": mask.name, "solution": solution.name}))
        tasks[-1]["concurrent"] = "apply"
        parts[i] = folder(len(tasks) - 1, tasks[-1]) / f"{mid}.part_{i}"
    ordered = [parts[i] for i in sorted(parts)]
    tasks.append(_task("FINISH", meta, {vol: volume, mask.name: mask, solution.name: solution,
                                        **{f"parts/{p.name}": p for p in ordered}},
                       {"volume": vol, "mask": mask.name, "solution": solution.name,
                        "parts": " ".join(f"parts/{p.name}" for p in ordered)}))
    results = folder(len(tasks) - 1, tasks[-1]) / mid
    tasks.append(_task("REPORT", meta, {mid: results, mask.name: mask}, {"results": mid, "mask": mask.name}))
    for i, t in enumerate(tasks):
        t["dir"] = folder(i, t)
    return tasks


def _launch(t: dict, command: str, env: dict) -> subprocess.Popen:
    d = t["dir"]
    d.mkdir(parents=True)
    for name, src in t["staged"].items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).symlink_to(Path(src).resolve())
    (d / ".command.sh").write_text(command)
    return subprocess.Popen(["bash", "-euo", "pipefail", ".command.sh"], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_workflow(project: Project, work: Path, volume: Path, meta: dict, params: dict, *, block="script",
                 section_order=None, apply_order=None) -> dict[str, Path]:
    """Render every task's ``block`` (one JVM), then run the tasks in order with bash: inputs staged by
    symlink into a fresh folder, bin/ on PATH; each must exit 0 and create its declared outputs.  The tasks
    of one ``concurrent`` group (the mask part tasks, the apply tasks) run at the same time, as processes
    started together.

    Returns the final outputs: mask, sections record, solution, results folder, report folder.
    """
    tasks = plan_workflow(work, volume, meta, section_order=section_order, apply_order=apply_order)
    rendered = project.render([{"process": t["process"], "block": block, "bindings": t["bindings"]} for t in tasks],
                              params)
    env = dict(os.environ, PATH=f"{project.root / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ['PATH']}")
    k = 0
    while k < len(tasks):
        group = [k]
        while tasks[k].get("concurrent") and group[-1] + 1 < len(tasks) and \
                tasks[group[-1] + 1].get("concurrent") == tasks[k].get("concurrent"):
            group.append(group[-1] + 1)
        for i in group:
            if "error" in rendered[i]:
                raise TaskFailed(f"{tasks[i]['process']} ({block}) cannot be rendered: {rendered[i]['error']}")
        running = [(i, _launch(tasks[i], rendered[i]["command"], env)) for i in group]
        for i, proc in running:
            out, t = proc.communicate()[0], tasks[i]
            (t["dir"] / ".command.log").write_text(out)
            if proc.returncode:
                raise TaskFailed(f"{t['process']} ({block}) exited {proc.returncode}: {out.strip()[-1500:]}")
            missing = [pattern for pattern in rendered[i]["outputs"] if not glob.glob(str(t["dir"] / pattern))]
            if missing:
                raise TaskFailed(f"{t['process']} ({block}) did not create its declared outputs {missing}")
        k = group[-1] + 1
    mid = meta["id"]
    by_process = {t["process"]: t["dir"] for t in tasks}
    return {"mask": by_process["MASK_FINISH"] / f"{mid}.mask.ome.zarr",
            "sections": by_process["ASSEMBLE"] / f"{mid}.sections.json",
            "solution": by_process["N4_GLOBAL"] / f"{mid}.global.json",
            "results": by_process["FINISH"] / mid, "report": by_process["REPORT"] / f"{mid}_report"}
