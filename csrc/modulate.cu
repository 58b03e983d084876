// SPDX-License-Identifier: Apache-2.0
// modulate and modulated_rel_l1_: m = norm(x) * (1 + scale) + shift per row of
// `cols`, computed in fp32. The indicator variant reads prev, adds
// |m - prev| and |prev| (m rounded to prev's dtype, i.e. what is stored) into
// per-block partials, and writes m into prev: one pass over x and prev.
//
// A block owns whole rows (LayerNorm/RMSNorm statistics need the full row), a
// chunk of kRowsPerChunk rows at a time. Rows of up to kMaxRowPacks packs per
// thread take modulate_regs_kernel: the row is held in registers (every load of
// x, scale, shift and prev issued before the first reduction, the exact
// two-pass statistics from registers, one DRAM round trip). Wider rows take
// modulate_rows_kernel, whose statistics passes re-read the row (then still in
// L1/L2). Element ownership within a row is the same fixed one in both
// (for_each_fixed's: thread t owns packs t, t + threads, ..., then tail
// element t), so no bit depends on alignment or SM count.
#include <cmath>

#include "common.cuh"
#include "row_regs.cuh"

namespace tcf {
namespace {

// The looped kernel for rows wider than the register budget. BLOCKS: the
// resident blocks per SM its grid assumes (loop_blocks_per_sm). It carries no
// __launch_bounds__: with (256, BLOCKS), or (256) alone, ptxas spills 8-68
// bytes in its row loops (measured); unbounded it fits BLOCKS in its register
// count with no spills, which the kernel report checks.
template <typename T, typename P, bool INDICATOR, int BLOCKS>
__global__ void modulate_rows_kernel(const typename T::storage *__restrict__ x,
                                     const typename P::storage *__restrict__ scale,
                                     int64_t scale_stride,
                                     const typename P::storage *__restrict__ shift,
                                     int64_t shift_stride,
                                     typename T::storage *__restrict__ out,  // prev if INDICATOR
                                     float *__restrict__ ws, int64_t batch, int64_t rows,
                                     int64_t cols, int norm, float eps,
                                     float *__restrict__ partials, int64_t outputs,
                                     int64_t per_output, unsigned *__restrict__ ticket) {
  constexpr int VEC = vec_of<T>();
  const int64_t nchunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const float fcols = static_cast<float>(cols);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const typename P::storage *sc = scale ? scale + b * scale_stride : nullptr;
    const typename P::storage *sh = shift ? shift + b * shift_stride : nullptr;
    for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
      float2 acc = make_float2(0.f, 0.f);
      const int64_t r_end = (c + 1) * kRowsPerChunk < rows ? (c + 1) * kRowsPerChunk : rows;
      for (int64_t r = c * kRowsPerChunk; r < r_end; ++r) {
        const typename T::storage *xr = x + (b * rows + r) * cols;
        typename T::storage *outr = out + (b * rows + r) * cols;
        const bool aligned = aligned16(xr) && aligned16(outr) && aligned16(sc) && aligned16(sh);

        // (x - mean) * rstd covers all three norms exactly: none has mean 0 and
        // rstd 1, RMSNorm has mean 0.
        float mean = 0.f, rstd = 1.f;
        if (norm == TCF_NORM_LAYER) {
          float sum = 0.f;
          for_each_fixed<VEC>(cols, threadIdx.x, blockDim.x, aligned, [&](int64_t i, auto w, auto a) {
            constexpr int W = decltype(w)::value;
            float v[W];
            load_as<T, W, decltype(a)::value>(xr + i, v);
#pragma unroll
            for (int j = 0; j < W; ++j) sum += v[j];
          });
          mean = block_sum(sum) / fcols;
          float sq = 0.f;
          for_each_fixed<VEC>(cols, threadIdx.x, blockDim.x, aligned, [&](int64_t i, auto w, auto a) {
            constexpr int W = decltype(w)::value;
            float v[W];
            load_as<T, W, decltype(a)::value>(xr + i, v);
#pragma unroll
            for (int j = 0; j < W; ++j) sq += (v[j] - mean) * (v[j] - mean);
          });
          rstd = 1.0f / sqrtf(block_sum(sq) / fcols + eps);
        } else if (norm == TCF_NORM_RMS) {
          float sq = 0.f;
          for_each_fixed<VEC>(cols, threadIdx.x, blockDim.x, aligned, [&](int64_t i, auto w, auto a) {
            constexpr int W = decltype(w)::value;
            float v[W];
            load_as<T, W, decltype(a)::value>(xr + i, v);
#pragma unroll
            for (int j = 0; j < W; ++j) sq += v[j] * v[j];
          });
          rstd = 1.0f / sqrtf(block_sum(sq) / fcols + eps);
        }
        // rstd > 0 for every finite variance: 0 means the sum of squares overflowed
        // (|x| >~ 1.8e19), NaN a NaN input. Poison m so the indicator computes.
        if (!(rstd > 0.f)) rstd = NAN;

        for_each_fixed<VEC>(cols, threadIdx.x, blockDim.x, aligned, [&](int64_t i, auto w, auto a) {
          constexpr int W = decltype(w)::value;
          constexpr bool A = decltype(a)::value;
          float m[W];
          load_as<T, W, A>(xr + i, m);
#pragma unroll
          for (int j = 0; j < W; ++j) m[j] = __fmul_rn(__fsub_rn(m[j], mean), rstd);
          if (sc) {  // separate rounded mul/add, as the reference: m * (1 + scale) + shift
            float sv[W];
            load_as<P, W, A>(sc + i, sv);
#pragma unroll
            for (int j = 0; j < W; ++j) m[j] = __fmul_rn(m[j], __fadd_rn(1.0f, sv[j]));
          }
          if (sh) {
            float tv[W];
            load_as<P, W, A>(sh + i, tv);
#pragma unroll
            for (int j = 0; j < W; ++j) m[j] = __fadd_rn(m[j], tv[j]);
          }
          if constexpr (INDICATOR) {
            float pv[W];
            load_as<T, W, A>(outr + i, pv);
#pragma unroll
            for (int j = 0; j < W; ++j) {
              m[j] = T::to_f(T::from_f(m[j]));  // compare what gets stored
              acc.x += fabsf(m[j] - pv[j]);
              acc.y += fabsf(pv[j]);
            }
          }
          store_as<T, W, A>(outr + i, m);
        });
      }
      if constexpr (INDICATOR) {  // one pair per chunk of rows: the fixed partition
        store_block_pair(ws + (b * nchunks + c) * 2, acc);
      }
    }
  }
  if constexpr (INDICATOR) {
    if (ticket != nullptr) finish_in_last_block(ws, partials, outputs, per_output, ticket);  // fused
  }
}

