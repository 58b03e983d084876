// SPDX-License-Identifier: Apache-2.0
// Shared device helpers for the teacache_fast kernels: dtype traits, vector
// loads, the row split into an aligned vector body and scalar edges, block
// reductions, and the launch geometry every op derives from the SM count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "teacache_fast.h"

// Every launch is written TCF_LAUNCH(kernel, grid, block, smem, stream)(args...)
// (a template kernel in parentheses): the triple-chevron launch, unless the
// build defines TCF_LAUNCH itself.
#ifndef TCF_LAUNCH
#define TCF_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace tcf {

// ---------------------------------------------------------------- dtype traits
// Storage is a raw bit pattern for the 16-bit types, so packs stay trivial.
struct F32 {
  using storage = float;
  __device__ __forceinline__ static float to_f(float v) { return v; }
  __device__ __forceinline__ static float from_f(float v) { return v; }
};
struct F16 {
  using storage = unsigned short;
  __device__ __forceinline__ static float to_f(unsigned short v) {
    return __half2float(__ushort_as_half(v));
  }
  __device__ __forceinline__ static unsigned short from_f(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
struct BF16 {
  using storage = unsigned short;
  __device__ __forceinline__ static float to_f(unsigned short v) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  }
  __device__ __forceinline__ static unsigned short from_f(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// Elements per 128-bit access of the main tensor.
template <typename T>
__host__ __device__ constexpr int vec_of() { return 16 / static_cast<int>(sizeof(typename T::storage)); }

// Alignment of W elements of S (capped at 16 bytes: wider packs split in two).
template <typename S, int W>
__host__ __device__ constexpr int pack_align() { return W * sizeof(S) < 16 ? static_cast<int>(W * sizeof(S)) : 16; }

// Packs move as 32-bit words (two 16-bit values per word) through explicit
// uint4/uint2 accesses (stores through __stwb: a plain uint4 store was split
// into 32-bit stores in some kernels), so 128-bit ld/st are emitted.
template <int N32>
__device__ __forceinline__ void load_words(const void *p, unsigned (&w)[N32]) {
  if constexpr (N32 % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N32 / 4; ++k) {
      const uint4 v = reinterpret_cast<const uint4 *>(p)[k];
      w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
    }
  } else if constexpr (N32 == 2) {
    const uint2 v = *reinterpret_cast<const uint2 *>(p);
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(N32 == 1, "packs are 1, 2 or a multiple of 4 words");
    w[0] = *reinterpret_cast<const unsigned *>(p);
  }
}

template <int N32>
__device__ __forceinline__ void store_words(void *p, const unsigned (&w)[N32]) {
  if constexpr (N32 % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N32 / 4; ++k)
      __stwb(reinterpret_cast<uint4 *>(p) + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
  } else if constexpr (N32 == 2) {
    __stwb(reinterpret_cast<uint2 *>(p), make_uint2(w[0], w[1]));
  } else {
    static_assert(N32 == 1, "packs are 1, 2 or a multiple of 4 words");
    *reinterpret_cast<unsigned *>(p) = w[0];
  }
}

template <typename T, int W>
__device__ __forceinline__ void load(const typename T::storage *p, float (&out)[W]) {
  if constexpr (sizeof(typename T::storage) == 4) {
    unsigned w[W];
    load_words<W>(p, w);
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = __uint_as_float(w[j]);
  } else if constexpr (W == 1) {
    out[0] = T::to_f(*p);
  } else {
    unsigned w[W / 2];
    load_words<W / 2>(p, w);
#pragma unroll
    for (int k = 0; k < W / 2; ++k) {
      out[2 * k] = T::to_f(static_cast<unsigned short>(w[k] & 0xffffu));
      out[2 * k + 1] = T::to_f(static_cast<unsigned short>(w[k] >> 16));
    }
  }
}

template <typename T, int W>
__device__ __forceinline__ void store(typename T::storage *p, const float (&in)[W]) {
  if constexpr (sizeof(typename T::storage) == 4) {
    unsigned w[W];
#pragma unroll
    for (int j = 0; j < W; ++j) w[j] = __float_as_uint(in[j]);
    store_words<W>(p, w);
  } else if constexpr (W == 1) {
    *p = T::from_f(in[0]);
  } else {
    unsigned w[W / 2];
#pragma unroll
    for (int k = 0; k < W / 2; ++k)
      w[k] = static_cast<unsigned>(T::from_f(in[2 * k])) |
             (static_cast<unsigned>(T::from_f(in[2 * k + 1])) << 16);
    store_words<W / 2>(p, w);
  }
}

template <typename T, int W>
__device__ __forceinline__ bool pack_aligned(const void *p) {
  return reinterpret_cast<uintptr_t>(p) % pack_align<typename T::storage, W>() == 0;
}

// ---------------------------------------------------------------- row split
// A row of n elements = scalar head (until the main pointer is 16-byte aligned)
// + nvec packs of VEC + scalar tail. When another pointer of the row is not
// aligned the same way, the whole row takes the scalar path.
struct RowSplit {
  int64_t head;
  int64_t nvec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void *main, int64_t n) {
  constexpr int VEC = vec_of<T>();
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(main) % 16) /
                      static_cast<int64_t>(sizeof(typename T::storage));
  int64_t head = mis ? VEC - mis : 0;
  if (head > n) head = n;
  return RowSplit{head, (n - head) / VEC};
}

__device__ __forceinline__ RowSplit scalar_row(int64_t n) { return RowSplit{n, 0}; }

// Calls f(i, std::integral_constant<int, W>) for W = VEC over the packs and
// W = 1 over the head and tail elements, spread over `nthreads` threads.
template <int VEC, typename F>
__device__ __forceinline__ void for_each(const RowSplit &s, int64_t n, int64_t tid,
                                         int64_t nthreads, F &&f) {
  for (int64_t v = tid; v < s.nvec; v += nthreads)
    f(s.head + v * VEC, std::integral_constant<int, VEC>{});
  const int64_t tail0 = s.head + s.nvec * VEC;
  const int64_t nscalar = s.head + (n - tail0);
  for (int64_t k = tid; k < nscalar; k += nthreads)
    f(k < s.head ? k : tail0 + (k - s.head), std::integral_constant<int, 1>{});
}

// ---------------------------------------------------------------- fixed-order rows
// What the reductions use, so that a sum's bits depend on the input alone: pack
// k of a row of n elements is [k * VEC, k * VEC + VEC); thread `tid` of
// `nthreads` owns packs tid, tid + nthreads, ... and then the tail elements
// n - n % VEC + tid, ... one each. `aligned` (every pointer of the row 16-byte
// aligned at element 0) only picks 128-bit or scalar loads of the same elements
// in the same order. Calls f(i, std::integral_constant<int, W>, std::bool_constant<A>)
// with A = vector access allowed.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_fixed(int64_t n, int64_t tid, int64_t nthreads, bool aligned,
                                               F &&f) {
  const int64_t npacks = n / VEC;
  if (aligned) {
    for (int64_t k = tid; k < npacks; k += nthreads)
      f(k * VEC, std::integral_constant<int, VEC>{}, std::true_type{});
  } else {
    for (int64_t k = tid; k < npacks; k += nthreads)
      f(k * VEC, std::integral_constant<int, VEC>{}, std::false_type{});
  }
  for (int64_t i = npacks * VEC + tid; i < n; i += nthreads)
    f(i, std::integral_constant<int, 1>{}, std::true_type{});
}

