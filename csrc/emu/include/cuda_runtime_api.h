/* SPDX-License-Identifier: Apache-2.0
 *
 * Host emulation (csrc/emu/): the subset of the CUDA runtime API that the
 * teacache_fast C API calls, implemented on the CPU by simt_runtime.cpp.
 * Plain C, like the real header, so teacache_fast.h stays C-compatible.
 * Error codes and attribute numbers match the real runtime's.
 */
#ifndef TCF_EMU_CUDA_RUNTIME_API_H_
#define TCF_EMU_CUDA_RUNTIME_API_H_

#include <stddef.h>

#define TCF_EMU 1
/* The emulator implements this runtime version's semantics for the calls below. */
#define CUDART_VERSION 12000

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719
} cudaError_t;

typedef enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16
} cudaDeviceAttr;

typedef struct CUstream_st *cudaStream_t;

/* The fields the kernels' host code may read; the emulator has one image for
 * every device, so a kernel's attributes are always found. */
typedef struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion;
} cudaFuncAttributes;

cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorName(cudaError_t error);
const char *cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);
/* Host memory stands in for device memory; launches and memsets run to
 * completion before they return, so synchronization is a no-op. */
cudaError_t cudaMemsetAsync(void *ptr, int value, size_t count, cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize(void);
/* Launches nothing; counted in tcf_emu_counters as neither launch nor block. */
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attr, const void *func);

#ifdef __cplusplus
}
#endif

#endif /* TCF_EMU_CUDA_RUNTIME_API_H_ */