// The compile-time shape of a register row kernel's arithmetic: the norm and
// which of scale / shift it reads. Each instance holds one norm and no branch
// on the parameter pointers (the launcher picks the instance).
template <int NORM_, bool SCALE_, bool SHIFT_>
struct RowOp {
  static constexpr int NORM = NORM_;
  static constexpr bool SCALE = SCALE_, SHIFT = SHIFT_;
};

// One row held in registers: loads, statistics, m, the indicator's sums, store.
template <typename T, typename P, bool INDICATOR, int PACKS, typename OP>
__device__ __forceinline__ void regs_row(const typename T::storage *xr, const typename P::storage *sc,
                                         const typename P::storage *sh, typename T::storage *outr,
                                         int64_t cols, float eps, float2 &acc) {
  constexpr int VEC = vec_of<T>();
  const int64_t npacks = cols / VEC, ntail = cols % VEC;
  const bool aligned = aligned16(xr) && aligned16(outr) && aligned16(sc) && aligned16(sh);
  // every load of the row before the first barrier
  RowRegs<T, PACKS, VEC> xv, pv;
  RowRegs<P, PACKS, VEC> s, t;
  constexpr bool x_only = !(OP::SCALE || OP::SHIFT || INDICATOR);
  load_share<x_only && sizeof(typename T::storage) == 4>(xr, npacks, ntail, aligned, xv);
  // cols > 0 always holds here; the branch only keeps each parameter's loads in
  // their own basic block: straight-line, ptxas spills the variants with both
  // scale and shift at the blocks below (measured, sm_90, nvcc 13).
  if constexpr (OP::SCALE) if (cols > 0) load_share(sc, npacks, ntail, aligned, s);
  if constexpr (OP::SHIFT) if (cols > 0) load_share(sh, npacks, ntail, aligned, t);
  if constexpr (INDICATOR) load_share(outr, npacks, ntail, aligned, pv);
  const float2 st = held_stats<OP::NORM>(xv, npacks, ntail, cols, eps);
  auto m_at = [&](int k, int j) {  // m of one held element; the indicator's sums
    float v = __fmul_rn(__fsub_rn(xv.at(k, j), st.x), st.y);
    if constexpr (OP::SCALE) v = __fmul_rn(v, __fadd_rn(1.0f, s.at(k, j)));
    if constexpr (OP::SHIFT) v = __fadd_rn(v, t.at(k, j));
    if constexpr (INDICATOR) {
      const float p = pv.at(k, j);
      v = T::to_f(T::from_f(v));  // compare what gets stored
      acc.x += fabsf(v - p);
      acc.y += fabsf(p);
    }
    return v;
  };
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {  // for_each_fixed's order: packs, then the tail
    const int64_t pk = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (pk < npacks) {
      float m[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] = m_at(k, j);
      if (aligned) store_as<T, VEC, true>(outr + pk * VEC, m);
      else store_as<T, VEC, false>(outr + pk * VEC, m);
    }
  }
  if (threadIdx.x < ntail) outr[npacks * VEC + threadIdx.x] = T::from_f(m_at(-1, 0));
}

