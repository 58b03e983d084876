// SPDX-License-Identifier: Apache-2.0
// teacache_decide_: steps 3-4 of TeaCache for `count` independent states, on
// the device, so the caller never waits for the indicator on the host.
// Arithmetic mirrors the torch reference op by op (separately rounded fp32
// mul/add, no FMA) so both give the same bits.
#include <cmath>

#include "common.cuh"

namespace tcf {
namespace {

// Highest power first, left-padded with zeros to TCF_MAX_COEFFICIENTS: the
// Horner loop then has a compile-time trip count, unrolls, and keeps every
// coefficient in the constant bank (no stack frame). Each leading zero step is
// p = 0 * r + 0 = +0 (r is finite), so the padding changes no bit.
struct Poly {
  float c[TCF_MAX_COEFFICIENTS];
};

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) decide_kernel(const float *__restrict__ partials, float *__restrict__ state,
                              Poly poly, float threshold, bool never_skip,
                              const uint8_t *__restrict__ force, int64_t max_skips,
                              bool accumulate_abs, uint8_t *__restrict__ compute, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float num = partials[2 * i], den = partials[2 * i + 1];
    const float acc = state[2 * i], skips = state[2 * i + 1];
    const float rel = __fdiv_rn(num, den);
    const bool valid = isfinite(num) && isfinite(den) && den != 0.f && isfinite(rel);
    const float r = valid ? rel : 0.f;
    float p = 0.f;
#pragma unroll
    for (int k = 0; k < TCF_MAX_COEFFICIENTS; ++k) p = __fadd_rn(__fmul_rn(p, r), poly.c[k]);
    if (accumulate_abs) p = fabsf(p);
    const float new_acc = __fadd_rn(acc, p);
    bool go = (force != nullptr && force[i] != 0) || !valid || !isfinite(new_acc) ||
              new_acc >= threshold || never_skip;
    if (max_skips >= 0) go = go || skips >= static_cast<float>(max_skips);
    go = go || !(isfinite(skips) && skips >= 0.f);  // a corrupt skip counter computes
    state[2 * i] = go ? 0.f : new_acc;
    state[2 * i + 1] = go ? 0.f : __fadd_rn(skips, 1.f);
    compute[i] = go ? 1 : 0;
  }
}

}  // namespace
}  // namespace tcf

using namespace tcf;

extern "C" tcf_status tcf_teacache_decide(const float *partials, float *state,
                                          const float *coefficients, int num_coefficients,
                                          double threshold, const uint8_t *force,
                                          int64_t max_skips, int accumulate_abs,
                                          uint8_t *compute, int64_t count, cudaStream_t stream) {
  const char *op = "tcf_teacache_decide";
  const tcf_status bad = TCF_ERROR_INVALID_VALUE;
  if (count < 0) return fail(bad, "%s: count must be >= 0, got %lld", op, (long long)count);
  if (num_coefficients < 1 || num_coefficients > TCF_MAX_COEFFICIENTS)
    return fail(bad, "%s: num_coefficients must be 1..%d, got %d", op, TCF_MAX_COEFFICIENTS,
                num_coefficients);
  if (coefficients == nullptr) return fail(bad, "%s: coefficients must not be NULL", op);
  Poly poly{};  // zeros
  const int pad = TCF_MAX_COEFFICIENTS - num_coefficients;
  for (int k = 0; k < num_coefficients; ++k) {
    if (!std::isfinite(coefficients[k]))
      return fail(bad, "%s: coefficients[%d] must be finite, got %g", op, k, (double)coefficients[k]);
    poly.c[pad + k] = coefficients[k];
  }
  if (!std::isfinite(threshold))
    return fail(bad, "%s: threshold must be finite, got %g", op, threshold);
  if (count == 0) return ok();
  if (check_ptr(op, "partials", partials, 4) != TCF_SUCCESS ||
      check_ptr(op, "state", state, 4) != TCF_SUCCESS ||
      check_ptr(op, "compute", compute, 1) != TCF_SUCCESS)
    return bad;
  // The reference compares the fp32 acc with the threshold rounded to fp32,
  // but tests "threshold <= 0" (never skip) on the double.
  const int64_t blocks = ceil_div(count, kThreads);
  const unsigned grid = static_cast<unsigned>(blocks < kMaxGridY ? blocks : kMaxGridY);
  TCF_LAUNCH(decide_kernel, grid, kThreads, 0, stream)(
      partials, state, poly, static_cast<float>(threshold), threshold <= 0.0, force, max_skips,
      accumulate_abs != 0, compute, count);
  return check_launch(op);
}
