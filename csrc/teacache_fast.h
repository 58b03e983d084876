/* SPDX-License-Identifier: Apache-2.0
 *
 * teacache_fast C API: fused TeaCache kernels on raw CUDA device pointers.
 *
 * No torch types: a framework passes device pointers, sizes, a dtype code and
 * a cudaStream_t. Every function checks its arguments before touching CUDA and
 * returns a status; tcf_last_error() gives a readable message (per thread) for
 * the last call that did not return TCF_SUCCESS. Kernels are asynchronous on
 * `stream`; nothing here synchronizes.
 *
 * Layouts (all dense, row-major, element-aligned pointers; 16-byte alignment is
 * used for vector loads when present and is not required):
 *   x, prev, out      (batch, rows, cols)     one row = `cols` contiguous elements
 *   scale, shift      (batch or 1, cols)      `*_batch_stride` elements between
 *                                             samples; 0 broadcasts one row
 *   cur/prev partials (batch, len)
 *   partials          fp32, (batch, 2) when per_sample else (2,):
 *                     [sum |cur - prev|, sum |prev|]
 * Arithmetic is fp32; reductions are two-stage and fixed-order over a fixed
 * partition (chunks of a size set by the shape and dtype, not by the SM count
 * or the pointers' alignment), so the same input gives the same bits on every
 * run and on every GPU model or MIG slice. Workspace sizes depend on the shape
 * and dtype only.
 */
#ifndef TEACACHE_FAST_H_
#define TEACACHE_FAST_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: tcf_teacache_decide takes accumulate_abs; reduction workspaces start with
 * an integer ticket word (zero it once before first use; the kernels leave it
 * at zero); tcf_residual_apply_out and tcf_finish_span added. */
#define TCF_API_VERSION 2
#define TCF_MAX_COEFFICIENTS 9 /* polynomial degree 0..8 */

typedef enum {
  TCF_FLOAT32 = 0,
  TCF_FLOAT16 = 1,
  TCF_BFLOAT16 = 2
} tcf_dtype;

typedef enum {
  TCF_NORM_NONE = 0,
  TCF_NORM_LAYER = 1, /* LayerNorm over cols, no affine */
  TCF_NORM_RMS = 2    /* RMSNorm over cols, no weight */
} tcf_norm;

typedef enum {
  TCF_SUCCESS = 0,
  TCF_ERROR_INVALID_VALUE = 1, /* a bad argument; nothing was launched */
  TCF_ERROR_CUDA = 2           /* the CUDA runtime reported an error */
} tcf_status;

/* Readable message for the last failed call on this thread ("" if none). */
const char *tcf_last_error(void);
/* Short name of a status code. */
const char *tcf_status_string(tcf_status status);

/* TCF_SUCCESS when the current device can run the kernels; otherwise
 * TCF_ERROR_CUDA with the reason (no device, a driver older than the CUDA
 * runtime this library was built with, no kernel image for this GPU, ...). */
tcf_status tcf_device_check(void);

/* Floats of scratch the reductions need (the same on every device): one 32-bit
 * ticket word, then fp32 pairs. The ticket (the first word) must be zero before
 * a workspace's first use (cudaMemset it once); every call leaves it zero, so a
 * workspace is reused as is, for any shape it is large enough for, by one
 * stream at a time.
 * With at most 64 outputs a reduction is one launch (the last block finishes
 * the sums), else two. */
tcf_status tcf_rel_l1_workspace_size(int64_t batch, int64_t len, tcf_dtype dtype,
                                     size_t *floats);
tcf_status tcf_modulated_rel_l1_workspace_size(int64_t batch, int64_t rows, int64_t cols,
                                               tcf_dtype dtype, size_t *floats);

/* out = norm(x) * (1 + scale) + shift, rounded to `dtype`. scale/shift may be
 * NULL; their dtype `param_dtype` is either `dtype` or TCF_FLOAT32. */
