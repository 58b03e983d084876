/* teacache_fast CPU kernels: the fused indicator in one pass over each row.
 *
 * Compiled on first use by teacache_fast/backends/native/build.py (the system
 * C compiler, -O3 -ffp-contract=off, OpenMP when available) and called through
 * ctypes by teacache_fast/backends/cpu.py. No torch, no Python API: plain
 * pointers, sizes and dtype codes, all checked by teacache_fast.ops before.
 *
 * Numerics (the torch backend's, op for op): statistics of a row, then
 * m = norm(x) * (1 + scale) + shift with each product and sum rounded to fp32
 * (no contraction into FMAs), m rounded to prev's dtype and compared with the
 * stored prev. Row statistics and L1 sums are fp32 lane sums (see LANE_SUM),
 * rows are added in double in row order: the result does not depend on the
 * thread count, and it agrees with the torch backend's fp32 sums to fp32
 * rounding, not bitwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Helpers are inlined into each entry point, and each entry point is compiled
 * twice (AVX2 and the x86-64 baseline, or the baseline alone elsewhere) and
 * picked by the loader for the CPU it runs on. Both give the same bits: every
 * lane of a sum adds the same elements in the same order at any vector width. */
#define HOT static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENTRY __attribute__((target_clones("avx2", "default")))
#else
#define ENTRY
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { NORM_LAYER = 0, NORM_RMS = 1, NORM_NONE = 2 };

