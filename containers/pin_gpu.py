#!/usr/bin/env python3
"""Append the GPU extra's pins (CuPy and NVIDIA's CUDA 12 wheels) to constraints.txt.

``make lock`` freezes the test environment; the CUDA image also needs the
``gpu`` extra, which is resolved here against the same constraints without
installing it (``pip install --dry-run --report``).

Usage: python containers/pin_gpu.py [constraints.txt]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:] or ["constraints.txt"])[0])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-c", str(path), ".[gpu]"], check=True)
        install = json.loads(report.read_text())["install"]
    have = {line.split("==")[0].strip().lower().replace("_", "-") for line in path.read_text().splitlines() if line}
    new = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in install
                 if i["metadata"]["name"].lower().replace("_", "-") not in have | {"octn4"})
    with path.open("a") as fh:
        fh.writelines(p + "\n" for p in new)
    print(f"added {len(new)} GPU pins to {path}: {', '.join(new)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
