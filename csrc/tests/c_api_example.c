/* SPDX-License-Identifier: Apache-2.0
 *
 * A framework calling the teacache_fast C API directly: plain C, no torch.
 *
 * 1. Argument errors are reported before any CUDA call, so they are checked on
 *    any machine (CI has nvcc but no GPU).
 * 2. With a GPU: one TeaCache step on a small odd-width tensor, checked against
 *    a double-precision host computation.
 *
 * Build and run: make -C csrc/tests run
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "teacache_fast.h"

static int failures = 0;

static void expect_error(tcf_status st, const char *needle, const char *what) {
  if (st != TCF_ERROR_INVALID_VALUE || strstr(tcf_last_error(), needle) == NULL) {
    printf("FAIL %s: status %s, message '%s' (wanted '%s')\n", what, tcf_status_string(st),
           tcf_last_error(), needle);
    failures++;
  } else {
    printf("ok   %s: %s\n", what, tcf_last_error());
  }
}

static void check_validation(void) {
  float coeffs[2] = {1.0f, 0.0f};
  uint64_t storage[8]; /* never dereferenced: validation fails first */
  char *fake = (char *)storage;
  expect_error(tcf_modulate(NULL, NULL, 0, NULL, 0, fake, 1, 1, 8, TCF_FLOAT32, TCF_FLOAT32,
                            TCF_NORM_LAYER, 1e-6f, 0),
               "x must not be NULL", "modulate with a NULL x");
  expect_error(tcf_modulate(fake, NULL, 0, NULL, 0, fake, 1, 1, 8, (tcf_dtype)7, TCF_FLOAT32,
                            TCF_NORM_LAYER, 1e-6f, 0),
               "unknown dtype code 7", "modulate with a bad dtype");
  expect_error(tcf_modulate(fake, NULL, 0, NULL, 0, fake, 1, 1, 8, TCF_FLOAT32, TCF_FLOAT32,
                            (tcf_norm)5, 1e-6f, 0),
               "unknown norm code 5", "modulate with a bad norm");
  expect_error(tcf_modulated_rel_l1(fake + 1, NULL, 0, NULL, 0, fake, (float *)fake, 1, 1, 8,
                                    TCF_FLOAT16, TCF_FLOAT16, TCF_NORM_NONE, 1e-6f, 0,
                                    (float *)fake, 16, 0),
               "not aligned", "modulated_rel_l1 with a misaligned x");
  expect_error(tcf_rel_l1_partials(fake, fake, NULL, 1, 8, TCF_BFLOAT16, 0, (float *)fake, 16, 0),
               "partials must not be NULL", "rel_l1_partials with a NULL partials");
  expect_error(tcf_teacache_decide((float *)fake, (float *)fake, coeffs, 0, 0.1, NULL, -1, 0,
                                   (uint8_t *)fake, 1, 0),
               "num_coefficients must be 1..9", "decide with no coefficients");
  expect_error(tcf_residual_capture(fake, fake, fake, -1, TCF_FLOAT32, TCF_FLOAT32, 0),
               "numel must be >= 0", "residual_capture with a negative size");
  expect_error(tcf_residual_apply(fake, NULL, NULL, 2, 4, TCF_FLOAT32, TCF_BFLOAT16, 0),
               "residual must not be NULL", "residual_apply with a NULL residual");
  expect_error(tcf_residual_apply_out(fake, fake, NULL, fake, 2, 4, TCF_FLOAT32, TCF_FLOAT32, 0),
               "out must not be hidden", "residual_apply_out into hidden itself");
  expect_error(tcf_residual_apply_out(fake, fake, NULL, NULL, 2, 4, TCF_FLOAT32, TCF_FLOAT32, 0),
               "out must not be NULL", "residual_apply_out with a NULL out");
  expect_error(tcf_finish_span(NULL, fake, fake, fake, 4, TCF_BFLOAT16, TCF_FLOAT32, 0),
               "compute must not be NULL", "finish_span without its device flag");
}