// load/store of W elements: one pack when A, else W scalar accesses.
template <typename T, int W, bool A>
__device__ __forceinline__ void load_as(const typename T::storage *p, float (&out)[W]) {
  if constexpr (A) {
    load<T, W>(p, out);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = T::to_f(p[j]);
  }
}

template <typename T, int W, bool A>
__device__ __forceinline__ void store_as(typename T::storage *p, const float (&in)[W]) {
  if constexpr (A) {
    store<T, W>(p, in);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = T::from_f(in[j]);
  }
}

__device__ __forceinline__ bool aligned16(const void *p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// ---------------------------------------------------------------- reductions
// Butterfly warp sum, then warp 0 sums the per-warp values: a fixed order, so
// the result does not depend on scheduling. blockDim.x must be a multiple of 32.
// Every thread gets the block total. Safe to call repeatedly.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float2 block_sum2(float2 v) {
  __shared__ float2 warp_vals[32];
  __shared__ float2 total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  __syncthreads();  // a previous call may still be reading warp_vals / total
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    float2 w = lane < nwarps ? warp_vals[lane] : make_float2(0.f, 0.f);
    w.x = warp_sum(w.x);
    w.y = warp_sum(w.y);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

__device__ __forceinline__ float block_sum(float v) {
  return block_sum2(make_float2(v, 0.f)).x;
}

// The block's sum of v written as one (x, y) pair at dst (a workspace slot or
// an output's partials), by thread 0. Every thread of the block must call it.
__device__ __forceinline__ void store_block_pair(float *dst, float2 v) {
  v = block_sum2(v);
  if (threadIdx.x == 0) {
    dst[0] = v.x;
    dst[1] = v.y;
  }
}

// ---------------------------------------------------------------- stage 2
// Output o = the sum of its `per_output` consecutive workspace pairs, by one
// block, in a fixed order. L2 loads (__ldcg): the pairs may come from other
// blocks of the same launch (the fused path below).
__device__ __forceinline__ void finish_output(const float *ws, float *partials, int64_t o,
                                              int64_t per_output) {
  const float *src = ws + o * per_output * 2;
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t i = threadIdx.x; i < per_output; i += blockDim.x) {
    acc.x += __ldcg(src + 2 * i);
    acc.y += __ldcg(src + 2 * i + 1);
  }
  store_block_pair(partials + 2 * o, acc);
}

