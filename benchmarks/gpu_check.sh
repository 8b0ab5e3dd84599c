#!/usr/bin/env bash
# The prepared device check: the CuPy tests, then the GPU figures (benchmarks/gpu_check.py) as JSON.
#
#   bash benchmarks/gpu_check.sh [OUT.json]      (default gpu_check.json)
#
# Needs octn4 installed with its test dependencies (make venv) plus CuPy for the machine's CUDA
# (pip install cupy-cuda12x, or cupy-cuda13x).  Python: $PYTHON, else .venv/bin/python, else python3.
# On a bare machine that has CuPy but not octn4's dependencies, benchmarks/gpu_wheels.sh fetches them here
# as wheels to carry (lib/ is put on PYTHONPATH below, so octn4 itself need not be installed).
# Without CuPy and a CUDA device it says so and exits 0; with them, a failing test or a failed
# measurement exits non-zero.  About 3-4 minutes on one H200 with 16 cores (SimpleITK's fits dominate).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
out=${1:-gpu_check.json}
if ! "$PY" -c "import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CuPy with a CUDA device for $PY; nothing to check"
    exit 0
fi
missing=$(PYTHONPATH=lib${PYTHONPATH:+:$PYTHONPATH} "$PY" - <<'PY'
import importlib.util
need = ["SimpleITK", "array_api_compat", "array_api_strict", "scipy", "pytest", "zarr"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: CuPy sees a GPU, but these are missing for $PY: $missing (make venv installs them)" >&2
    exit 2
fi
"$PY" -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print('gpu_check on', p['name'].decode())"
rc=0
echo "== CuPy tests (pytest -m gpu)"
PYTHONPATH=lib${PYTHONPATH:+:$PYTHONPATH} "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || rc=1
echo "== figures -> $out"
PYTHONPATH=lib${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py --json "$out" || rc=1
exit $rc
