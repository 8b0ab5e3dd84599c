"""Lint Nextflow files with the Nextflow language server (the parser behind ``nextflow lint``).

The server is driven over stdio LSP: initialize, open every ``.nf`` and
``.config`` file, collect ``textDocument/publishDiagnostics`` until every
opened file has been reported (or nothing new arrived for a while).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

#: Offline there is no plugin registry: the server reports every plugin as missing.
OFFLINE_FALSE_POSITIVES = (re.compile(r"^Plugin '[^']+' does not exist"),)
SKIP_DIRS = {".git", ".nf-test", "work", ".venv", "node_modules", ".pytest_cache"}
SEVERITY = {1: "error", 2: "warning", 3: "info", 4: "hint"}


@dataclass(frozen=True)
class Diagnostic:
    path: Path
    line: int
    column: int
    severity: str
    message: str

    def __str__(self):
        return f"{self.path}:{self.line}:{self.column}: {self.severity}: {self.message.splitlines()[0]}"


#: .config files that are not Nextflow configs
NOT_NEXTFLOW = {"nf-test.config"}


def nextflow_files(root: Path) -> list[Path]:
    files = [p for pattern in ("*.nf", "*.config") for p in root.rglob(pattern)]
    return sorted(p for p in files if not SKIP_DIRS & set(p.relative_to(root).parts) and p.name not in NOT_NEXTFLOW)


class _Server:
    def __init__(self, jar: Path, java: str = "java"):
        self.proc = subprocess.Popen([java, "-jar", str(jar)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.messages: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self._id = 0
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=lambda: self.stderr.extend(line.decode(errors="replace")
                                                               for line in self.proc.stderr), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self):
        out = self.proc.stdout
        while True:
            headers = {}
            while True:
                line = out.readline()
                if not line:
                    self.messages.put(None)
                    return
                line = line.decode("ascii", "replace").strip()
                if not line:
                    break
                key, _, value = line.partition(":")
                headers[key.lower()] = value.strip()
            self.messages.put(json.loads(out.read(int(headers["content-length"]))))

    def _write(self, msg: dict):
        data = json.dumps(msg).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(data) + data)
        self.proc.stdin.flush()

    def request(self, method, params=None) -> int:
        self._id += 1
        self._write({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params or {}})
        return self._id

    def notify(self, method, params=None):
        self._write({"jsonrpc": "2.0", "method": method, "params": params or {}})

    def respond(self, id_, result):
        self._write({"jsonrpc": "2.0", "id": id_, "result": result})

    def close(self):
        try:
            self.request("shutdown")
            self.notify("exit")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # already gone, or not answering: make sure it is
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:       # both end at EOF once the server has exited
            t.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()


def lint(root: Path, jar: Path, *, files=None, timeout: float = 300, quiet: float = 20) -> list[Diagnostic]:
    """Diagnostics for ``files`` (default: every .nf/.config under ``root``), offline false positives dropped.

    Raises RuntimeError when the server stops or times out before reporting on every file.
    """
    root = root.resolve()
    files = [Path(f).resolve() for f in (files or nextflow_files(root))]
    settings = {"nextflow": {"files": {"exclude": sorted(SKIP_DIRS)}, "errorReportingMode": "warnings",
                             "typeChecking": False}}
    server = _Server(jar)
    reported: dict[Path, list] = {}
    try:
        init = server.request("initialize", {
            "processId": None, "rootUri": root.as_uri(), "capabilities": {"workspace": {"configuration": True}},
            "workspaceFolders": [{"uri": root.as_uri(), "name": root.name}], "initializationOptions": settings})
        opened = False
        t0 = last = time.monotonic()
        while True:
            now = time.monotonic()
            if opened and set(files) <= set(reported) and now - last > 2:
                break
            if opened and now - last > quiet:
                break
            if now - t0 > timeout:
                raise RuntimeError(f"language server timed out after {timeout:.0f} s")
            try:
                msg = server.messages.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError("language server stopped:\n" + "".join(server.stderr)[-2000:])
            if "method" in msg and "id" in msg:            # a request from the server
                if msg["method"] == "workspace/configuration":
                    server.respond(msg["id"], [_setting(settings, it.get("section", "")) for it in
                                               msg["params"].get("items", [])])
                else:
                    server.respond(msg["id"], None)
            elif msg.get("id") == init and not opened:
                server.notify("initialized")
                server.notify("workspace/didChangeConfiguration", {"settings": settings})
                for f in files:
                    server.notify("textDocument/didOpen", {"textDocument": {
                        "uri": f.as_uri(), "languageId": "nextflow" if f.suffix == ".nf" else "nextflow-config",
                        "version": 1, "text": f.read_text()}})
                opened, last = True, time.monotonic()
            elif msg.get("method") == "textDocument/publishDiagnostics":
                reported[Path(unquote(urlparse(msg["params"]["uri"]).path))] = msg["params"]["diagnostics"]
                last = time.monotonic()
    finally:
        server.close()
    missing = set(files) - set(reported)
    if missing:
        raise RuntimeError(f"language server reported nothing for {sorted(str(m) for m in missing)}")
    out = []
    for path, diags in sorted(reported.items()):
        for d in diags:
            if any(rx.search(d["message"]) for rx in OFFLINE_FALSE_POSITIVES):
                continue
            start = d["range"]["start"]
            out.append(Diagnostic(path, start["line"] + 1, start["character"] + 1,
                                  SEVERITY.get(d.get("severity", 1), "error"), d["message"]))
    return out


def _setting(settings: dict, section: str):
    value = settings
    for part in section.split(".") if section else []:
        value = value.get(part) if isinstance(value, dict) else None
    return value
