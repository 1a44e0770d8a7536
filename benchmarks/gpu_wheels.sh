#!/usr/bin/env bash
# Download, here (with a network), the wheels that the GPU machine lacks and cannot fetch (it has no network):
# diffusers, open_clip and what they need beyond torch / transformers, and setuptools to install clipcond from the
# tree there, for Python 3.12 on x86-64 Linux, at the versions this checkout runs with. They go to
# benchmarks/wheels/ (ignored by git, ~11 MB), which the device run carries:
#   bash benchmarks/gpu_wheels.sh && <device> carry=benchmarks/wheels: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
diffusers=$(version diffusers)  # in the environment this checkout is developed in (pip install -e ".[dev]")
open_clip=$(version open_clip_torch)
rm -rf benchmarks/wheels && mkdir -p benchmarks/wheels
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --dest benchmarks/wheels \
    "diffusers==$diffusers" "open_clip_torch==$open_clip" ftfy wcwidth importlib_metadata zipp "setuptools>=70.1"
ls -l benchmarks/wheels
