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
    if (a->norm == NORM_LAYER) {
        const float mean = (float)(sum_of(m, C) / (double)C);
        const float rstd = checked_rstd((float)(sum_of_squares(m, C, mean) / (double)C), a->eps);
        for (int64_t c = 0; c < C; c++) m[c] = (m[c] - mean) * rstd;
    } else if (a->norm == NORM_RMS) {
        const float rstd = checked_rstd((float)(sum_of_squares(m, C, 0.0f) / (double)C), a->eps);
        for (int64_t c = 0; c < C; c++) m[c] = m[c] * rstd;
    }
    if (a->scale1p) {
        const float* restrict s = a->scale1p + (a->scale_b > 1 ? b : 0) * C;
        for (int64_t c = 0; c < C; c++) m[c] = m[c] * s[c];
    }
    if (a->shift) {
        const float* restrict t = a->shift + (a->shift_b > 1 ? b : 0) * C;
        for (int64_t c = 0; c < C; c++) m[c] = m[c] + t[c];
    }
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

/* below this many elements a call runs on one thread: waking a team costs more */
#define PARALLEL_MIN (1 << 16)

HOT int team(int threads, int64_t elements) {
    return elements < PARALLEL_MIN || threads < 1 ? 1 : threads;
}

/* ------------------------------------------------------------------ entry points
 * Each returns 0, or 1 when a scratch buffer could not be allocated. */

ENTRY int tcf_cpu_modulate(const void* x, int x_dt, const void* scale, int scale_dt, int64_t scale_b,
                     const void* shift, int shift_dt, int64_t shift_b, void* out, int64_t B,
                     int64_t R, int64_t C, int norm, float eps, int threads) {
    Rows a = {x, x_dt, norm, R, C, NULL, NULL, 1, 1, eps};
    float* owned;
    if (params_of(&a, scale, scale_dt, scale_b, shift, shift_dt, shift_b, &owned)) return 1;
    int failed = 0;
    #pragma omp parallel num_threads(team(threads, B * R * C)) reduction(|: failed)
    {
        float* m = (float*)malloc((size_t)C * sizeof(float));
        if (!m) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t row = 0; row < B * R; row++) {
            if (!m) continue;
            modulate_row(&a, row, m);
            store_row(out, x_dt, row * C, C, m);
        }
        free(m);
    }
    free(owned);
    return failed;
}

/* sums (B x 2, or 2) of per-row [diff, den] pairs, rows in order */
HOT void add_rows(const double* rows, int64_t B, int64_t R, int per_sample, float* partials) {
    double tot[2] = {0.0, 0.0};
    for (int64_t b = 0; b < B; b++) {
        double d = 0.0, p = 0.0;
        for (int64_t r = b * R; r < (b + 1) * R; r++) { d += rows[2 * r]; p += rows[2 * r + 1]; }
        if (per_sample) { partials[2 * b] = (float)d; partials[2 * b + 1] = (float)p; }
        tot[0] += d;
        tot[1] += p;
    }
    if (!per_sample) { partials[0] = (float)tot[0]; partials[1] = (float)tot[1]; }
}

/* partials (per_sample ? B x 2 : 2) = [sum |m - prev|, sum |prev|]; prev <- m,
 * where m is rounded to prev's dtype first (the values the next call reads) */
ENTRY int tcf_cpu_modulated_rel_l1(const void* x, int x_dt, const void* scale, int scale_dt,
                             int64_t scale_b, const void* shift, int shift_dt, int64_t shift_b,
                             void* prev, int64_t B, int64_t R, int64_t C, int norm, float eps,
                             int per_sample, float* partials, int threads) {
    Rows a = {x, x_dt, norm, R, C, NULL, NULL, 1, 1, eps};
    float* owned;
    if (params_of(&a, scale, scale_dt, scale_b, shift, shift_dt, shift_b, &owned)) return 1;
    double* rows = (double*)malloc((size_t)(B * R) * 2 * sizeof(double));
    int failed = rows == NULL;
    #pragma omp parallel num_threads(team(threads, B * R * C)) reduction(|: failed) if(!failed)
    {
        float* m = (float*)malloc((size_t)(2 * C) * sizeof(float));
        if (!m) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t row = 0; row < B * R; row++) {
            if (!m || !rows) continue;
            float* old = m + C;
            modulate_row(&a, row, m);
            load_row(prev, x_dt, row * C, C, old);
            store_row(prev, x_dt, row * C, C, m);
            rows[2 * row] = sum_abs_diff(m, old, C);
            rows[2 * row + 1] = sum_abs(old, C);
        }
        free(m);
    }
    if (!failed) add_rows(rows, B, R, per_sample, partials);
    free(rows);
    free(owned);
    return failed;
}

/* partials of rel_l1_partials: cur, prev (B, L) of one dtype. Fixed chunks of
 * CHUNK elements, added in order: the same bits for any thread count. */
#define CHUNK 4096

ENTRY int tcf_cpu_rel_l1_partials(const void* cur, const void* prev, int dt, int64_t B, int64_t L,
                            int per_sample, float* partials, int threads) {
    const int64_t chunks = (L + CHUNK - 1) / CHUNK;
    double* rows = (double*)malloc((size_t)(B * chunks) * 2 * sizeof(double));
    if (!rows) return 1;
    int failed = 0;
    #pragma omp parallel num_threads(team(threads, B * L)) reduction(|: failed)
    {
        float* buf = (float*)malloc((size_t)(2 * CHUNK) * sizeof(float));
        if (!buf) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < B * chunks; k++) {
            if (!buf) continue;
            const int64_t b = k / chunks, lo = (k % chunks) * CHUNK;
            const int64_t n = (lo + CHUNK < L ? lo + CHUNK : L) - lo;
            load_row(cur, dt, b * L + lo, n, buf);
            load_row(prev, dt, b * L + lo, n, buf + CHUNK);
            rows[2 * k] = sum_abs_diff(buf, buf + CHUNK, n);
            rows[2 * k + 1] = sum_abs(buf + CHUNK, n);
        }
        free(buf);
    }
    if (!failed) add_rows(rows, B, chunks, per_sample, partials);
    free(rows);
    return failed;
}
