// SPDX-License-Identifier: Apache-2.0
// rel_l1_partials: [sum |cur - prev|, sum |prev|], and the second reduction
// stage that both indicator ops share. Stage 1 writes one fp32 pair per chunk
// of a fixed partition; stage 2 adds them in a fixed order (no atomics), so
// results are bitwise reproducible on every device.
#include "common.cuh"

namespace tcf {
namespace {

// Stage 2: output o = sum of its `per_output` consecutive workspace pairs.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) finish_partials_kernel(const float *__restrict__ ws, float *__restrict__ partials,
                                       int64_t outputs, int64_t per_output) {
  for (int64_t o = blockIdx.x; o < outputs; o += gridDim.x) finish_output(ws, partials, o, per_output);
}

// Stage 1: chunks of kChunkPacks * kThreads packs of each sample (y); block x
// sums chunks x, x + gridDim.x, ... and writes one pair per chunk, so neither
// the grid size nor the pointers' alignment changes a bit of the result.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) rel_l1_kernel(const typename T::storage *__restrict__ cur,
                              const typename T::storage *__restrict__ prev,
                              float *__restrict__ ws, int64_t batch, int64_t len,
                              float *__restrict__ partials, int64_t outputs, int64_t per_output,
                              unsigned *__restrict__ ticket) {
  constexpr int VEC = vec_of<T>();
  constexpr int64_t kChunk = static_cast<int64_t>(kChunkPacks) * kThreads * VEC;
  const int64_t nchunks = (len + kChunk - 1) / kChunk;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const typename T::storage *c = cur + b * len;
    const typename T::storage *p = prev + b * len;
    const bool aligned = aligned16(c) && aligned16(p);
    for (int64_t k = blockIdx.x; k < nchunks; k += gridDim.x) {
      const int64_t base = k * kChunk;
      const int64_t n = len - base < kChunk ? len - base : kChunk;
      float2 acc = make_float2(0.f, 0.f);
      for_each_fixed<VEC>(n, threadIdx.x, blockDim.x, aligned, [&](int64_t i, auto w, auto a) {
        constexpr int W = decltype(w)::value;
        constexpr bool A = decltype(a)::value;
        float cv[W], pv[W];
        load_as<T, W, A>(c + base + i, cv);
        load_as<T, W, A>(p + base + i, pv);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          acc.x += fabsf(cv[j] - pv[j]);
          acc.y += fabsf(pv[j]);
        }
      });
      store_block_pair(ws + (b * nchunks + k) * 2, acc);
    }
  }
  if (ticket != nullptr) finish_in_last_block(ws, partials, outputs, per_output, ticket);  // fused
}

// Chunks per sample: the partition, a function of the shape and dtype only.
int64_t rel_l1_chunks(int64_t len, tcf_dtype dtype) {
  return ceil_div(len, static_cast<int64_t>(kChunkPacks) * kThreads * (16 / dtype_size(dtype)));
}

}  // namespace

tcf_status finish_partials(const char *op, const float *workspace, float *partials,
                           int64_t outputs, int64_t per_output, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(outputs < kMaxGridY ? outputs : kMaxGridY);
  TCF_LAUNCH(finish_partials_kernel, grid, kThreads, 0, stream)(workspace, partials, outputs,
                                                                per_output);
  return check_launch(op);
}

}  // namespace tcf

using namespace tcf;

extern "C" tcf_status tcf_rel_l1_workspace_size(int64_t batch, int64_t len, tcf_dtype dtype,
                                                size_t *floats) {
  const char *op = "tcf_rel_l1_workspace_size";
  if (floats == nullptr) return fail(TCF_ERROR_INVALID_VALUE, "%s: floats must not be NULL", op);
  if (!valid_dtype(dtype)) return fail(TCF_ERROR_INVALID_VALUE, "%s: unknown dtype code %d", op, (int)dtype);
  if (batch < 0 || len < 0)
    return fail(TCF_ERROR_INVALID_VALUE, "%s: batch (%lld) and len (%lld) must be >= 0", op,
                (long long)batch, (long long)len);
  if (batch == 0 || len == 0) {
    *floats = 0;
    return ok();
  }
  *floats = static_cast<size_t>(workspace_floats_for(batch * rel_l1_chunks(len, dtype)));
  return ok();
}

extern "C" tcf_status tcf_rel_l1_partials(const void *cur, const void *prev, float *partials,
                                          int64_t batch, int64_t len, tcf_dtype dtype,
                                          int per_sample, float *workspace,
                                          size_t workspace_floats, cudaStream_t stream) {
  const char *op = "tcf_rel_l1_partials";
  if (!valid_dtype(dtype))
    return fail(TCF_ERROR_INVALID_VALUE, "%s: unknown dtype code %d (expected 0 float32, 1 float16, 2 bfloat16)",
                op, (int)dtype);
  if (batch < 0 || len < 0)
    return fail(TCF_ERROR_INVALID_VALUE, "%s: batch (%lld) and len (%lld) must be >= 0", op,
                (long long)batch, (long long)len);
  const int64_t outputs = per_sample ? batch : 1;
  if (outputs > 0 && check_ptr(op, "partials", partials, 4) != TCF_SUCCESS) return TCF_ERROR_INVALID_VALUE;
  if (batch == 0 || len == 0) {  // empty sums are zero
    if (outputs == 0) return ok();
    const cudaError_t err = cudaMemsetAsync(partials, 0, sizeof(float) * 2 * outputs, stream);
    return err == cudaSuccess ? ok() : cuda_fail(op, err);
  }
  const int esize = dtype_size(dtype);
  if (check_ptr(op, "cur", cur, esize) != TCF_SUCCESS || check_ptr(op, "prev", prev, esize) != TCF_SUCCESS ||
      check_ptr(op, "workspace", workspace, 4) != TCF_SUCCESS)
    return TCF_ERROR_INVALID_VALUE;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return cuda_fail(op, err);
  const int64_t nchunks = rel_l1_chunks(len, dtype);
  const int64_t need = workspace_floats_for(batch * nchunks);
  if (workspace_floats < static_cast<size_t>(need))
    return fail(TCF_ERROR_INVALID_VALUE,
                "%s: workspace holds %zu floats, needs %lld (ask tcf_rel_l1_workspace_size)", op,
                workspace_floats, (long long)need);
  const int64_t per_output = per_sample ? nchunks : batch * nchunks;
  unsigned *ticket = outputs <= kFusedOutputs ? ticket_of(workspace) : nullptr;
  const int64_t nblk = blocks_per_sample(sms, batch, nchunks);
  const dim3 grid(static_cast<unsigned>(nblk), grid_y(batch));
  TCF_DISPATCH(dtype, T,
               TCF_LAUNCH(rel_l1_kernel<T>, grid, kThreads, 0, stream)(
                   static_cast<const typename T::storage *>(cur),
                   static_cast<const typename T::storage *>(prev), pairs_of(workspace), batch, len, partials,
                   outputs, per_output, ticket));
  const tcf_status st = check_launch(op);
  if (st != TCF_SUCCESS || ticket != nullptr) return st;
  return finish_partials(op, pairs_of(workspace), partials, outputs, per_output, stream);
}
