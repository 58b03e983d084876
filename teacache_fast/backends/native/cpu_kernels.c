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
 * stored prev. Row statistics and L1 sums are fp32 lane sums (see "blocks of
 * 16"), rows are added in double in row order: the result does not depend on the
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
#ifdef __SSE2__
#include <emmintrin.h>   /* _mm_stream_si128: every x86-64 has it, so every clone may use it */
#endif

/* Helpers are inlined into each entry point, and each entry point is compiled
 * three times (x86-64-v4 for its AVX-512 registers and masks, AVX2, and the
 * x86-64 baseline; the baseline alone elsewhere) and picked by the loader for
 * the CPU it runs on. All give the same bits: the code is the same 8-lane vector
 * arithmetic (each lane IEEE fp32, no FMA), only the instructions differ. */
#define HOT static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENTRY __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ENTRY
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { NORM_LAYER = 0, NORM_RMS = 1, NORM_NONE = 2 };

/* ------------------------------------------------------------------ vectors of 8
 * Rows are read in blocks of 16 elements, each block two 8-lane vectors (GCC/clang
 * vector extensions: one ymm register in the AVX2 clone, two xmm in the baseline,
 * the same lane arithmetic bit for bit). Sums keep 16 fp32 lanes, lo (lanes 0-7)
 * and hi (8-15): lane j adds the elements j, j + 16, j + 32, ... in order. */
#define LANES 16
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline int itemsize(int dt) { return dt == DT_F32 ? 4 : 2; }

HOT v8u select8(v8i mask, v8u yes, v8u no) { return ((v8u)mask & yes) | (~(v8u)mask & no); }

/* bf16 -> fp32 is exact: the 16 bits are the top half of the fp32 */
HOT v8f bf16_to_f32(v8u h) { return (v8f)(h << 16); }

/* fp32 -> bf16 bits, round to nearest even; NaN stays NaN (quieted) */
HOT v8u f32_to_bf16(v8f f) {
    const v8u u = (v8u)f;
    const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return select8((v8i)(u & 0x7fffffffu) > 0x7f800000, quiet, rounded);
}

HOT v8f f16_to_f32(v8u h) {   /* exact */
    const v8u sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    const v8u normal = sign | ((exp + 112u) << 23) | (man << 13);
    const v8u special = sign | 0x7f800000u | (man << 13);                    /* inf, NaN */
    /* zero and subnormals: man * 2^-24, exact in fp32, with the sign */
    const v8u sub = sign | (v8u)(__builtin_convertvector((v8i)man, v8f) * 5.9604644775390625e-8f);
    return (v8f)select8((v8i)exp == 0x1f, special, select8((v8i)exp == 0, sub, normal));
}

HOT v8u f32_to_f16(v8f f) {   /* round to nearest even; NaN -> sign | 0x7e00 */
    const v8u u = (v8u)f, sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    const v8i ai = (v8i)a, below = ai < 0x38800000;
    const v8u normal = sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13);
    /* below 2^-14: a * 2^24 (exact) rounded to an integer, ties to even, by adding and
       taking off 2^23 (where the fp32 ulp is 1); the other lanes take 0, nothing overflows */
    const v8f small = (v8f)select8(below, a, (v8u){0}) * 16777216.0f;
    const v8u q = (v8u)__builtin_convertvector((small + 8388608.0f) - 8388608.0f, v8i);
    v8u h = select8(below, sign | q, normal);
    h = select8(ai >= 0x477ff000, sign | 0x7c00u, h);                         /* rounds to inf */
    return select8(ai > 0x7f800000, sign | 0x7e00u, h);
}

/* 8 values of a row of dtype dt, p[i:i+8], as fp32 */
HOT v8f load8(const void* p, int dt, int64_t i) {
    if (dt == DT_F32) { v8f v; memcpy(&v, (const float*)p + i, sizeof v); return v; }
    v8h h;
    memcpy(&h, (const uint16_t*)p + i, sizeof h);
    const v8u u = __builtin_convertvector(h, v8u);
    return dt == DT_BF16 ? bf16_to_f32(u) : f16_to_f32(u);
}