// NORM, SCALE, SHIFT: RowOp's (the template arguments spelled out, so the
// kernel report can read them from the name). BLOCKS: the resident 256-thread
// blocks per SM this variant's grid is sized for, and its __launch_bounds__
// (regs_blocks_per_sm). `norm` stays a parameter (the same signature as
// modulate_rows_kernel) but only NORM is read.
template <typename T, typename P, bool INDICATOR, int PACKS, int NORM, bool SCALE, bool SHIFT, int BLOCKS>
__global__ void __launch_bounds__(kThreads, BLOCKS)
    modulate_regs_kernel(const typename T::storage *__restrict__ x,
                         const typename P::storage *__restrict__ scale, int64_t scale_stride,
                         const typename P::storage *__restrict__ shift, int64_t shift_stride,
                         typename T::storage *__restrict__ out,  // prev if INDICATOR
                         float *__restrict__ ws, int64_t batch, int64_t rows, int64_t cols,
                         [[maybe_unused]] int norm, float eps, float *__restrict__ partials,
                         int64_t outputs, int64_t per_output, unsigned *__restrict__ ticket) {
  using OP = RowOp<NORM, SCALE, SHIFT>;
  const int64_t nchunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const typename P::storage *sc = SCALE ? scale + b * scale_stride : nullptr;
    const typename P::storage *sh = SHIFT ? shift + b * shift_stride : nullptr;
    for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
      float2 acc = make_float2(0.f, 0.f);
      const int64_t r_end = (c + 1) * kRowsPerChunk < rows ? (c + 1) * kRowsPerChunk : rows;
      for (int64_t r = c * kRowsPerChunk; r < r_end; ++r)
        regs_row<T, P, INDICATOR, PACKS, OP>(x + (b * rows + r) * cols, sc, sh, out + (b * rows + r) * cols,
                                             cols, eps, acc);
      if constexpr (INDICATOR) {  // one pair per chunk of rows: the fixed partition
        store_block_pair(ws + (b * nchunks + c) * 2, acc);
      }
    }
  }
  if constexpr (INDICATOR) {
    if (ticket != nullptr) finish_in_last_block(ws, partials, outputs, per_output, ticket);  // fused
  }
}

// Rows of up to kMaxRowPacks packs per thread (of row_threads) are held in
// registers: C <= 8192 for 16-bit x, C <= 4096 for fp32 x.
constexpr int kMaxRowPacks = 4;

// The looped kernel fits kBlocksPerSm blocks in 32 registers, except the fp32
// indicator: it needs 36 (capped at 32 it spills: measured), so its grid
// assumes the 6 blocks that fit.
template <typename T, bool INDICATOR>
constexpr int loop_blocks_per_sm() {
  return sizeof(typename T::storage) == 4 && INDICATOR ? 6 : kBlocksPerSm;
}

