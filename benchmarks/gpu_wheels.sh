#!/usr/bin/env bash
# Wheels that a bare GPU machine with CuPy (Python 3.12, x86-64) lacks for benchmarks/gpu_check.sh, into .whl/
# (ignored by .gitignore; name it in the device call's carry).  There, before the check:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
#   bash benchmarks/gpu_wheels.sh            # what the figures need: SimpleITK, array_api_compat (51 MB)
#   bash benchmarks/gpu_wheels.sh --tests    # and what the CuPy tests import (65 MB; a device call carries
#                                            # 64 MiB with the working tree: if it is refused, install the
#                                            # figures' set in one call and the rest in the next, while warm)
set -euo pipefail
cd "$(dirname "$0")/.."
# each name at the version constraints.txt pins (names compared with - and _ alike)
pins() { for n in "$@"; do grep -iE "^${n//[-_]/[-_]}==" constraints.txt || echo "$n"; done; }
want=$(pins simpleitk array-api-compat)
if [ "${1:-}" = "--tests" ]; then
    # ome-zarr's own needs beyond that image (dask and what it takes, its models); not yet tried on one
    want="$want $(pins array-api-strict zarr numcodecs donfig google-crc32c ome-zarr ome-zarr-models \
        pydantic-zarr pydantic pydantic-core annotated-types typing-inspection dask partd locket rangehttpserver \
        transformnd)"
fi
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl $want
du -sh .whl