/* v rounded to dtype dt, written at p[i:i+8]; returns the stored values as fp32 */
HOT v8f store8(void* p, int dt, int64_t i, v8f v) {
    if (dt == DT_F32) { memcpy((float*)p + i, &v, sizeof v); return v; }
    const v8u r = dt == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    const v8h h = __builtin_convertvector(r, v8h);
    memcpy((uint16_t*)p + i, &h, sizeof h);
    return dt == DT_BF16 ? bf16_to_f32(r) : f16_to_f32(r);
}

HOT v8f abs8(v8f v) { return (v8f)((v8u)v & 0x7fffffffu); }

/* ------------------------------------------------------------------ blocks of 16
 * A block holds 16 elements of a row as two vectors. bf16 blocks are deinterleaved,
 * lo = elements 0, 2, ..., 14 and hi = 1, 3, ..., 15: one 32-byte load, then a
 * shift or a mask gives each half as fp32 (no widening shuffles), and the rounded
 * halves pack back with one shift and or. fp32 and fp16 blocks are in order, lo =
 * 0-7, hi = 8-15. Sums keep 16 fp32 lanes in the block's layout, and combine2()
 * adds them in element order, so lane j always sums the elements j, j + 16, ... */
typedef struct { v8f lo, hi; } Block;

HOT Block load_block(const void* p, int dt, int64_t c) {
    Block b;
    if (dt == DT_BF16) {
        v8u w;
        memcpy(&w, (const uint16_t*)p + c, sizeof w);
        b.lo = (v8f)(w << 16);
        b.hi = (v8f)(w & 0xffff0000u);
    } else {
        b.lo = load8(p, dt, c);
        b.hi = load8(p, dt, c + 8);
    }
    return b;
}

/* fp32 -> the bf16 it rounds to (nearest even; NaN quieted), as fp32 bits */
HOT v8u bf16_rounded(v8f f) {
    const v8u u = (v8u)f;
    const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const v8u quiet = (u | 0x400000u) & 0xffff0000u;
    return select8((v8i)(u & 0x7fffffffu) > 0x7f800000, quiet, rounded);
}

/* v rounded to dtype dt, written at p[c:c+16]; returns the stored values as fp32 */
HOT Block store_block(void* p, int dt, int64_t c, Block v) {
    if (dt != DT_BF16) {
        const Block b = {store8(p, dt, c, v.lo), store8(p, dt, c + 8, v.hi)};
        return b;
    }
    const v8u lo = bf16_rounded(v.lo), hi = bf16_rounded(v.hi), w = hi | (lo >> 16);
    memcpy((uint16_t*)p + c, &w, sizeof w);
    const Block b = {(v8f)lo, (v8f)hi};
    return b;
}

/* 16 lanes of sums, in the layout of the blocks added */
typedef Block Lanes;

/* adds a block of terms of which the first n elements (16: all) are the row's; the
 * others are set to +0, which leaves a lane as it is (a lane starts at +0 and can
 * never become -0) */
HOT void add_block(Lanes* acc, Block t, int dt, int64_t n) {
    if (n < LANES) {
        const v8i even = {0, 2, 4, 6, 8, 10, 12, 14}, low = {0, 1, 2, 3, 4, 5, 6, 7};
        const v8i lo = dt == DT_BF16 ? even : low, hi = dt == DT_BF16 ? even + 1 : low + 8;
        t.lo = (v8f)((v8i)t.lo & (lo < (int32_t)n));
        t.hi = (v8f)((v8i)t.hi & (hi < (int32_t)n));
    }
    acc->lo += t.lo;
    acc->hi += t.hi;
}

/* Two sets of 16 lanes, each combined in double in element order (lane 0 first):
 * two independent chains of adds, side by side */
HOT void combine2(Lanes a, Lanes b, int dt, double* out) {
    float fa[LANES], fb[LANES];
    memcpy(fa, &a.lo, sizeof a.lo);
    memcpy(fa + 8, &a.hi, sizeof a.hi);
    memcpy(fb, &b.lo, sizeof b.lo);
    memcpy(fb + 8, &b.hi, sizeof b.hi);
    double sa = 0.0, sb = 0.0;
    for (int j = 0; j < LANES; j++) {
        const int k = dt == DT_BF16 ? (j & 1) * 8 + j / 2 : j;   /* lane of element j */
        sa += fa[k];
        sb += fb[k];
    }
    out[0] = sa;
    out[1] = sb;
}

