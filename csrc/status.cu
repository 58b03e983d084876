// SPDX-License-Identifier: Apache-2.0
// Status codes, the per-thread error message, argument checks and the cached
// SM count: the host plumbing every op of the C API shares.
#include <atomic>
#include <cstdarg>
#include <cstdio>

#include "common.cuh"

namespace tcf {
namespace {

thread_local char g_message[512] = "";

constexpr int kMaxDevices = 64;
std::atomic<int> g_sm_count[kMaxDevices];  // 0 = not queried yet

}  // namespace

tcf_status fail(tcf_status status, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_message, sizeof(g_message), fmt, args);
  va_end(args);
  return status;
}

tcf_status ok() { return TCF_SUCCESS; }

tcf_status cuda_fail(const char *op, cudaError_t err) {
  return fail(TCF_ERROR_CUDA, "%s: CUDA error %s: %s", op, cudaGetErrorName(err),
              cudaGetErrorString(err));
}

tcf_status check_launch(const char *op) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? ok() : cuda_fail(op, err);
}

cudaError_t sm_count(int *out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) {
    const int cached = g_sm_count[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return cudaSuccess;
    }
  }
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (sms < 1) sms = 1;
  if (device >= 0 && device < kMaxDevices)
    g_sm_count[device].store(sms, std::memory_order_relaxed);  // same value from any racer
  *out = sms;
  return cudaSuccess;
}

bool valid_dtype(int dtype) {
  return dtype == TCF_FLOAT32 || dtype == TCF_FLOAT16 || dtype == TCF_BFLOAT16;
}

int dtype_size(tcf_dtype dtype) { return dtype == TCF_FLOAT32 ? 4 : 2; }

const char *dtype_name(int dtype) {
  switch (dtype) {
    case TCF_FLOAT32: return "float32";
    case TCF_FLOAT16: return "float16";
    case TCF_BFLOAT16: return "bfloat16";
    default: return "unknown";
  }
}

tcf_status check_ptr(const char *op, const char *name, const void *p, int elem_size) {
  if (p == nullptr) return fail(TCF_ERROR_INVALID_VALUE, "%s: %s must not be NULL", op, name);
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(elem_size) != 0)
    return fail(TCF_ERROR_INVALID_VALUE, "%s: %s (%p) is not aligned to its element size (%d bytes)",
                op, name, p, elem_size);
  return ok();
}

}  // namespace tcf

namespace {
__global__ void probe_kernel() {}
}  // namespace

// No launch and no synchronization (a first op call may sit inside a CUDA-graph
// capture): asking for a kernel's attributes loads this build's image for the
// current GPU, and fails when there is none or the driver is too old for it.
extern "C" tcf_status tcf_device_check(void) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count == 0) err = cudaErrorNoDevice;
  if (err != cudaSuccess) return tcf::cuda_fail("tcf_device_check", err);
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, reinterpret_cast<const void *>(probe_kernel));
  return err == cudaSuccess ? TCF_SUCCESS : tcf::cuda_fail("tcf_device_check", err);
}

extern "C" const char *tcf_last_error(void) { return tcf::g_message; }

extern "C" const char *tcf_status_string(tcf_status status) {
  switch (status) {
    case TCF_SUCCESS: return "TCF_SUCCESS";
    case TCF_ERROR_INVALID_VALUE: return "TCF_ERROR_INVALID_VALUE";
    case TCF_ERROR_CUDA: return "TCF_ERROR_CUDA";
    default: return "TCF_UNKNOWN_STATUS";
  }
}
