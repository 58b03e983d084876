// SPDX-License-Identifier: Apache-2.0
// residual_capture_ (residual = out - inp), residual_apply_ (hidden +=
// residual, optionally per sample, or out = hidden + residual) and the
// sync-free span end (one of the two, by a device flag): elementwise, fp32
// arithmetic, the residual in its own dtype (e.g. an fp32 cache of bf16
// activations).
#include <initializer_list>

#include "common.cuh"

namespace tcf {
namespace {

template <typename T, typename R>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) capture_kernel(const typename T::storage *__restrict__ out,
                               const typename T::storage *__restrict__ inp,
                               typename R::storage *__restrict__ res, int64_t n) {
  constexpr int VEC = vec_of<T>();
  RowSplit s = split_row<T>(out, n);
  if (!pack_aligned<T, VEC>(inp + s.head) || !pack_aligned<R, VEC>(res + s.head)) s = scalar_row(n);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for_each<VEC>(s, n, tid, static_cast<int64_t>(gridDim.x) * blockDim.x, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    float o[W], v[W];
    load<T, W>(out + i, o);
    load<T, W>(inp + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) o[j] = __fsub_rn(o[j], v[j]);
    store<R, W>(res + i, o);
  });
}

// out = hidden + residual; in place when out == hidden (hence no __restrict__ on
// those two). A masked-out sample is skipped in place, copied out of place.
template <typename T, typename R>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) apply_kernel(const typename T::storage *hidden,
                             const typename R::storage *__restrict__ residual,
                             const uint8_t *__restrict__ mask, typename T::storage *out,
                             int64_t batch, int64_t len) {
  constexpr int VEC = vec_of<T>();
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool in_place = out == hidden;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const bool add = mask == nullptr || mask[b] != 0;
    if (!add && in_place) continue;  // untouched: not even rewritten
    const typename T::storage *h = hidden + b * len;
    const typename R::storage *r = residual + b * len;
    typename T::storage *o = out + b * len;
    RowSplit s = split_row<T>(h, len);
    if (!pack_aligned<R, VEC>(r + s.head) || !pack_aligned<T, VEC>(o + s.head)) s = scalar_row(len);
    for_each<VEC>(s, len, tid, nthreads, [&](int64_t i, auto w) {
      constexpr int W = decltype(w)::value;
      float hv[W];
      load<T, W>(h + i, hv);
      if (add) {
        float rv[W];
        load<R, W>(r + i, rv);
#pragma unroll
        for (int j = 0; j < W; ++j) hv[j] = __fadd_rn(hv[j], rv[j]);
      }
      store<T, W>(o + i, hv);
    });
  }
}

// The end of a sync-free cached span, one pass chosen by the device flag (no
// host read): compute -> residual = out - inp, out kept; skip -> out +=
// residual (out holds the span's input passed through), residual kept.
template <typename T, typename R>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) span_end_kernel(const uint8_t *__restrict__ compute,
                                typename T::storage *out, const typename T::storage *inp,
                                typename R::storage *__restrict__ residual, int64_t n) {
  constexpr int VEC = vec_of<T>();
  const bool go = *compute != 0;
  RowSplit s = split_row<T>(out, n);
  if (!pack_aligned<T, VEC>(inp + s.head) || !pack_aligned<R, VEC>(residual + s.head)) s = scalar_row(n);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for_each<VEC>(s, n, tid, static_cast<int64_t>(gridDim.x) * blockDim.x, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    float o[W], v[W];
    load<T, W>(out + i, o);
    if (go) {
      load<T, W>(inp + i, v);
#pragma unroll
      for (int j = 0; j < W; ++j) o[j] = __fsub_rn(o[j], v[j]);
      store<R, W>(residual + i, o);
    } else {
      load<R, W>(residual + i, v);
#pragma unroll
      for (int j = 0; j < W; ++j) o[j] = __fadd_rn(o[j], v[j]);
      store<T, W>(out + i, o);
    }
  });
}

int64_t elementwise_blocks(int sms, int64_t batch, int64_t len, tcf_dtype dtype) {
  const int vec = 16 / dtype_size(dtype);
  return blocks_per_sample(sms, batch, ceil_div(ceil_div(len, vec), kThreads));
}

tcf_status check_dtypes(const char *op, tcf_dtype dtype, tcf_dtype residual_dtype) {
  if (!valid_dtype(dtype))
    return fail(TCF_ERROR_INVALID_VALUE,
                "%s: unknown dtype code %d (expected 0 float32, 1 float16, 2 bfloat16)", op, (int)dtype);
  if (!valid_dtype(residual_dtype))
    return fail(TCF_ERROR_INVALID_VALUE,
                "%s: unknown residual_dtype code %d (expected 0 float32, 1 float16, 2 bfloat16)", op,
                (int)residual_dtype);
  return TCF_SUCCESS;
}

// A pointer argument of an elementwise op: its name in messages and its dtype.
struct Operand {
  const char *name;
  const void *p;
  bool residual;  // in residual_dtype (else dtype; the span end's flag is one byte)
  bool flag = false;
};

// The shape of an elementwise launch: `batch` samples of `len` elements, or
// one flat range of `len` (numel) elements.
struct Elementwise {
  int64_t batch, len;
  bool flat;
};