HOT Block babs(Block b) { const Block r = {abs8(b.lo), abs8(b.hi)}; return r; }
HOT Block bsub(Block a, Block b) { const Block r = {a.lo - b.lo, a.hi - b.hi}; return r; }

/* The last n < 16 elements of a row, p[i:i+n], copied into a zero-padded block */
typedef struct { _Alignas(32) unsigned char b[LANES * 4]; } Tail;

HOT const void* tail_of(Tail* t, const void* p, int dt, int64_t i, int64_t n) {
    memset(t->b, 0, sizeof t->b);
    memcpy(t->b, (const unsigned char*)p + i * itemsize(dt), (size_t)(n * itemsize(dt)));
    return t->b;
}

HOT void put_tail(void* p, int dt, int64_t i, int64_t n, const Tail* t) {
    memcpy((unsigned char*)p + i * itemsize(dt), t->b, (size_t)(n * itemsize(dt)));
}

/* ------------------------------------------------------------------ row statistics */

HOT Lanes sum_lanes(const void* x, int dt, int64_t C) {
    Lanes acc = {{0}, {0}};
    int64_t c = 0;
    for (; c + LANES <= C; c += LANES) add_block(&acc, load_block(x, dt, c), dt, LANES);
    if (c < C) { Tail t; add_block(&acc, load_block(tail_of(&t, x, dt, c, C - c), dt, 0), dt, C - c); }
    return acc;
}

HOT Block squares_off(Block v, float mean) {
    const Block d = {v.lo - mean, v.hi - mean}, sq = {d.lo * d.lo, d.hi * d.hi};
    return sq;
}

HOT Lanes square_lanes(const void* x, int dt, int64_t C, float mean) {
    Lanes acc = {{0}, {0}};
    int64_t c = 0;
    for (; c + LANES <= C; c += LANES) add_block(&acc, squares_off(load_block(x, dt, c), mean), dt, LANES);
    if (c < C) {
        Tail t;
        add_block(&acc, squares_off(load_block(tail_of(&t, x, dt, c, C - c), dt, 0), mean), dt, C - c);
    }
    return acc;
}

/* rstd of a row; NaN when the statistics are not finite (the decision then computes) */
static inline float checked_rstd(float var, float eps) {
    float v = var + eps;
    if (!isfinite(v)) return NAN;
    return 1.0f / sqrtf(v);
}

/* The fp32 modulation rows, (1 or B) x C16 (C rounded up to 16, zero-padded), each
 * block in the layout of x's blocks: one plain load per half */
typedef struct {
    const void* x;
    int dt, norm;
    int64_t R, C, C16;
    const float *scale1p, *shift;   /* (1 + scale) and shift rows, or NULL */
    int64_t scale_b, shift_b;
    float eps;
} Rows;

/* One row and what turns it into m = (x - mu) * r * (1 + scale) + shift: (x - mu) * r
 * is exactly torch's (x - mean) * rstd for layer, x * rstd for rms (x - 0 is x) and
 * x for none (r = 1); a missing scale is no multiply, a missing shift no add (x + 0
 * would turn -0 into +0). */
typedef struct { const void* x; const float *s, *t; float mu, r; } Row;

HOT Row row_base(const Rows* a, int dt, int64_t row) {
    const int64_t b = row / a->R;
    Row m = {(const unsigned char*)a->x + row * a->C * itemsize(dt), NULL, NULL, 0.0f, 1.0f};
    if (a->scale1p) m.s = a->scale1p + (a->scale_b > 1 ? b : 0) * a->C16;
    if (a->shift) m.t = a->shift + (a->shift_b > 1 ? b : 0) * a->C16;
    return m;
}

/* m[0:n] <- rows row, ..., row + n - 1 (n = 1 or 2) with their statistics: two rows
 * side by side, so that each waits on its sums while the other's are added */