#define CUDA_OK(call)                                                          \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess) {                                                   \
      printf("FAIL %s: %s\n", #call, cudaGetErrorString(e_));                  \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

#define TCF_OK(call)                                                           \
  do {                                                                         \
    tcf_status s_ = (call);                                                    \
    if (s_ != TCF_SUCCESS) {                                                   \
      printf("FAIL %s: %s\n", #call, tcf_last_error());                        \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

static void expect_close(double got, double want, double tol, const char *what) {
  if (!(fabs(got - want) <= tol * (1.0 + fabs(want)))) {
    printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
    failures++;
  }
}

/* One TeaCache step in fp32: m = LayerNorm(x) * (1 + scale) + shift against a
 * previous m, the decision, and the residual round trip. */
static void check_on_gpu(void) {
  enum { B = 2, R = 3, C = 37, N = B * R * C };
  float x[N], prev[N], scale[B * C], shift[B * C], m_ref[N];
  double num = 0, den = 0;
  for (int i = 0; i < N; ++i) {
    x[i] = (float)sin(0.37 * i) * 2.0f + 0.1f;
    prev[i] = (float)cos(0.11 * i);
  }
  for (int i = 0; i < B * C; ++i) {
    scale[i] = 0.01f * (float)(i % 7);
    shift[i] = -0.02f * (float)(i % 5);
  }
  for (int row = 0; row < B * R; ++row) {
    const int b = row / R;
    double mean = 0, var = 0;
    for (int c = 0; c < C; ++c) mean += x[row * C + c];
    mean /= C;
    for (int c = 0; c < C; ++c) var += (x[row * C + c] - mean) * (x[row * C + c] - mean);
    var /= C;
    for (int c = 0; c < C; ++c) {
      const double n = (x[row * C + c] - mean) / sqrt(var + 1e-6);
      m_ref[row * C + c] = (float)(n * (1.0 + scale[b * C + c]) + shift[b * C + c]);
      num += fabs(m_ref[row * C + c] - prev[row * C + c]);
      den += fabs(prev[row * C + c]);
    }
  }

  void *d_x, *d_prev, *d_scale, *d_shift, *d_res;
  float *d_partials, *d_ws, *d_state;
  uint8_t *d_compute;
  size_t ws_floats = 0;
  TCF_OK(tcf_modulated_rel_l1_workspace_size(B, R, C, TCF_FLOAT32, &ws_floats));
  CUDA_OK(cudaMalloc(&d_x, sizeof x));
  CUDA_OK(cudaMalloc(&d_prev, sizeof prev));
  CUDA_OK(cudaMalloc(&d_res, sizeof x));
  CUDA_OK(cudaMalloc(&d_scale, sizeof scale));
  CUDA_OK(cudaMalloc(&d_shift, sizeof shift));
  CUDA_OK(cudaMalloc((void **)&d_partials, 2 * sizeof(float)));
  CUDA_OK(cudaMalloc((void **)&d_ws, ws_floats * sizeof(float)));
  CUDA_OK(cudaMemset(d_ws, 0, ws_floats * sizeof(float)));  /* the ticket word starts at 0 */
  CUDA_OK(cudaMalloc((void **)&d_state, 2 * sizeof(float)));
  CUDA_OK(cudaMalloc((void **)&d_compute, 1));
  CUDA_OK(cudaMemcpy(d_x, x, sizeof x, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_prev, prev, sizeof prev, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_scale, scale, sizeof scale, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_shift, shift, sizeof shift, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_state, 0, 2 * sizeof(float)));

  TCF_OK(tcf_modulated_rel_l1(d_x, d_scale, C, d_shift, C, d_prev, d_partials, B, R, C,
                              TCF_FLOAT32, TCF_FLOAT32, TCF_NORM_LAYER, 1e-6f, 0, d_ws,
                              ws_floats, 0));
  /* poly(r) = r: compute when the relative L1 reaches 1e9, i.e. skip this step */
  const float coeffs[2] = {1.0f, 0.0f};
  TCF_OK(tcf_teacache_decide(d_partials, d_state, coeffs, 2, 1e9, NULL, -1, 0, d_compute, 1, 0));
  /* residual = prev(m) - x, then x += residual gives m back */
  TCF_OK(tcf_residual_capture(d_prev, d_x, d_res, N, TCF_FLOAT32, TCF_FLOAT32, 0));
  TCF_OK(tcf_residual_apply(d_x, d_res, NULL, B, R * C, TCF_FLOAT32, TCF_FLOAT32, 0));
  CUDA_OK(cudaDeviceSynchronize());

  float partials[2], state[2], m[N], applied[N];
  uint8_t compute = 2;
  CUDA_OK(cudaMemcpy(partials, d_partials, sizeof partials, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(state, d_state, sizeof state, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&compute, d_compute, 1, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(m, d_prev, sizeof m, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(applied, d_x, sizeof applied, cudaMemcpyDeviceToHost));
  for (int i = 0; i < N; ++i) {
    expect_close(m[i], m_ref[i], 1e-5, "modulated m written into prev");
    expect_close(applied[i], m[i], 1e-6, "x + (m - x)");
  }
  expect_close(partials[0], num, 1e-5, "sum |m - prev|");
  expect_close(partials[1], den, 1e-5, "sum |prev|");
  expect_close(state[0], num / den, 1e-5, "accumulated poly(rel)");
  expect_close(state[1], 1.0, 0.0, "consecutive skips");
  if (compute != 0) {
    printf("FAIL decide: computed a step under the threshold\n");
    failures++;
  }
  cudaFree(d_x); cudaFree(d_prev); cudaFree(d_res); cudaFree(d_scale); cudaFree(d_shift);
  cudaFree(d_partials); cudaFree(d_ws); cudaFree(d_state); cudaFree(d_compute);
  printf("%s GPU step\n", failures ? "FAIL" : "ok  ");
}

int main(void) {
  check_validation();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    printf("no usable CUDA device: GPU checks skipped\n");
  } else {
    check_on_gpu();
  }
  printf("%s\n", failures ? "FAILED" : "PASSED");
  return failures ? 1 : 0;
}
