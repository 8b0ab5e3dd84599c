"""The workflow as Nextflow's parser sees it: processes, configs, parameters, rendered commands.

Everything Groovy runs through ``nf_tool.groovy`` on the language-server
jar (nf-lang and Groovy 4), so the process blocks are parsed and evaluated
by the same code Nextflow uses, not by regular expressions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

TOOL = Path(__file__).with_name("nf_tool.groovy")


def groovy(jar: Path, *args: str) -> object:
    r = subprocess.run(["java", "-cp", str(jar), "groovy.ui.GroovyMain", str(TOOL), *args],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nf_tool.groovy {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def _block(text: str, open_at: int) -> str:
    """The text from ``text[open_at] == '{'`` to its matching brace (GString ``${}`` braces balance)."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at:i + 1]
    raise ValueError("unbalanced braces")


def with_name_blocks(config_text: str) -> dict[str, str]:
    """``withName: 'X' { ... }`` selectors of a config file and their bodies."""
    out = {}
    for m in re.finditer(r"withName\s*:\s*['\"]?([\w:|*]+)['\"]?\s*\{", config_text):
        out[m.group(1)] = _block(config_text, m.end() - 1)
    return out


def with_label_blocks(config_text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"withLabel\s*:\s*['\"]?([\w:|*]+)['\"]?\s*\{", config_text):
        out[m.group(1)] = _block(config_text, m.end() - 1)
    return out


def ext_args_source(body: str, key: str = "args") -> str | None:
    """The right-hand side of ``ext.<key> = ...`` in a withName body (a string or a closure)."""
    m = re.search(rf"ext\.{key}\s*=\s*", body)
    if not m:
        return None
    rest = body[m.end():]
    if rest.startswith("{"):
        return _block(rest, 0)
    q = re.match(r"('[^']*'|\"[^\"]*\")", rest)
    return q.group(1) if q else None


@dataclass
class Process:
    name: str
    file: Path
    directives: str
    inputs: str
    outputs: str
    script: str | None
    stub: str | None

    @property
    def labels(self) -> list[str]:
        return re.findall(r"^\s*label\s+['\"]([^'\"]+)['\"]", self.directives, re.M)

    @property
    def container(self) -> str | None:
        m = re.search(r"^\s*container\s+['\"]([^'\"]+)['\"]", self.directives, re.M)
        return m.group(1) if m else None


@dataclass
class Project:
    root: Path
    jar: Path
    parse_errors: list[str] = field(default_factory=list)

    @cached_property
    def processes(self) -> dict[str, Process]:
        files = sorted((self.root / "modules").rglob("main.nf"))
        out = {}
        for f in groovy(self.jar, "extract", *map(str, files)):
            for e in f["errors"]:
                self.parse_errors.append(f"{f['file']}: {e}")
            for p in f["processes"]:
                out[p["name"]] = Process(p["name"], Path(f["file"]), p["directives"] or "", p["inputs"] or "",
                                         p["outputs"] or "", p["script"], p["stub"])
        return out

    def config_text(self, rel: str) -> str:
        return (self.root / rel).read_text()

    @cached_property
    def config_files(self) -> list[Path]:
        return [self.root / "nextflow.config", *sorted((self.root / "conf").glob("*.config"))]

    def params(self, *overrides: str) -> dict:
        """Parameter defaults from nextflow.config, then each override config's params block."""
        out = groovy(self.jar, "params", str(self.root / "nextflow.config"), str(self.root))
        for rel in overrides:
            out.update(groovy(self.jar, "params", str(self.root / rel), str(self.root)))
        return out

    @cached_property
    def ext_args(self) -> dict[str, str]:
        blocks = with_name_blocks(self.config_text("conf/modules.config"))
        return {name: src for name, body in blocks.items() if (src := ext_args_source(body))}

    @cached_property
    def ext_sources(self) -> dict[str, dict[str, str]]:
        """Every ``ext.<key>`` a withName block sets (args, device, ...), per process."""
        out = {}
        for name, body in with_name_blocks(self.config_text("conf/modules.config")).items():
            keys = dict.fromkeys(re.findall(r"ext\.(\w+)\s*=", body))
            out[name] = {k: src for k in keys if (src := ext_args_source(body, k))}
        return out

    def render(self, jobs: list[dict], params: dict) -> list[dict]:
        """Each job: process name, block ('script'|'stub'), bindings (task, meta, inputs...)."""
        payload = []
        for j in jobs:
            proc = self.processes[j["process"]]
            payload.append(dict(file=str(proc.file), process=proc.name, block=j["block"], bindings=j["bindings"],
                                ext_args_source=self.ext_args.get(proc.name),
                                ext_sources=self.ext_sources.get(proc.name, {}), params=params))
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(payload, fh)
        try:
            return groovy(self.jar, "render", fh.name)
        finally:
            Path(fh.name).unlink()


def commands(script: str) -> list[list[str]]:
    """Simple commands of a rendered shell script (continuations joined; split on ; && || |)."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            if part:
                out.append(shlex.split(part))
    return out


def bin_parser(root: Path, name: str) -> argparse.ArgumentParser:
    path = root / "bin" / name
    spec = importlib.util.spec_from_file_location(f"_bin_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_parser()


def argparse_problem(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """None when ``parser`` accepts ``argv``, else argparse's complaint."""
    parser.exit_on_error = False

    def fail(message):
        raise ValueError(message)

    parser.error = fail
    for action in parser._actions:     # sub-groups share the error hook through the parser
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.error = fail
    try:
        parser.parse_args(argv)
    except (ValueError, argparse.ArgumentError) as exc:
        return str(exc)
    except SystemExit as exc:           # --help / --version
        return None if exc.code == 0 else f"exit {exc.code}"
    return None