// Resident 256-thread blocks per SM each variant of the register row kernel
// is compiled for (its __launch_bounds__) and its grid assumes. What a thread
// holds: 4 words per pack of x (16 bytes) and of prev (the indicator), 4 or 8
// (fp32 params of a 16-bit row) per pack of scale and of shift. Compiled for
// sm_90 with nvcc 13, every variant fits in those words plus 24 registers, 8
// more for the indicator and 8 more with 4 packs; the blocks are the most whose
// register share covers that: none of the 216 variants spills. With scale and
// shift these are the counts of the unspecialized kernel, where one block more
// spilled for the indicator and for 4 packs. The kernel report test fails
// when a variant spills or fits another number of blocks than this.
template <typename T, typename P, bool INDICATOR, int PACKS, bool SCALE, bool SHIFT>
constexpr int regs_blocks_per_sm() {
  constexpr int pwords = 4 * static_cast<int>(sizeof(typename P::storage) / sizeof(typename T::storage));
  constexpr int words = PACKS * (4 * (INDICATOR ? 2 : 1) + pwords * ((SCALE ? 1 : 0) + (SHIFT ? 1 : 0)));
  constexpr int need = words + 24 + (INDICATOR ? 8 : 0) + (PACKS > 2 ? 8 : 0);
  // registers per thread at 8, 6, 5, 4, 3 and 2 resident 256-thread blocks
  return need <= 32 ? 8 : need <= 40 ? 6 : need <= 48 ? 5 : need <= 64 ? 4 : need <= 80 ? 3 : need <= 128 ? 2 : 1;
}

int64_t row_chunks(int64_t rows) { return ceil_div(rows, kRowsPerChunk); }

int64_t row_blocks(int sms, int64_t batch, int64_t rows, int per_sm) {
  return blocks_per_sample(sms, batch, row_chunks(rows), per_sm);
}

struct RowArgs {
  const void *x, *scale, *shift;
  int64_t scale_stride, shift_stride;
  void *out;
  float *ws;
  int64_t batch, rows, cols;
  float *partials;  // the fused finish (INDICATOR with a ticket)
  int64_t outputs, per_output;
  unsigned *ticket;
  tcf_dtype dtype, param_dtype;
  int norm;
  float eps;
};

#define TCF_ROW_ARGS(a)                                                                    \
  static_cast<const typename T::storage *>(a.x),                                           \
      static_cast<const typename P::storage *>(a.scale), a.scale_stride,                   \
      static_cast<const typename P::storage *>(a.shift), a.shift_stride,                   \
      static_cast<typename T::storage *>(a.out), a.ws, a.batch, a.rows, a.cols, a.norm, a.eps, \
      a.partials, a.outputs, a.per_output, a.ticket

template <bool INDICATOR, typename T, typename P, int PACKS, int NORM, bool SCALE, bool SHIFT>
void launch_regs(const RowArgs &a, int sms, int threads, cudaStream_t stream) {
  constexpr int BLOCKS = regs_blocks_per_sm<T, P, INDICATOR, PACKS, SCALE, SHIFT>();
  const dim3 grid(static_cast<unsigned>(row_blocks(sms, a.batch, a.rows, BLOCKS)), grid_y(a.batch));
  TCF_LAUNCH((modulate_regs_kernel<T, P, INDICATOR, PACKS, NORM, SCALE, SHIFT, BLOCKS>), grid, threads, 0,
             stream)(TCF_ROW_ARGS(a));
}

// The register row kernel's instance for the run-time norm and parameters.
// Rows without scale and shift have no parameter dtype: only P = T exists.
template <bool INDICATOR, typename T, typename P, int PACKS, int NORM>
void launch_regs_params(const RowArgs &a, int sms, int threads, cudaStream_t stream) {
  if (a.scale && a.shift) return launch_regs<INDICATOR, T, P, PACKS, NORM, true, true>(a, sms, threads, stream);
  if (a.scale) return launch_regs<INDICATOR, T, P, PACKS, NORM, true, false>(a, sms, threads, stream);
  if (a.shift) return launch_regs<INDICATOR, T, P, PACKS, NORM, false, true>(a, sms, threads, stream);
  if constexpr (std::is_same_v<P, T>) launch_regs<INDICATOR, T, P, PACKS, NORM, false, false>(a, sms, threads, stream);
}

template <bool INDICATOR, typename T, typename P, int PACKS>
void launch_regs_norm(const RowArgs &a, int sms, int threads, cudaStream_t stream) {
  switch (a.norm) {  // check_rows admits these three
    case TCF_NORM_LAYER: return launch_regs_params<INDICATOR, T, P, PACKS, TCF_NORM_LAYER>(a, sms, threads, stream);
    case TCF_NORM_RMS: return launch_regs_params<INDICATOR, T, P, PACKS, TCF_NORM_RMS>(a, sms, threads, stream);
    default: return launch_regs_params<INDICATOR, T, P, PACKS, TCF_NORM_NONE>(a, sms, threads, stream);
  }
}

