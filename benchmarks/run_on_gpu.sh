#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Everything a GPU session has to do, in one command: build csrc/ for this GPU,
# run the whole test suite on CUDA tensors (cuda vs triton vs torch vs float64),
# then the op and end-to-end benchmarks. Results and logs go to $OUT (default
# benchmarks/results); commit the tables it writes there, named by device.
#
#   OUT=/tmp/out benchmarks/run_on_gpu.sh            # full run (about 15 min on an H100)
#   QUICK=1 benchmarks/run_on_gpu.sh                 # small + FLUX sizes only
#
# Needs python with torch (CUDA), triton, pybind11, ninja, pytest, hypothesis,
# numpy, matplotlib, tqdm; diffusers + transformers for the wrapper tests and
# the e2e benchmark (put wheels in .whl/ to have them installed offline).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/gpu-session.log"; }

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/gpu-session.log"
nvcc --version | tail -2 | tee -a "$OUT/gpu-session.log"
ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
log "sm_$ARCH, torch $("$PY" -c 'import torch; print(torch.__version__)'), triton $("$PY" -c 'import triton; print(triton.__version__)')"

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps .whl/*.whl
fi
TEACACHE_FAST_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
log "build teacache_fast._C for sm_$ARCH"
TEACACHE_FAST_BUILD_CUDA=1 TEACACHE_FAST_CUDA_ARCHS="$ARCH" "$PY" setup.py -q build_ext --inplace \
    2>&1 | tee -a "$OUT/gpu-session.log" || exit 1
"$PY" -m teacache_fast info | tee -a "$OUT/gpu-session.log"

log "tests on CUDA tensors"
"$PY" -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -30
log "torch-free C API example"
make -s -C csrc/tests ARCHS="$ARCH" run 2>&1 | tee -a "$OUT/gpu-session.log"

QUICK_FLAG=${QUICK:+--quick}
log "op benchmark"
"$PY" -m teacache_fast bench $QUICK_FLAG --out "$OUT" 2>&1 | tail -5 | tee -a "$OUT/gpu-session.log"
log "end-to-end benchmark"
"$PY" -m teacache_fast bench e2e $QUICK_FLAG --out "$OUT" 2>&1 | tail -5 | tee -a "$OUT/gpu-session.log"
log "done"