/* ------------------------------------------------------------------ dtypes */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    const uint32_t u = f32_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);  /* a select, no branch */
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));   /* inf, NaN */
    if (exp == 0) {                                                      /* zero, subnormal */
        float v = (float)man * 5.9604644775390625e-8f;                   /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t f32_to_f16(float f) {  /* round to nearest even */
    uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);              /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);             /* rounds to inf */
    if (a < 0x38800000u) {                                               /* subnormal or 0 */
        /* q = a * 2^24 rounded to an integer, ties to even, from the integer mantissa */
        if (a < 0x33000000u) return (uint16_t)sign;                      /* < 2^-25: 0 */
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;                                       /* 14..24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);                          /* round at bit 13 */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* ------------------------------------------------------------------ rows of one dtype
 * The dtype switch sits outside each loop, so every loop is a straight fp32
 * loop the compiler vectorizes. */

HOT void load_row(const void* p, int dt, int64_t off, int64_t n, float* dst) {
    if (dt == DT_F32) { memcpy(dst, (const float*)p + off, (size_t)n * sizeof(float)); return; }
    const uint16_t* h = (const uint16_t*)p + off;
    if (dt == DT_BF16) { for (int64_t c = 0; c < n; c++) dst[c] = bf16_to_f32(h[c]); return; }
    for (int64_t c = 0; c < n; c++) dst[c] = f16_to_f32(h[c]);
}

/* v rounded to dtype dt, written at p[off:]; v <- the stored values as fp32 */
HOT void store_row(void* p, int dt, int64_t off, int64_t n, float* v) {
    if (dt == DT_F32) { memcpy((float*)p + off, v, (size_t)n * sizeof(float)); return; }
    uint16_t* h = (uint16_t*)p + off;
    if (dt == DT_BF16) {
        for (int64_t c = 0; c < n; c++) { h[c] = f32_to_bf16(v[c]); v[c] = bf16_to_f32(h[c]); }
        return;
    }
    for (int64_t c = 0; c < n; c++) { h[c] = f32_to_f16(v[c]); v[c] = f16_to_f32(h[c]); }
}

/* ------------------------------------------------------------------ one row */

/* Row sums in 16 fp32 lanes (lane = index mod 16), combined in double in a fixed
 * order: independent chains the compiler vectorizes (one accumulator would be one
 * long dependency chain), a rounding error per lane of a sixteenth of the row's
 * length, and the same bits wherever the row is computed. */
#define LANES 16

HOT double combine(const float* acc) {
    double s = 0.0;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

#define LANE_SUM(name, params, term)                                               \
    HOT double name params {                                                    \
        float acc[LANES] = {0};                                                    \
        int64_t c = 0;                                                             \
        for (; c + LANES <= C; c += LANES)                                         \
            for (int j = 0; j < LANES; j++) { const int64_t i = c + j; acc[j] += term; } \
        for (int j = 0; c < C; c++, j++) { const int64_t i = c; acc[j] += term; }  \
        return combine(acc);                                                       \
    }

LANE_SUM(sum_of, (const float* v, int64_t C), v[i])
LANE_SUM(sum_of_squares, (const float* v, int64_t C, float mean), (v[i] - mean) * (v[i] - mean))
LANE_SUM(sum_abs, (const float* v, int64_t C), fabsf(v[i]))
LANE_SUM(sum_abs_diff, (const float* a, const float* b, int64_t C), fabsf(a[i] - b[i]))

typedef struct {
    const void* x;
    int dt, norm;
    int64_t R, C;
    const float *scale1p, *shift;   /* fp32 (1 + scale) and shift rows, (1 or B) x C, or NULL */
    int64_t scale_b, shift_b;
    float eps;
} Rows;

/* rstd of a row; NaN when the statistics are not finite (the decision then computes) */
static inline float checked_rstd(float var, float eps) {
    float v = var + eps;
    if (!isfinite(v)) return NAN;
    return 1.0f / sqrtf(v);
}

/* m = norm(x) * (1 + scale) + shift of row `row` (sample row / R), in fp32 */
HOT void modulate_row(const Rows* a, int64_t row, float* restrict m) {
    const int64_t C = a->C, b = row / a->R;
    load_row(a->x, a->dt, row * C, C, m);
    /* one pass for the rest: (m - mu) * r is exactly torch's (m - mean) * rstd for
       layer, m * rstd for rms (m - 0 is m) and m for none (r = 1); a missing scale
       is a multiply by 1 (exact), a missing shift is no add (m + 0 would turn -0
       into +0) */
    float mu = 0.0f, r = 1.0f;
    if (a->norm == NORM_LAYER) {
        mu = (float)(sum_of(m, C) / (double)C);
        r = checked_rstd((float)(sum_of_squares(m, C, mu) / (double)C), a->eps);
    } else if (a->norm == NORM_RMS) {
        r = checked_rstd((float)(sum_of_squares(m, C, 0.0f) / (double)C), a->eps);
    }
    const float* restrict s = a->scale1p ? a->scale1p + (a->scale_b > 1 ? b : 0) * C : NULL;
    const float* restrict t = a->shift ? a->shift + (a->shift_b > 1 ? b : 0) * C : NULL;
    if (s && t)      for (int64_t c = 0; c < C; c++) m[c] = (m[c] - mu) * r * s[c] + t[c];
    else if (s)      for (int64_t c = 0; c < C; c++) m[c] = (m[c] - mu) * r * s[c];
    else if (t)      for (int64_t c = 0; c < C; c++) m[c] = (m[c] - mu) * r + t[c];
    else             for (int64_t c = 0; c < C; c++) m[c] = (m[c] - mu) * r;
}

/* One row of the indicator in one pass: q = prev, prev <- m rounded to its dtype
 * (st, read back), lanes of |st - q| and |q|. */
#define COMPARE_ROW(T, READ, ROUND, BACK)                                              \
    {                                                                                  \
        T* restrict h = (T*)prev + base;                                               \
        float d[LANES] = {0}, p[LANES] = {0};                                          \
        int64_t c = 0;                                                                 \
        for (; c + LANES <= C; c += LANES)                                             \
            for (int j = 0; j < LANES; j++) {                                          \
                const float q = READ(h[c + j]);                                        \
                const T hs = ROUND(m[c + j]);                                          \
                h[c + j] = hs;                                                         \
                d[j] += fabsf(BACK(hs) - q);                                           \
                p[j] += fabsf(q);                                                      \
            }                                                                          \
        for (int j = 0; c < C; c++, j++) {                                             \
            const float q = READ(h[c]);                                                \
            const T hs = ROUND(m[c]);                                                  \
            h[c] = hs;                                                                 \
            d[j] += fabsf(BACK(hs) - q);                                               \
            p[j] += fabsf(q);                                                          \
        }                                                                              \
        out[0] = combine(d);                                                           \
        out[1] = combine(p);                                                           \
    }

HOT void compare_row(const float* restrict m, void* prev, int dt, int64_t base, int64_t C,
                     double* out) {
    if (dt == DT_F32) {   /* nothing to round: two plain lane sums, then the copy */
        float* restrict q = (float*)prev + base;
        out[0] = sum_abs_diff(m, q, C);
        out[1] = sum_abs(q, C);
        memcpy(q, m, (size_t)C * sizeof(float));
    } else if (dt == DT_BF16) COMPARE_ROW(uint16_t, bf16_to_f32, f32_to_bf16, bf16_to_f32)
    else COMPARE_ROW(uint16_t, f16_to_f32, f32_to_f16, f16_to_f32)
}

/* fp32 copies of the modulation rows ((1 + scale) as torch computes it), made once per call */
HOT int params_of(Rows* a, const void* scale, int scale_dt, int64_t scale_b, const void* shift,
                     int shift_dt, int64_t shift_b, float** owned) {
    const int64_t C = a->C, n = (scale ? scale_b : 0) + (shift ? shift_b : 0);
    *owned = NULL;
    a->scale1p = a->shift = NULL;
    a->scale_b = scale_b;
    a->shift_b = shift_b;
    if (n == 0) return 0;
    float* buf = (float*)malloc((size_t)(n * C) * sizeof(float));
    if (!buf) return 1;
    float* next = buf;
    if (scale) {
        load_row(scale, scale_dt, 0, scale_b * C, next);
        for (int64_t i = 0; i < scale_b * C; i++) next[i] = 1.0f + next[i];
        a->scale1p = next;
        next += scale_b * C;
    }
    if (shift) {
        load_row(shift, shift_dt, 0, shift_b * C, next);
        a->shift = next;
    }
    *owned = buf;
    return 0;
}

/* ------------------------------------------------------------------ threads
 * Work items (rows, or chunks) are split into one contiguous range per thread.
 * Below PARALLEL_MIN elements a call stays on the calling thread, with no
 * OpenMP region at all: waking a team costs more than the work. */
#define PARALLEL_MIN (1 << 16)

typedef int (*Range)(const void* ctx, int64_t lo, int64_t hi);   /* 0, or 1: out of memory */

static int run_ranges(Range fn, const void* ctx, int64_t items, int threads, int64_t elements) {
    if (elements < PARALLEL_MIN || threads <= 1 || items < 2) return fn(ctx, 0, items);
#ifdef _OPENMP
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|: failed)
    {
        const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
        failed |= fn(ctx, items * t / k, items * (t + 1) / k);
    }
    return failed;
#else
    return fn(ctx, 0, items);
#endif
}

typedef struct { Rows a; void* dst; double* sums; } Job;

/* ------------------------------------------------------------------ the ranges */

ENTRY static int modulate_range(const void* ctx, int64_t lo, int64_t hi) {
    const Job* j = (const Job*)ctx;
    const int64_t C = j->a.C;
    if (j->a.dt == DT_F32) {   /* fp32: the output row is the scratch (no copy pass) */
        for (int64_t row = lo; row < hi; row++) modulate_row(&j->a, row, (float*)j->dst + row * C);
        return 0;
    }
    float* m = (float*)malloc((size_t)C * sizeof(float));
    if (!m) return 1;
    for (int64_t row = lo; row < hi; row++) {
        modulate_row(&j->a, row, m);
        store_row(j->dst, j->a.dt, row * C, C, m);
    }
    free(m);
    return 0;
}

/* per row: [sum |stored - prev|, sum |prev|]; prev <- m rounded to prev's dtype */
ENTRY static int indicator_range(const void* ctx, int64_t lo, int64_t hi) {
    const Job* j = (const Job*)ctx;
    const int64_t C = j->a.C;
    float* m = (float*)malloc((size_t)C * sizeof(float));
    if (!m) return 1;
    for (int64_t row = lo; row < hi; row++) {
        modulate_row(&j->a, row, m);
        compare_row(m, j->dst, j->a.dt, row * C, C, j->sums + 2 * row);
    }
    free(m);
    return 0;
}

/* rel_l1_partials: chunk k of a (B, L) pair; Rows.x = cur, dst = prev, C = L */
#define CHUNK 4096

ENTRY static int rel_l1_range(const void* ctx, int64_t lo, int64_t hi) {
    const Job* j = (const Job*)ctx;
    const int64_t L = j->a.C, chunks = (L + CHUNK - 1) / CHUNK;
    float* buf = (float*)malloc((size_t)(2 * CHUNK) * sizeof(float));
    if (!buf) return 1;
    for (int64_t k = lo; k < hi; k++) {
        const int64_t b = k / chunks, start = (k % chunks) * CHUNK;
        const int64_t n = (start + CHUNK < L ? start + CHUNK : L) - start;
        const float *cur = buf, *prev = buf + CHUNK;
        if (j->a.dt == DT_F32) {   /* read in place */
            cur = (const float*)j->a.x + b * L + start;
            prev = (const float*)j->dst + b * L + start;
        } else {
            load_row(j->a.x, j->a.dt, b * L + start, n, buf);
            load_row(j->dst, j->a.dt, b * L + start, n, buf + CHUNK);
        }
        j->sums[2 * k] = sum_abs_diff(cur, prev, n);
        j->sums[2 * k + 1] = sum_abs(prev, n);
    }
    free(buf);
    return 0;
}

/* sums (B x 2, or 2) of per-item [diff, den] pairs, items in order */
static void add_items(const double* sums, int64_t B, int64_t per_b, int per_sample, float* partials) {
    double tot[2] = {0.0, 0.0};
    for (int64_t b = 0; b < B; b++) {
        double d = 0.0, p = 0.0;
        for (int64_t r = b * per_b; r < (b + 1) * per_b; r++) { d += sums[2 * r]; p += sums[2 * r + 1]; }
        if (per_sample) { partials[2 * b] = (float)d; partials[2 * b + 1] = (float)p; }
        tot[0] += d;
        tot[1] += p;
    }
    if (!per_sample) { partials[0] = (float)tot[0]; partials[1] = (float)tot[1]; }
}

/* ------------------------------------------------------------------ entry points
 * Each returns 0, or 1 when a scratch buffer could not be allocated. */

int tcf_cpu_modulate(const void* x, int x_dt, const void* scale, int scale_dt, int64_t scale_b,
                     const void* shift, int shift_dt, int64_t shift_b, void* out, int64_t B,
                     int64_t R, int64_t C, int norm, float eps, int threads) {
    Job j = {{x, x_dt, norm, R, C, NULL, NULL, 1, 1, eps}, out, NULL};
    float* owned;
    if (params_of(&j.a, scale, scale_dt, scale_b, shift, shift_dt, shift_b, &owned)) return 1;
    const int failed = run_ranges(modulate_range, &j, B * R, threads, B * R * C);
    free(owned);
    return failed;
}

/* partials (per_sample ? B x 2 : 2) = [sum |m - prev|, sum |prev|]; prev <- m,
 * where m is rounded to prev's dtype first (the values the next call reads) */
int tcf_cpu_modulated_rel_l1(const void* x, int x_dt, const void* scale, int scale_dt,
                             int64_t scale_b, const void* shift, int shift_dt, int64_t shift_b,
                             void* prev, int64_t B, int64_t R, int64_t C, int norm, float eps,
                             int per_sample, float* partials, int threads) {
    Job j = {{x, x_dt, norm, R, C, NULL, NULL, 1, 1, eps}, prev, NULL};
    float* owned;
    if (params_of(&j.a, scale, scale_dt, scale_b, shift, shift_dt, shift_b, &owned)) return 1;
    j.sums = (double*)malloc((size_t)(B * R) * 2 * sizeof(double));
    int failed = j.sums == NULL || run_ranges(indicator_range, &j, B * R, threads, B * R * C);
    if (!failed) add_items(j.sums, B, R, per_sample, partials);
    free(j.sums);
    free(owned);
    return failed;
}

int tcf_cpu_rel_l1_partials(const void* cur, const void* prev, int dt, int64_t B, int64_t L,
                            int per_sample, float* partials, int threads) {
    const int64_t chunks = (L + CHUNK - 1) / CHUNK;
    Job j = {{cur, dt, NORM_NONE, 1, L, NULL, NULL, 1, 1, 0.0f}, (void*)prev, NULL};
    j.sums = (double*)malloc((size_t)(B * chunks) * 2 * sizeof(double));
    int failed = j.sums == NULL || run_ranges(rel_l1_range, &j, B * chunks, threads, B * L);
    if (!failed) add_items(j.sums, B, chunks, per_sample, partials);
    free(j.sums);
    return failed;
}