// The row in registers when the thread's share fits kMaxRowPacks packs (two
// specializations: up to 2 and up to 4 packs), else the looped kernel, which
// keeps the norm and the parameters run-time choices (one instance per dtype
// pair: it is not the benchmark shapes' path, and specializing it would
// multiply its instances by 12).
template <bool INDICATOR, typename T, typename P>
void launch_rows(const RowArgs &a, int sms, cudaStream_t stream) {
  const int threads = row_threads(a.cols, vec_of<T>());
  const int64_t packs = ceil_div(a.cols / vec_of<T>(), threads);
  if (packs <= 2) return launch_regs_norm<INDICATOR, T, P, 2>(a, sms, threads, stream);
  if (packs <= kMaxRowPacks) return launch_regs_norm<INDICATOR, T, P, kMaxRowPacks>(a, sms, threads, stream);
  constexpr int BLOCKS = loop_blocks_per_sm<T, INDICATOR>();
  const dim3 grid(static_cast<unsigned>(row_blocks(sms, a.batch, a.rows, BLOCKS)), grid_y(a.batch));
  TCF_LAUNCH((modulate_rows_kernel<T, P, INDICATOR, BLOCKS>), grid, threads, 0, stream)(TCF_ROW_ARGS(a));
}
#undef TCF_ROW_ARGS

// scale/shift are either in x's dtype or fp32 (an exact upcast of any dtype).
template <bool INDICATOR>
void dispatch_rows(const RowArgs &a, int sms, cudaStream_t stream) {
  const bool f32_params = a.param_dtype == TCF_FLOAT32 && (a.scale || a.shift);
  TCF_DISPATCH(a.dtype, T,
               if (f32_params) launch_rows<INDICATOR, T, F32>(a, sms, stream);
               else launch_rows<INDICATOR, T, T>(a, sms, stream));
}

tcf_status check_rows(const char *op, const RowArgs &a, bool indicator) {
  const tcf_status bad = TCF_ERROR_INVALID_VALUE;
  if (!valid_dtype(a.dtype))
    return fail(bad, "%s: unknown dtype code %d (expected 0 float32, 1 float16, 2 bfloat16)", op,
                (int)a.dtype);
  if ((a.scale || a.shift) && a.param_dtype != a.dtype && a.param_dtype != TCF_FLOAT32)
    return fail(bad, "%s: scale/shift dtype must be x's dtype (%s) or float32, got code %d", op,
                dtype_name(a.dtype), (int)a.param_dtype);
  if (a.norm != TCF_NORM_NONE && a.norm != TCF_NORM_LAYER && a.norm != TCF_NORM_RMS)
    return fail(bad, "%s: unknown norm code %d (expected 0 none, 1 layer, 2 rms)", op, a.norm);
  if (!(std::isfinite(a.eps) && a.eps > 0.f))
    return fail(bad, "%s: eps must be a finite number > 0, got %g", op, (double)a.eps);
  if (a.batch < 0 || a.rows < 0 || a.cols < 0)
    return fail(bad, "%s: batch (%lld), rows (%lld) and cols (%lld) must be >= 0", op,
                (long long)a.batch, (long long)a.rows, (long long)a.cols);
  if (a.scale_stride < 0 || a.shift_stride < 0)
    return fail(bad, "%s: scale_batch_stride (%lld) and shift_batch_stride (%lld) must be >= 0",
                op, (long long)a.scale_stride, (long long)a.shift_stride);
  if (a.batch * a.rows * a.cols == 0) return TCF_SUCCESS;  // nothing is read
  const int es = dtype_size(a.dtype), ps = dtype_size(a.param_dtype);
  if (check_ptr(op, "x", a.x, es) != TCF_SUCCESS) return bad;
  if (check_ptr(op, indicator ? "prev" : "out", a.out, es) != TCF_SUCCESS) return bad;
  if (a.scale && check_ptr(op, "scale", a.scale, ps) != TCF_SUCCESS) return bad;
  if (a.shift && check_ptr(op, "shift", a.shift, ps) != TCF_SUCCESS) return bad;
  return TCF_SUCCESS;
}

}  // namespace
}  // namespace tcf

