#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# CI: compile csrc/ for sm_80 and sm_90 with warnings as errors, import
# teacache_fast._C, and build + run the torch-free C API example (its GPU part
# is skipped without a device). Needs nvcc; about a minute on 2 cores.
# Usage: .ci/build_cuda.sh [python]   (default: python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
start=$SECONDS

echo "== build teacache_fast._C (sm_80, sm_90)"
TEACACHE_FAST_BUILD_CUDA=1 TEACACHE_FAST_WERROR=1 TEACACHE_FAST_CUDA_ARCHS="80;90" \
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace

echo "== import teacache_fast._C"
"$PY" - <<'PY'
import teacache_fast._C as C
from teacache_fast.ops import OP_NAMES
archs = set(C.CUDA_ARCHS)
assert {"sm_80", "sm_90"} <= archs, f"compiled archs {C.CUDA_ARCHS}"
for name in OP_NAMES:
    assert callable(getattr(C, name)), name
print(f"teacache_fast._C {C.__version__}: archs {C.CUDA_ARCHS}, CUDA runtime {C.CUDART_VERSION}")
PY

echo "== torch-free C API example"
make -s -C csrc/tests -j"${MAX_JOBS:-2}" ARCHS=80 run

echo "== build_cuda.sh done in $((SECONDS - start)) s"
