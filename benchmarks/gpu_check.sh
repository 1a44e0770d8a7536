#!/usr/bin/env bash
# On the GPU machine (no network; torch, transformers and accelerate installed): install the wheels that
# benchmarks/gpu_wheels.sh downloaded and clipcond from this tree, then run benchmarks/gpu_check.py; its JSON goes
# to $OUT when the machine gives one (the device tool's folder that comes back), else to benchmarks/results/gpu_check/.
#   CLIPCOND_COMMIT=<the commit being measured> bash benchmarks/gpu_check.sh [gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_BREAK_SYSTEM_PACKAGES=1  # a lent machine's system Python may be marked externally managed (PEP 668)
"${PYTHON:-python3}" -m pip install --quiet --no-index --no-deps --force-reinstall benchmarks/wheels/*.whl
# clipcond from this tree (the code being measured), not an installed copy; as installed, outside the tree
"${PYTHON:-python3}" -m pip install --quiet --no-index --no-deps --no-build-isolation --force-reinstall .
rm -rf build
output=()
if [ -n "${OUT:-}" ]; then output=(--output "$OUT/gpu_check.json"); fi
cd /tmp  # run clipcond as installed, not from the source tree
"${PYTHON:-python3}" "$OLDPWD/benchmarks/gpu_check.py" ${output[@]+"${output[@]}"} "$@"
