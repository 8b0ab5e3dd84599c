#!/usr/bin/env bash
# Build and tag octn4's images from the repository root: the CPU and CUDA 12 Docker images and,
# when apptainer is installed, their Apptainer (.sif) twins.  The tags are the package version,
# the ones the Nextflow modules pin.
#
#   containers/build.sh                 # build
#   PUSH=1 containers/build.sh          # build and push the Docker images
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
registry=${REGISTRY:-ghcr.io/octn4}
cpu="${registry}/octn4:${version}"
cuda="${registry}/octn4-cuda:${version}"

docker build -f containers/Dockerfile --build-arg OCTN4_VERSION="${version}" -t "${cpu}" .
docker build -f containers/Dockerfile --build-arg OCTN4_VERSION="${version}" --build-arg EXTRAS=gpu -t "${cuda}" .

if command -v apptainer > /dev/null; then
    apptainer build --force "octn4_${version}.sif" containers/octn4.def
    apptainer build --force --build-arg IMAGE="${cuda}" "octn4-cuda_${version}.sif" containers/octn4.def
fi
if [ "${PUSH:-0}" = 1 ]; then
    docker push "${cpu}"
    docker push "${cuda}"
fi
echo "built ${cpu} and ${cuda}"
