// SPDX-License-Identifier: Apache-2.0
// A thread's share of a row held in registers (modulate_regs_kernel): loads,
// the exact two-pass statistics, stores. The share is for_each_fixed's: packs
// t, t + threads, ... of VEC elements, then tail element n - n % VEC + t.
#pragma once

#include <cmath>

#include "common.cuh"

namespace tcf {

// One thread's share of a row of S: PACKS packs of VEC (pack t + k * threads)
// as loaded, 32-bit words of raw bits (two 16-bit values per word), and one
// tail element (n - n % VEC + t, when t < n % VEC). Held packed, a 16-bit row
// takes half the registers; at() converts on use (exact).
template <typename S, int PACKS, int VEC>
struct RowRegs {
  static constexpr int kWords = VEC * static_cast<int>(sizeof(typename S::storage)) / 4;
  unsigned w[PACKS][kWords];
  float tail = 0.f;  // only read where loaded; set so no compiler sees it unset

  __device__ __forceinline__ float at(int k, int j) const {
    if (k < 0) return tail;
    if constexpr (kWords == VEC) return __uint_as_float(w[k][j]);
    else return S::to_f(static_cast<unsigned short>(j % 2 ? w[k][j / 2] >> 16 : w[k][j / 2] & 0xffffu));
  }
};

// TAIL_FIRST: load the tail element before the packs. Where fp32 x is a row's
// only input, ptxas places the first statistics barrier right after the pack
// loads, before a tail loaded last; elsewhere tail-first costs spills (both
// measured, sm_90, nvcc 13).
template <bool TAIL_FIRST = false, typename S, int PACKS, int VEC>
__device__ __forceinline__ void load_share(const typename S::storage *p, int64_t npacks, int64_t ntail,
                                           bool aligned, RowRegs<S, PACKS, VEC> &r) {
  constexpr int W = RowRegs<S, PACKS, VEC>::kWords;
  if (TAIL_FIRST && threadIdx.x < ntail) r.tail = S::to_f(p[npacks * VEC + threadIdx.x]);
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    const int64_t pk = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (pk < npacks) {
      const typename S::storage *q = p + pk * VEC;
      if (aligned) {
        load_words<W>(q, r.w[k]);
      } else if constexpr (W == VEC) {  // element-aligned 32-bit values
#pragma unroll
        for (int j = 0; j < W; ++j) r.w[k][j] = reinterpret_cast<const unsigned *>(q)[j];
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j)
          r.w[k][j] = static_cast<unsigned>(q[2 * j]) | (static_cast<unsigned>(q[2 * j + 1]) << 16);
      }
    }
  }
  if (!TAIL_FIRST && threadIdx.x < ntail) r.tail = S::to_f(p[npacks * VEC + threadIdx.x]);
}

// Calls f(value&, pack-or-tail index) on every element the thread holds, in
// for_each_fixed's order (packs, then the tail element).
template <int PACKS, int VEC, typename F>
__device__ __forceinline__ void each_held(int64_t npacks, int64_t ntail, F &&f) {
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
    if (threadIdx.x + static_cast<int64_t>(k) * blockDim.x < npacks) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) f(k, j);
    }
  if (threadIdx.x < ntail) f(-1, 0);
}

// mean and rstd of the held row: exact two passes over registers, separately
// rounded (no contraction), as the reference. NORM is a compile-time norm code:
// none has no reduction at all, RMSNorm one, LayerNorm two.
template <int NORM, typename S, int PACKS, int VEC>
__device__ __forceinline__ float2 held_stats(const RowRegs<S, PACKS, VEC> &x, int64_t npacks, int64_t ntail,
                                             int64_t cols, float eps) {
  static_assert(NORM == TCF_NORM_NONE || NORM == TCF_NORM_LAYER || NORM == TCF_NORM_RMS, "norm code");
  const float fcols = static_cast<float>(cols);
  auto at = [&](int k, int j) { return x.at(k, j); };
  float mean = 0.f, rstd = 1.f;
  if constexpr (NORM == TCF_NORM_LAYER) {
    float sum = 0.f;
    each_held<PACKS, VEC>(npacks, ntail, [&](int k, int j) { sum = __fadd_rn(sum, at(k, j)); });
    mean = block_sum(sum) / fcols;
  }
  if constexpr (NORM != TCF_NORM_NONE) {
    float sq = 0.f;
    each_held<PACKS, VEC>(npacks, ntail, [&](int k, int j) {
      const float d = __fsub_rn(at(k, j), mean);
      sq = __fadd_rn(sq, __fmul_rn(d, d));
    });
    rstd = 1.0f / sqrtf(block_sum(sq) / fcols + eps);
    if (!(rstd > 0.f)) rstd = NAN;  // overflowed sum of squares or a NaN input: poison m
  }
  return make_float2(mean, rstd);
}

}  // namespace tcf