tcf_status tcf_modulate(const void *x, const void *scale, int64_t scale_batch_stride,
                        const void *shift, int64_t shift_batch_stride, void *out,
                        int64_t batch, int64_t rows, int64_t cols, tcf_dtype dtype,
                        tcf_dtype param_dtype, tcf_norm norm, float eps, cudaStream_t stream);

/* partials = [sum |cur - prev|, sum |prev|] over each sample (per_sample) or all. */
tcf_status tcf_rel_l1_partials(const void *cur, const void *prev, float *partials,
                               int64_t batch, int64_t len, tcf_dtype dtype, int per_sample,
                               float *workspace, size_t workspace_floats, cudaStream_t stream);

/* One pass: m = modulate(x, ...) rounded to `dtype`; partials of (m, prev);
 * prev <- m. Reads x and prev once and writes prev once. */
tcf_status tcf_modulated_rel_l1(const void *x, const void *scale, int64_t scale_batch_stride,
                                const void *shift, int64_t shift_batch_stride, void *prev,
                                float *partials, int64_t batch, int64_t rows, int64_t cols,
                                tcf_dtype dtype, tcf_dtype param_dtype, tcf_norm norm, float eps,
                                int per_sample, float *workspace, size_t workspace_floats,
                                cudaStream_t stream);

/* For each of `count` states: rel = partials[i,0] / partials[i,1];
 * acc += poly(rel) (Horner in fp32, coefficients highest power first), or
 * acc += |poly(rel)| when accumulate_abs is nonzero;
 * compute[i] = force[i] || rel or acc not finite || acc >= threshold ||
 * (max_skips >= 0 && skips >= max_skips); threshold <= 0 always computes.
 * state[i] = [acc, consecutive skips] (fp32) is updated in place: a compute
 * resets both. `coefficients` is a HOST array (copied into the launch);
 * force may be NULL (no forced step); force/compute are device bytes. */
tcf_status tcf_teacache_decide(const float *partials, float *state, const float *coefficients,
                               int num_coefficients, double threshold, const uint8_t *force,
                               int64_t max_skips, int accumulate_abs, uint8_t *compute,
                               int64_t count, cudaStream_t stream);

/* residual = out - inp (fp32 arithmetic), residual in its own dtype. */
tcf_status tcf_residual_capture(const void *out, const void *inp, void *residual, int64_t numel,
                                tcf_dtype dtype, tcf_dtype residual_dtype, cudaStream_t stream);

/* hidden += residual for the samples whose mask byte is nonzero (all when mask
 * is NULL); the mask is read on the device. */
tcf_status tcf_residual_apply(void *hidden, const void *residual, const uint8_t *mask,
                              int64_t batch, int64_t len, tcf_dtype dtype,
                              tcf_dtype residual_dtype, cudaStream_t stream);

/* out = hidden + residual (fp32 arithmetic, rounded once to `dtype`), hidden
 * unchanged; samples whose mask byte is zero get hidden's values copied. One
 * pass: reads hidden and residual, writes out (a copy of hidden then
 * tcf_residual_apply would be two). out has hidden's dtype and layout and
 * must not overlap hidden or residual. */
tcf_status tcf_residual_apply_out(const void *hidden, const void *residual, const uint8_t *mask,
                                  void *out, int64_t batch, int64_t len, tcf_dtype dtype,
                                  tcf_dtype residual_dtype, cudaStream_t stream);

/* The end of a sync-free cached span, by the device byte *compute (read on
 * the device, no host sync): nonzero -> residual = out - inp (fp32, rounded to
 * residual's dtype), out kept; zero -> out += residual (out holds the span's
 * input passed through), residual kept. One launch, one pass: reads two and
 * writes one tensor of numel elements, where capture + select + masked apply
 * take ~11 passes and ~6 launches. out and inp have `dtype`. */
tcf_status tcf_finish_span(const uint8_t *compute, void *out, const void *inp, void *residual,
                           int64_t numel, tcf_dtype dtype, tcf_dtype residual_dtype,
                           cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* TEACACHE_FAST_H_ */
