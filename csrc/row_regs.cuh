// SPDX-License-Identifier: Apache-2.0
// A thread's share of a row held in registers (modulate_regs_kernel): loads,
// the exact two-pass statistics, stores. The share is for_each_fixed's: packs
// t, t + threads, ... of VEC elements, then tail element n - n % VEC + t.
#pragma once

#include <cmath>

#include "common.cuh"

namespace tcf {

// One thread's share of a row: PACKS packs of VEC (pack t + k * threads) and one
// tail element (n - n % VEC + t, when t < n % VEC).
template <int PACKS, int VEC>
struct RowRegs {
  float v[PACKS][VEC];
  float tail = 0.f;  // only read where loaded; set so no compiler sees it unset
};

template <typename S, int PACKS, int VEC>
__device__ __forceinline__ void load_share(const typename S::storage *p, int64_t npacks, int64_t ntail,
                                           bool aligned, RowRegs<PACKS, VEC> &r) {
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    const int64_t pk = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (pk < npacks) {
      if (aligned) load_as<S, VEC, true>(p + pk * VEC, r.v[k]);
      else load_as<S, VEC, false>(p + pk * VEC, r.v[k]);
    }
  }
  if (threadIdx.x < ntail) r.tail = S::to_f(p[npacks * VEC + threadIdx.x]);
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
// rounded (no contraction), as the reference.
template <int PACKS, int VEC>
__device__ __forceinline__ float2 held_stats(const RowRegs<PACKS, VEC> &x, int64_t npacks, int64_t ntail,
                                             int64_t cols, int norm, float eps) {
  const float fcols = static_cast<float>(cols);
  auto at = [&](int k, int j) { return k < 0 ? x.tail : x.v[k][j]; };
  float mean = 0.f, rstd = 1.f;
  if (norm == TCF_NORM_LAYER) {
    float sum = 0.f;
    each_held<PACKS, VEC>(npacks, ntail, [&](int k, int j) { sum = __fadd_rn(sum, at(k, j)); });
    mean = block_sum(sum) / fcols;
  }
  if (norm != TCF_NORM_NONE) {
    float sq = 0.f;
    each_held<PACKS, VEC>(npacks, ntail, [&](int k, int j) {
      const float d = __fsub_rn(at(k, j), mean);
      sq = __fadd_rn(sq, __fmul_rn(d, d));
    });
    rstd = 1.0f / sqrtf(block_sum(sq) / fcols + eps);
  }
  if (!(rstd > 0.f)) rstd = NAN;  // overflowed sum of squares or a NaN input: poison m
  return make_float2(mean, rstd);
}

template <typename S, int PACKS, int VEC>
__device__ __forceinline__ void store_share(typename S::storage *p, int64_t npacks, int64_t ntail,
                                            bool aligned, const RowRegs<PACKS, VEC> &r) {
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    const int64_t pk = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (pk < npacks) {
      if (aligned) store_as<S, VEC, true>(p + pk * VEC, r.v[k]);
      else store_as<S, VEC, false>(p + pk * VEC, r.v[k]);
    }
  }
  if (threadIdx.x < ntail) p[npacks * VEC + threadIdx.x] = S::from_f(r.tail);
}

}  // namespace tcf
