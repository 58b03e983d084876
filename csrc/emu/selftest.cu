// SPDX-License-Identifier: Apache-2.0
// Kernels that misuse barriers and shuffles, for the emulator's own tests:
// each must fail its launch with a reason, never hang. Built only into
// build/libtcf_emu_selftest.so (make -C csrc/emu selftest), never into the
// C API library.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Threads >= `stop` return before the barrier the others wait at.
__global__ void early_exit_kernel(float *out, unsigned stop) {
  if (threadIdx.x >= stop) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Even and odd warps wait at two different __syncthreads() calls.
__global__ void divergent_barrier_kernel(float *out) {
  if ((threadIdx.x >> 5) & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 2.0f;
}

// A full-mask shuffle in a block whose last warp is partial.
__global__ void partial_warp_shuffle_kernel(float *out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Lane 0 skips the shuffle its warp does.
__global__ void missing_lane_shuffle_kernel(float *out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 != 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A correct kernel using every shuffle flavour and a shared-memory exchange:
// out[t] = value of lane t ^ 1, then lane t + 1, t - 1, lane 0, the block's
// reversed thread, each in its own row of `n` floats.
__global__ void shuffle_kernel(float *out) {
  __shared__ float tile[1024];
  const unsigned n = blockDim.x, t = threadIdx.x;
  const float v = static_cast<float>(t);
  out[0 * n + t] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[1 * n + t] = __shfl_down_sync(0xffffffffu, v, 1);
  out[2 * n + t] = __shfl_up_sync(0xffffffffu, v, 1);
  out[3 * n + t] = __shfl_sync(0xffffffffu, v, 0);
  tile[t] = v;
  __syncthreads();
  out[4 * n + t] = tile[n - 1 - t];
}

}  // namespace

extern "C" int tcf_emu_selftest(int which, float *out, unsigned threads) {
  switch (which) {
    case 0: TCF_LAUNCH(early_exit_kernel, 1, threads, 0, 0)(out, threads / 2); break;
    case 1: TCF_LAUNCH(divergent_barrier_kernel, 1, threads, 0, 0)(out); break;
    case 2: TCF_LAUNCH(partial_warp_shuffle_kernel, 1, threads, 0, 0)(out); break;
    case 3: TCF_LAUNCH(missing_lane_shuffle_kernel, 1, threads, 0, 0)(out); break;
    case 4: TCF_LAUNCH(shuffle_kernel, 2, threads, 0, 0)(out); break;
    case 5: TCF_LAUNCH(shuffle_kernel, 1, threads, 16, 0)(out); break;  // dynamic smem: refused
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char *tcf_emu_selftest_message(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