// What the three residual launchers check, in their order: the dtype codes,
// the sizes, then (when there is work: *empty false) each pointer (non-NULL,
// element-aligned) and the SM count; *grid is the launch's grid.
tcf_status check_elementwise_args(const char *op, tcf_dtype dtype, tcf_dtype residual_dtype,
                                  const Elementwise &shape, std::initializer_list<Operand> operands,
                                  dim3 *grid, bool *empty) {
  *empty = true;
  const tcf_status st = check_dtypes(op, dtype, residual_dtype);
  if (st != TCF_SUCCESS) return st;
  if (shape.flat && shape.len < 0)
    return fail(TCF_ERROR_INVALID_VALUE, "%s: numel must be >= 0, got %lld", op, (long long)shape.len);
  if (!shape.flat && (shape.batch < 0 || shape.len < 0))
    return fail(TCF_ERROR_INVALID_VALUE, "%s: batch (%lld) and len (%lld) must be >= 0", op,
                (long long)shape.batch, (long long)shape.len);
  if (shape.batch * shape.len == 0) return ok();
  for (const Operand &o : operands) {
    const int size = o.flag ? 1 : dtype_size(o.residual ? residual_dtype : dtype);
    if (check_ptr(op, o.name, o.p, size) != TCF_SUCCESS) return TCF_ERROR_INVALID_VALUE;
  }
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return cuda_fail(op, err);
  *grid = dim3(static_cast<unsigned>(elementwise_blocks(sms, shape.batch, shape.len, dtype)), grid_y(shape.batch));
  *empty = false;
  return ok();
}

}  // namespace
}  // namespace tcf

using namespace tcf;

extern "C" tcf_status tcf_residual_capture(const void *out, const void *inp, void *residual,
                                           int64_t numel, tcf_dtype dtype,
                                           tcf_dtype residual_dtype, cudaStream_t stream) {
  const char *op = "tcf_residual_capture";
  dim3 grid;
  bool empty;
  const tcf_status st = check_elementwise_args(op, dtype, residual_dtype, {1, numel, true},
                                               {{"out", out, false}, {"inp", inp, false},
                                                {"residual", residual, true}}, &grid, &empty);
  if (st != TCF_SUCCESS || empty) return st;
  TCF_DISPATCH(dtype, T, TCF_DISPATCH(residual_dtype, R,
      TCF_LAUNCH((capture_kernel<T, R>), grid, kThreads, 0, stream)(
          static_cast<const typename T::storage *>(out), static_cast<const typename T::storage *>(inp),
          static_cast<typename R::storage *>(residual), numel)));
  return check_launch(op);
}

namespace tcf {
namespace {

tcf_status residual_apply(const char *op, const void *hidden, const void *residual,
                          const uint8_t *mask, void *out, int64_t batch, int64_t len,
                          tcf_dtype dtype, tcf_dtype residual_dtype, cudaStream_t stream) {
  dim3 grid;
  bool empty;
  const tcf_status st = check_elementwise_args(op, dtype, residual_dtype, {batch, len, false},
                                               {{"hidden", hidden, false}, {"residual", residual, true},
                                                {"out", out, false}}, &grid, &empty);
  if (st != TCF_SUCCESS || empty) return st;
  TCF_DISPATCH(dtype, T, TCF_DISPATCH(residual_dtype, R,
      TCF_LAUNCH((apply_kernel<T, R>), grid, kThreads, 0, stream)(
          static_cast<const typename T::storage *>(hidden),
          static_cast<const typename R::storage *>(residual), mask,
          static_cast<typename T::storage *>(out), batch, len)));
  return check_launch(op);
}

}  // namespace
}  // namespace tcf

extern "C" tcf_status tcf_residual_apply(void *hidden, const void *residual, const uint8_t *mask,
                                         int64_t batch, int64_t len, tcf_dtype dtype,
                                         tcf_dtype residual_dtype, cudaStream_t stream) {
  return residual_apply("tcf_residual_apply", hidden, residual, mask, hidden, batch, len, dtype,
                        residual_dtype, stream);
}

extern "C" tcf_status tcf_residual_apply_out(const void *hidden, const void *residual,
                                             const uint8_t *mask, void *out, int64_t batch,
                                             int64_t len, tcf_dtype dtype,
                                             tcf_dtype residual_dtype, cudaStream_t stream) {
  const char *op = "tcf_residual_apply_out";
  if (out != nullptr && out == hidden)
    return fail(TCF_ERROR_INVALID_VALUE, "%s: out must not be hidden (use tcf_residual_apply to "
                "add in place)", op);
  return residual_apply(op, hidden, residual, mask, out, batch, len, dtype, residual_dtype, stream);
}

extern "C" tcf_status tcf_finish_span(const uint8_t *compute, void *out, const void *inp,
                                      void *residual, int64_t numel, tcf_dtype dtype,
                                      tcf_dtype residual_dtype, cudaStream_t stream) {
  const char *op = "tcf_finish_span";
  dim3 grid;
  bool empty;
  const tcf_status st = check_elementwise_args(op, dtype, residual_dtype, {1, numel, true},
                                               {{"compute", compute, false, true}, {"out", out, false},
                                                {"inp", inp, false}, {"residual", residual, true}},
                                               &grid, &empty);
  if (st != TCF_SUCCESS || empty) return st;
  TCF_DISPATCH(dtype, T, TCF_DISPATCH(residual_dtype, R,
      TCF_LAUNCH((span_end_kernel<T, R>), grid, kThreads, 0, stream)(
          compute, static_cast<typename T::storage *>(out), static_cast<const typename T::storage *>(inp),
          static_cast<typename R::storage *>(residual), numel)));
  return check_launch(op);
}