HOT void rows_of(const Rows* a, int dt, int64_t row, int n, Row* m) {
    const int64_t C = a->C;
    const int last = n - 1;
    m[0] = row_base(a, dt, row);
    m[last] = row_base(a, dt, row + last);
    if (a->norm == NORM_NONE) return;
    double s[2];
    if (a->norm == NORM_LAYER) {
        combine2(sum_lanes(m[0].x, dt, C), sum_lanes(m[last].x, dt, C), dt, s);
        m[0].mu = (float)(s[0] / (double)C);
        m[last].mu = (float)(s[1] / (double)C);
    }
    combine2(square_lanes(m[0].x, dt, C, m[0].mu), square_lanes(m[last].x, dt, C, m[last].mu), dt, s);
    m[0].r = checked_rstd((float)(s[0] / (double)C), a->eps);
    m[last].r = checked_rstd((float)(s[1] / (double)C), a->eps);
}

/* m of the block at c, its x read from x (the row, or a tail copy at c = 0) */
HOT Block mod_block(const Row* m, const void* x, int dt, int64_t xc, int64_t c) {
    Block v = load_block(x, dt, xc);
    v.lo = (v.lo - m->mu) * m->r;
    v.hi = (v.hi - m->mu) * m->r;
    if (m->s) { const Block s = load_block(m->s, DT_F32, c); v.lo = v.lo * s.lo; v.hi = v.hi * s.hi; }
    if (m->t) { const Block t = load_block(m->t, DT_F32, c); v.lo = v.lo + t.lo; v.hi = v.hi + t.hi; }
    return v;
}

/* ------------------------------------------------------------------ whole rows */

/* out[0:C] <- m rounded to dtype dt */
HOT void modulate_row(const Rows* a, int dt, const Row* m, void* out) {
    const int64_t C = a->C;
    int64_t c = 0;
    for (; c + LANES <= C; c += LANES) store_block(out, dt, c, mod_block(m, m->x, dt, c, c));
    if (c < C) {
        Tail tx, o;
        store_block(o.b, dt, 0, mod_block(m, tail_of(&tx, m->x, dt, c, C - c), dt, 0, c));
        put_tail(out, dt, c, C - c, &o);
    }
}

/* The indicator's block: q = prev, prev <- v rounded, d += |stored - q|, p += |q| */
HOT void compare_block(Block v, void* prev, int dt, int64_t c, int64_t n, Lanes* d, Lanes* p) {
    const Block q = load_block(prev, dt, c), stored = store_block(prev, dt, c, v);
    add_block(d, babs(bsub(stored, q)), dt, n);
    add_block(p, babs(q), dt, n);
}

/* out = [sum |stored - prev|, sum |prev|] of a row; prev[0:C] <- m rounded to dtype dt */
HOT void compare_row(const Rows* a, int dt, const Row* m, void* prev, double* out) {
    const int64_t C = a->C;
    Lanes d = {{0}, {0}}, p = {{0}, {0}};
    int64_t c = 0;
    for (; c + LANES <= C; c += LANES) compare_block(mod_block(m, m->x, dt, c, c), prev, dt, c, LANES, &d, &p);
    if (c < C) {
        Tail tx, q;
        const Block v = mod_block(m, tail_of(&tx, m->x, dt, c, C - c), dt, 0, c);
        compare_block(v, (void*)tail_of(&q, prev, dt, c, C - c), dt, 0, C - c, &d, &p);
        put_tail(prev, dt, c, C - c, &q);
    }
    combine2(d, p, dt, out);
}

HOT void diff_block(const void* cur, const void* prev, int dt, int64_t c, int64_t n, Lanes* d, Lanes* p) {
    const Block q = load_block(prev, dt, c);
    add_block(d, babs(bsub(load_block(cur, dt, c), q)), dt, n);
    add_block(p, babs(q), dt, n);
}

/* [sum |cur - prev|, sum |prev|] of n elements at cur, prev */
HOT void diff_sums(const void* cur, const void* prev, int dt, int64_t n, double* out) {
    Lanes d = {{0}, {0}}, p = {{0}, {0}};
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES) diff_block(cur, prev, dt, c, LANES, &d, &p);
    if (c < n) {
        Tail tc, tp;
        diff_block(tail_of(&tc, cur, dt, c, n - c), tail_of(&tp, prev, dt, c, n - c), dt, 0, n - c, &d, &p);
    }
    combine2(d, p, dt, out);
}