// One launch per reduction: after writing its pairs, each block takes an
// integer ticket; the block that takes the last one adds every output's pairs
// (finish_output, the order of finish_partials_kernel: the same bits) and
// resets the ticket for the next launch. No float atomics.
__device__ __forceinline__ void finish_in_last_block(const float *ws, float *partials,
                                                     int64_t outputs, int64_t per_output,
                                                     unsigned *ticket) {
  __shared__ unsigned last;
  __threadfence();  // this block's pairs are visible to the whole device before its ticket
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x * gridDim.y - 1u;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t o = 0; o < outputs; ++o) finish_output(ws, partials, o, per_output);
  if (threadIdx.x == 0) *ticket = 0u;
}

// ---------------------------------------------------------------- host side
constexpr int kThreads = 256;   // elementwise and reduction blocks
constexpr int kBlocksPerSm = 8; // resident 256-thread blocks per SM we aim for
constexpr int kMaxGridY = 65535;

// SM count of the current device, cached per device (cudaDeviceGetAttribute
// costs a driver call). Returns a CUDA error code, 0 on success.
cudaError_t sm_count(int *out);

// The fixed partition of the reductions (the same on every GPU and MIG slice):
// rel_l1_partials sums chunks of kChunkPacks packs per thread of a kThreads
// block, the indicator chunks of kRowsPerChunk rows; one fp32 pair per chunk,
// added in chunk order. Only how many blocks share the chunks follows the SM count.
constexpr int kChunkPacks = 4;
constexpr int kRowsPerChunk = 4;
// Up to this many outputs the last block of the launch finishes the sums (one
// launch); more (a large per-sample batch) take the finishing kernel, whose
// blocks share the outputs.
constexpr int64_t kFusedOutputs = 64;

// The workspace: one 32-bit ticket word (zero before the first call; every
// call leaves it zero), then `pairs` fp32 pairs. The ticket comes first, so a
// workspace sized for a larger shape serves any smaller one as is.
inline int64_t workspace_floats_for(int64_t pairs) { return 1 + pairs * 2; }
inline unsigned *ticket_of(float *workspace) { return reinterpret_cast<unsigned *>(workspace); }
inline float *pairs_of(float *workspace) { return workspace + 1; }

// Blocks per sample so that the whole grid fills the device about once, for a
// kernel of which per_sm blocks are resident per SM.
inline int64_t blocks_per_sample(int sms, int64_t batch, int64_t work_blocks, int per_sm = kBlocksPerSm) {
  int64_t target = static_cast<int64_t>(sms) * per_sm;
  int64_t per = (target + batch - 1) / (batch > 0 ? batch : 1);
  if (per > work_blocks) per = work_blocks;
  return per < 1 ? 1 : per;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int row_threads(int64_t cols, int vec) {
  int64_t t = ceil_div(ceil_div(cols, vec), 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kThreads ? kThreads : t));
}

inline unsigned grid_y(int64_t batch) {
  return static_cast<unsigned>(batch < kMaxGridY ? batch : kMaxGridY);
}

// Error reporting (status.cu). fail() formats the thread's message.
tcf_status fail(tcf_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
tcf_status ok();
// After a launch: TCF_ERROR_CUDA with the op's name if the launch failed.
tcf_status check_launch(const char *op);
tcf_status cuda_fail(const char *op, cudaError_t err);

bool valid_dtype(int dtype);
int dtype_size(tcf_dtype dtype);
const char *dtype_name(int dtype);
// Checks a pointer that must be non-NULL and element-aligned.
tcf_status check_ptr(const char *op, const char *name, const void *p, int elem_size);

// Partial-sum finalizer shared by both reductions (defined in rel_l1.cu).
tcf_status finish_partials(const char *op, const float *workspace, float *partials,
                           int64_t outputs, int64_t per_output, cudaStream_t stream);

}  // namespace tcf

// Dispatch on a runtime dtype code to a traits type `TT`.
#define TCF_DISPATCH(code, TT, ...)          \
  switch (code) {                            \
    case TCF_FLOAT32: {                      \
      using TT = ::tcf::F32;                 \
      __VA_ARGS__;                           \
    } break;                                 \
    case TCF_FLOAT16: {                      \
      using TT = ::tcf::F16;                 \
      __VA_ARGS__;                           \
    } break;                                 \
    case TCF_BFLOAT16: {                     \
      using TT = ::tcf::BF16;                \
      __VA_ARGS__;                           \
    } break;                                 \
  }