using namespace tcf;

extern "C" tcf_status tcf_modulated_rel_l1_workspace_size(int64_t batch, int64_t rows,
                                                          int64_t cols, tcf_dtype dtype,
                                                          size_t *floats) {
  const char *op = "tcf_modulated_rel_l1_workspace_size";
  if (floats == nullptr) return fail(TCF_ERROR_INVALID_VALUE, "%s: floats must not be NULL", op);
  if (!valid_dtype(dtype)) return fail(TCF_ERROR_INVALID_VALUE, "%s: unknown dtype code %d", op, (int)dtype);
  if (batch < 0 || rows < 0 || cols < 0)
    return fail(TCF_ERROR_INVALID_VALUE, "%s: batch, rows and cols must be >= 0", op);
  if (batch * rows * cols == 0) {
    *floats = 0;
    return ok();
  }
  *floats = static_cast<size_t>(workspace_floats_for(batch * row_chunks(rows)));
  return ok();
}

extern "C" tcf_status tcf_modulate(const void *x, const void *scale, int64_t scale_batch_stride,
                                   const void *shift, int64_t shift_batch_stride, void *out,
                                   int64_t batch, int64_t rows, int64_t cols, tcf_dtype dtype,
                                   tcf_dtype param_dtype, tcf_norm norm, float eps,
                                   cudaStream_t stream) {
  const char *op = "tcf_modulate";
  const RowArgs a{x, scale, shift, scale_batch_stride, shift_batch_stride, out, nullptr,
                  batch, rows, cols, nullptr, 0, 0, nullptr, dtype, param_dtype, norm, eps};
  const tcf_status st = check_rows(op, a, false);
  if (st != TCF_SUCCESS || batch * rows * cols == 0) return st;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return cuda_fail(op, err);
  dispatch_rows<false>(a, sms, stream);
  return check_launch(op);
}

extern "C" tcf_status tcf_modulated_rel_l1(const void *x, const void *scale,
                                           int64_t scale_batch_stride, const void *shift,
                                           int64_t shift_batch_stride, void *prev,
                                           float *partials, int64_t batch, int64_t rows,
                                           int64_t cols, tcf_dtype dtype, tcf_dtype param_dtype,
                                           tcf_norm norm, float eps, int per_sample,
                                           float *workspace, size_t workspace_floats,
                                           cudaStream_t stream) {
  const char *op = "tcf_modulated_rel_l1";
  RowArgs a{x, scale, shift, scale_batch_stride, shift_batch_stride, prev, nullptr,
            batch, rows, cols, partials, 0, 0, nullptr, dtype, param_dtype, norm, eps};
  tcf_status st = check_rows(op, a, true);
  if (st != TCF_SUCCESS) return st;
  const int64_t outputs = per_sample ? batch : 1;
  if (outputs > 0 && check_ptr(op, "partials", partials, 4) != TCF_SUCCESS) return TCF_ERROR_INVALID_VALUE;
  if (batch * rows * cols == 0) {  // empty sums are zero
    if (outputs == 0) return ok();
    const cudaError_t err = cudaMemsetAsync(partials, 0, sizeof(float) * 2 * outputs, stream);
    return err == cudaSuccess ? ok() : cuda_fail(op, err);
  }
  if (check_ptr(op, "workspace", workspace, 4) != TCF_SUCCESS) return TCF_ERROR_INVALID_VALUE;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return cuda_fail(op, err);
  const int64_t nchunks = row_chunks(rows);
  const int64_t need = workspace_floats_for(batch * nchunks);
  if (workspace_floats < static_cast<size_t>(need))
    return fail(TCF_ERROR_INVALID_VALUE,
                "%s: workspace holds %zu floats, needs %lld (ask tcf_modulated_rel_l1_workspace_size)",
                op, workspace_floats, (long long)need);
  a.ws = pairs_of(workspace);
  a.outputs = outputs;
  a.per_output = per_sample ? nchunks : batch * nchunks;
  a.ticket = outputs <= kFusedOutputs ? ticket_of(workspace) : nullptr;
  dispatch_rows<true>(a, sms, stream);
  st = check_launch(op);
  if (st != TCF_SUCCESS || a.ticket != nullptr) return st;
  return finish_partials(op, pairs_of(workspace), partials, outputs, a.per_output, stream);
}