/* ------------------------------------------------------------------ the modulation rows */

/* dst[0:C16] <- row p[0:C] (dtype pdt) as fp32, plus 1 when plus_one (1 + scale as
 * torch computes it), zero-padded, each block in the layout of dtype xdt */
static void param_row(const void* p, int pdt, int64_t C, int64_t C16, int plus_one, int xdt, float* dst) {
    for (int64_t c = 0; c < C16; c += LANES) {
        float v[LANES] = {0};
        const int64_t n = C - c < LANES ? C - c : LANES;
        Tail t;
        const Block b = {load8(tail_of(&t, p, pdt, c, n), pdt, 0), load8(t.b, pdt, 8)};
        memcpy(v, &b.lo, sizeof b.lo);
        memcpy(v + 8, &b.hi, sizeof b.hi);
        for (int64_t e = 0; e < n; e++) v[e] = plus_one ? 1.0f + v[e] : v[e];
        for (int k = 0; k < LANES; k++)   /* bf16 layout: evens first, then odds */
            dst[c + k] = xdt == DT_BF16 ? v[k < 8 ? 2 * k : 2 * (k - 8) + 1] : v[k];
    }
}

HOT int params_of(Rows* a, const void* scale, int scale_dt, int64_t scale_b, const void* shift,
                  int shift_dt, int64_t shift_b, float** owned) {
    const int64_t C = a->C, C16 = a->C16, n = (scale ? scale_b : 0) + (shift ? shift_b : 0);
    *owned = NULL;
    a->scale1p = a->shift = NULL;
    a->scale_b = scale_b;
    a->shift_b = shift_b;
    if (n == 0) return 0;
    float* buf = (float*)malloc((size_t)(n * C16) * sizeof(float));
    if (!buf) return 1;
    float* next = buf;
    if (scale) {
        for (int64_t b = 0; b < scale_b; b++)
            param_row((const unsigned char*)scale + b * C * itemsize(scale_dt), scale_dt, C, C16, 1, a->dt,
                      next + b * C16);
        a->scale1p = next;
        next += scale_b * C16;
    }
    if (shift) {
        for (int64_t b = 0; b < shift_b; b++)
            param_row((const unsigned char*)shift + b * C * itemsize(shift_dt), shift_dt, C, C16, 0, a->dt,
                      next + b * C16);
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

/* ------------------------------------------------------------------ the ranges
 * Each dispatches on the dtype once, so every loop is compiled for one dtype. */

#define BY_DTYPE(dt, CALL) \
    do { if ((dt) == DT_BF16) { CALL(DT_BF16); } else if ((dt) == DT_F16) { CALL(DT_F16); } else { CALL(DT_F32); } } while (0)

ENTRY static int modulate_range(const void* ctx, int64_t lo, int64_t hi) {
    const Job* j = (const Job*)ctx;
#define MODULATE_ROWS(DT) \
    for (int64_t row = lo; row < hi; row += 2) { \
        Row m[2]; \
        const int n = hi - row > 1 ? 2 : 1; \
        rows_of(&j->a, DT, row, n, m); \
        for (int k = 0; k < n; k++) \
            modulate_row(&j->a, DT, &m[k], (unsigned char*)j->dst + (row + k) * j->a.C * itemsize(DT)); \
    }
    BY_DTYPE(j->a.dt, MODULATE_ROWS);
    return 0;
}

/* per row: [sum |stored - prev|, sum |prev|]; prev <- m rounded to prev's dtype */
ENTRY static int indicator_range(const void* ctx, int64_t lo, int64_t hi) {
    const Job* j = (const Job*)ctx;
#define COMPARE_ROWS(DT) \
    for (int64_t row = lo; row < hi; row += 2) { \
        Row m[2]; \
        const int n = hi - row > 1 ? 2 : 1; \
        rows_of(&j->a, DT, row, n, m); \
        for (int k = 0; k < n; k++) \
            compare_row(&j->a, DT, &m[k], (unsigned char*)j->dst + (row + k) * j->a.C * itemsize(DT), \
                        j->sums + 2 * (row + k)); \
    }
    BY_DTYPE(j->a.dt, COMPARE_ROWS);
    return 0;
}

/* rel_l1_partials: chunk k of a (B, L) pair; Rows.x = cur, dst = prev, C = L */
#define CHUNK 4096

ENTRY static int rel_l1_range(const void* ctx, int64_t lo, int64_t hi) {
    const Job* j = (const Job*)ctx;
    const int64_t L = j->a.C, chunks = (L + CHUNK - 1) / CHUNK;
#define CHUNK_SUMS(DT) \
    for (int64_t k = lo; k < hi; k++) { \
        const int64_t start = (k / chunks) * L + (k % chunks) * CHUNK, end = (k / chunks + 1) * L; \
        const int64_t n = (start + CHUNK < end ? start + CHUNK : end) - start; \
        diff_sums((const unsigned char*)j->a.x + start * itemsize(DT), \
                  (const unsigned char*)j->dst + start * itemsize(DT), DT, n, j->sums + 2 * k); \
    }
    BY_DTYPE(j->a.dt, CHUNK_SUMS);
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

/* ------------------------------------------------------------------ residual
 * dst = a + b or a - b elementwise, all three of one dtype (bf16 or fp32), fp32
 * arithmetic rounded once to the dtype: what torch.add / torch.sub compute. In
 * blocks of 16 (bf16 deinterleaved, see "blocks of 16"); with nt the
 * 16-byte-aligned body is written with streaming stores: dst is not read into
 * the cache first (a normal store reads each line before writing it), so an
 * out-of-place op on tensors larger than the caches moves 3 tensors' bytes,
 * not 4. */
typedef struct { const void *a, *b; void* dst; int dt, subtract, nt; } Residual;

HOT void stream32(void* p, v8u w) {   /* 32 bytes at a 16-byte-aligned p */
#ifdef __SSE2__
    __m128i lo, hi;
    memcpy(&lo, &w, 16);
    memcpy(&hi, (const char*)&w + 16, 16);
    _mm_stream_si128((__m128i*)p, lo);
    _mm_stream_si128((__m128i*)p + 1, hi);
#else
    memcpy(p, &w, sizeof w);
#endif
}

HOT Block combine(Block a, Block b, int subtract) {
    const Block v = {subtract ? a.lo - b.lo : a.lo + b.lo, subtract ? a.hi - b.hi : a.hi + b.hi};
    return v;
}

HOT void stream_block(void* p, int dt, int64_t c, Block v) {
    if (dt == DT_BF16) {
        stream32((uint16_t*)p + c, bf16_rounded(v.hi) | (bf16_rounded(v.lo) >> 16));
    } else {
        stream32((float*)p + c, (v8u)v.lo);
        stream32((float*)p + c + 8, (v8u)v.hi);
    }
}

/* elements [i, i + n), n <= 16, through a zero-padded scratch block */
HOT void residual_few(const Residual* r, int64_t i, int64_t n) {
    const int sz = itemsize(r->dt);
    _Alignas(32) unsigned char a[64] = {0}, b[64] = {0}, d[64];
    memcpy(a, (const unsigned char*)r->a + i * sz, n * sz);
    memcpy(b, (const unsigned char*)r->b + i * sz, n * sz);
    store_block(d, r->dt, 0, combine(load_block(a, r->dt, 0), load_block(b, r->dt, 0), r->subtract));
    memcpy((unsigned char*)r->dst + i * sz, d, n * sz);
}

ENTRY static int residual_range(const void* ctx, int64_t lo, int64_t hi) {
    const Residual* r = (const Residual*)ctx;
    const int sz = itemsize(r->dt);
    int64_t i = lo;
    if (r->nt) {   /* a head up to the first 16-byte-aligned element of dst */
        const uintptr_t addr = (uintptr_t)((const unsigned char*)r->dst + lo * sz);
        const int64_t head = addr % sz ? 0 : (int64_t)((16 - addr % 16) % 16) / sz;
        const int64_t n = head < hi - lo ? head : hi - lo;
        if (n) residual_few(r, lo, n);
        i = lo + n;
    }
    const int stream = r->nt && ((uintptr_t)((const unsigned char*)r->dst + i * sz) % 16) == 0;
#define RESIDUAL_BLOCKS(DT) \
    for (; i + 16 <= hi; i += 16) { \
        const Block v = combine(load_block(r->a, DT, i), load_block(r->b, DT, i), r->subtract); \
        if (stream) stream_block(r->dst, DT, i, v); \
        else store_block(r->dst, DT, i, v); \
    }
    if (r->dt == DT_BF16) { RESIDUAL_BLOCKS(DT_BF16) } else { RESIDUAL_BLOCKS(DT_F32) }
    if (i < hi) residual_few(r, i, hi - i);
#ifdef __SSE2__
    if (stream) _mm_sfence();   /* the streamed lines are written before the call returns */
#endif
    return 0;
}

/* ------------------------------------------------------------------ entry points
 * Each returns 0, or 1 when a scratch buffer could not be allocated. */

int tcf_cpu_modulate(const void* x, int x_dt, const void* scale, int scale_dt, int64_t scale_b,
                     const void* shift, int shift_dt, int64_t shift_b, void* out, int64_t B,
                     int64_t R, int64_t C, int norm, float eps, int threads) {
    Job j = {{x, x_dt, norm, R, C, (C + LANES - 1) / LANES * LANES, NULL, NULL, 1, 1, eps}, out, NULL};
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
    Job j = {{x, x_dt, norm, R, C, (C + LANES - 1) / LANES * LANES, NULL, NULL, 1, 1, eps}, prev, NULL};
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
    Job j = {{cur, dt, NORM_NONE, 1, L, 0, NULL, NULL, 1, 1, 0.0f}, (void*)prev, NULL};
    j.sums = (double*)malloc((size_t)(B * chunks) * 2 * sizeof(double));
    int failed = j.sums == NULL || run_ranges(rel_l1_range, &j, B * chunks, threads, B * L);
    if (!failed) add_items(j.sums, B, chunks, per_sample, partials);
    free(j.sums);
    return failed;
}

/* teacache_decide_ for S states, the torch backend's arithmetic op for op in
 * fp32: rel = num / den; Horner with fp32 coefficients (highest power first);
 * acc + poly (or + |poly|); compute on force, an invalid ratio, a non-finite
 * acc, acc >= threshold (fp32), never_skip (threshold <= 0, decided by the
 * caller on the double), the skip limit (max_skips >= 0), or a corrupt skip
 * counter (not finite or negative). A compute resets [acc, skips]; a skip
 * stores acc and skips + 1. force: S flags, or NULL with force_all. */
int tcf_cpu_decide(const float* partials, float* state, int64_t S, const float* coeffs, int ncoeffs,
                   float threshold, int never_skip, const unsigned char* force, int force_all,
                   int64_t max_skips, int accumulate_abs, unsigned char* compute_out) {
    for (int64_t i = 0; i < S; i++) {
        const float num = partials[2 * i], den = partials[2 * i + 1];
        const float acc = state[2 * i], skips = state[2 * i + 1];
        const float rel = num / den;
        const int valid = isfinite(num) && isfinite(den) && den != 0.0f && isfinite(rel);
        const float r = valid ? rel : 0.0f;
        float poly = 0.0f;
        for (int k = 0; k < ncoeffs; k++) poly = poly * r + coeffs[k];
        const float new_acc = acc + (accumulate_abs ? fabsf(poly) : poly);
        int compute = (force ? force[i] != 0 : force_all) || !valid || !isfinite(new_acc)
                      || new_acc >= threshold || never_skip
                      || (max_skips >= 0 && skips >= (float)max_skips)
                      || !(isfinite(skips) && skips >= 0.0f);
        state[2 * i] = compute ? 0.0f : new_acc;
        state[2 * i + 1] = compute ? 0.0f : skips + 1.0f;
        compute_out[i] = (unsigned char)compute;
    }
    return 0;
}

/* dst = a - b (subtract) or a + b over n elements of dtype dt (bf16 or fp32),
 * see "residual" above */
int tcf_cpu_residual(const void* a, const void* b, void* dst, int dt, int64_t n, int subtract, int nt,
                     int threads) {
    const Residual r = {a, b, dst, dt, subtract, nt};
    return run_ranges(residual_range, &r, n, threads, n);
}
