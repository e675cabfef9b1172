/* y[m, n] = x[m, k] . w[n, k]^T, with w packed (see below) in bf16, int8 or fp8 and
 * x, y in fp32.
 *
 * Why: CPUs without bf16 units (no AMX, no AVX512-BF16) run torch's bf16 matmuls
 * through slow conversions, and fp32 copies of the weights double the memory and the
 * bytes a decode step reads. A bf16 value widens to fp32 exactly (a 16-bit shift), so
 * this computes the sums of an fp32 matmul over bf16-valued weights:
 * - a decode step of a few rows reads half the bytes of fp32 (bound by memory);
 * - at 8-64 rows, where MKL's fp32 sgemm is least efficient, the register blocking
 *   below keeps both FMA units busy (SmolLM2 at 32 rows: 193 against 71-140 GFLOP/s);
 * - at 128-256 rows (prefill) it ties MKL (about 240 GFLOP/s on 2 cores).
 *
 * Packed layout (kernels.pack): panels of PANEL output columns, each [k, PANEL]
 * contiguous, zero-padded past n. A panel streams from memory once: the first block
 * of 8 input rows prefetches it, later blocks find it in L2. Each step of k widens
 * PANEL weights into 3 vectors and multiplies them by one broadcast x value per row:
 * ROWS x 3 accumulators in registers, no horizontal sums. The figures above are
 * AVX-512's (16 lanes, 8 rows); the AVX2 build (simd.h: 8 lanes, 4 rows) does the same
 * arithmetic at half the width.
 * On AVX2, from 8 rows, each panel is first widened (and scaled) into a buffer of the
 * thread's and the blocks multiply fp32 from there (WIDE_FROM below).
 * Quantized weights (int8, fp8 e4m3fn: one byte each) halve the bytes again: the block
 * sums x . value over k and multiplies each column's sum by its scale once at the end,
 * so a weight costs one or two instructions more to widen than a bf16 and no multiply.
 * Threads (torch's own OpenMP runtime: the same library, the same team) split panels.
 * ``matmul_team`` shares out its panels to the team it is called from, so the fused
 * decode step (decode_step.c) runs its matmuls inside one parallel region.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

/* Three vectors of output columns; rows of x per block: 8 x 3 accumulators fill
 * AVX-512's 32 registers, 4 x 3 AVX2's 16 (with the 3 weights and the broadcast). */
#define PANEL (3 * VW)
#define ROWS (VW == 16 ? 8 : 4)
#define SLAB_ROWS 128
/* From this many rows (AVX2 only), each panel is widened and scaled once per slab into
 * a buffer of the thread's, and every block of rows multiplies fp32 from there: the
 * weights then cost a load each instead of a load and one or two conversions per block.
 * AMD EPYC, AVX2, 2 cores, SmolLM2's 120 matmuls: 32 rows 83 -> 144-160 GFLOP/s, 128
 * rows 85 -> 175-183 (MKL's sgemm over weights widened per call: 111-120); under 8
 * rows the extra pass over the panel costs more than it saves. AVX-512 (8 rows a block,
 * 32 registers) is not measured yet, so it keeps widening in the block (0: never). */
#define WIDE_FROM (VW == 8 ? 2 * ROWS : 0)
/* Into L2, far ahead: an L1 prefetch holds one of a core's few fill buffers until
 * DRAM answers, which capped a thread at about 10 GB/s; 8 KB ahead into L2 reached
 * about 20 GB/s on 2 threads, what torch's fp32 sum reads. */
#define PREFETCH_BYTES 8192

int matmul_panel(void) { return PANEL; }

/* Internal to this file: a panel already widened and scaled (fp32, no scale to apply). */
#define WEIGHT_FP32 (-1)

static inline __attribute__((always_inline)) vec widen(const void *p, long at, int kind) {
    switch (kind) {
    case WEIGHT_FP32: return vload_n((const float *)p + at, VW);
    case WEIGHT_INT8: return vwiden_i8((const int8_t *)p + at);
    case WEIGHT_FP8: return vwiden_fp8((const uint8_t *)p + at);
    default: return vwiden((const uint16_t *)p + at);
    }
}

/* ``rows`` (at most ROWS) input rows against one panel; inlined with a constant
 * ``rows`` and ``kind`` so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
block(const float *restrict x, const void *restrict panel, const float *scale,
      float *restrict y, int rows, int cols, int n, int k, int prefetch, int add, int kind) {
    const int bytes = kind == WEIGHT_FP32 ? 4 : kind == WEIGHT_BF16 ? 2 : 1;
    const int scaled = kind == WEIGHT_INT8 || kind == WEIGHT_FP8;
    vec acc[ROWS][3];
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < 3; s++)
            acc[r][s] = vzero();
    for (int i = 0; i < k; i++) {
        long at = (long)i * PANEL;
        /* Every line of the next bytes, once per 192. */
        if (prefetch && (i & (192 / (PANEL * bytes) - 1)) == 0) {
            const char *next = (const char *)panel + at * bytes + PREFETCH_BYTES;
            _mm_prefetch(next, _MM_HINT_T1);
            _mm_prefetch(next + 64, _MM_HINT_T1);
            _mm_prefetch(next + 128, _MM_HINT_T1);
        }
        vec w0 = widen(panel, at, kind), w1 = widen(panel, at + VW, kind);
        vec w2 = widen(panel, at + 2 * VW, kind);
        for (int r = 0; r < rows; r++) {
            vec xb = vset1(x[(long)r * k + i]);
            acc[r][0] = vfma(xb, w0, acc[r][0]);
            acc[r][1] = vfma(xb, w1, acc[r][1]);
            acc[r][2] = vfma(xb, w2, acc[r][2]);
        }
    }
    vec scales[3];
    for (int s = 0; s < 3 && scaled; s++) {
        int left = cols - VW * s;
        scales[s] = left > 0 ? vmul(vload_n(scale + VW * s, left),
                                    vset1(kind == WEIGHT_FP8 ? FP8_UNIT : 1.0f))
                             : vzero();
    }
    for (int r = 0; r < rows; r++) {
        float *yr = y + (long)r * n;
        for (int s = 0; s < 3; s++) {
            int left = cols - VW * s;
            if (left <= 0)
                break;
            vec out = scaled ? vmul(acc[r][s], scales[s]) : acc[r][s];
            if (add)
                out = vadd(out, vload_n(yr + VW * s, left));
            vstore_n(yr + VW * s, out, left);
        }
    }
}

/* The rows [r0, r0 + rows) of a slab against panel ``p`` of ``w``, whose values are at
 * ``panel`` in format ``kind`` (w's own, or a widened copy: WEIGHT_FP32). */
static inline __attribute__((always_inline)) void
rows_of_panel(const float *restrict x, const Weight *w, const void *panel, float *restrict y,
              int p, int r0, int rows, int first, int add, int kind) {
    int n = w->n, k = w->k;
    const float *scale = w->scale + (w->scale ? p * PANEL : 0);
    const float *xs = x + (long)r0 * k;
    float *ys = y + (long)r0 * n + p * PANEL;
    int cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
    switch (rows) {
#if VW == 16
    case 8: block(xs, panel, scale, ys, 8, cols, n, k, first, add, kind); break;
    case 7: block(xs, panel, scale, ys, 7, cols, n, k, first, add, kind); break;
    case 6: block(xs, panel, scale, ys, 6, cols, n, k, first, add, kind); break;
    case 5: block(xs, panel, scale, ys, 5, cols, n, k, first, add, kind); break;
#endif
    case 4: block(xs, panel, scale, ys, 4, cols, n, k, first, add, kind); break;
    case 3: block(xs, panel, scale, ys, 3, cols, n, k, first, add, kind); break;
    case 2: block(xs, panel, scale, ys, 2, cols, n, k, first, add, kind); break;
    default: block(xs, panel, scale, ys, 1, cols, n, k, first, add, kind); break;
    }
}

/* Panel ``p`` of ``w`` as fp32, scaled: [k, PANEL] into ``out``. */
static void widen_panel(const Weight *w, int p, float *restrict out, long stride) {
    int k = w->k, bytes = w->kind == WEIGHT_BF16 ? 2 : 1;
    const char *panel = (const char *)w->data + (long)p * k * PANEL * bytes;
    float unit = w->kind == WEIGHT_FP8 ? FP8_UNIT : 1.0f;
    vec scale[3];
    for (int s = 0; s < 3; s++) {
        int left = w->n - p * PANEL - VW * s;
        scale[s] = w->scale == NULL ? vset1(1.0f)
                   : left > 0 ? vmul(vload_n(w->scale + p * PANEL + VW * s, left), vset1(unit))
                              : vzero();
    }
    for (int i = 0; i < k; i++)
        for (int s = 0; s < 3; s++) {
            long at = (long)i * PANEL + VW * s;
            vec v = w->kind == WEIGHT_INT8  ? vwiden_i8((const int8_t *)panel + at)
                    : w->kind == WEIGHT_FP8 ? vwiden_fp8((const uint8_t *)panel + at)
                                            : vwiden((const uint16_t *)panel + at);
            vstore_n(out + i * stride + VW * s, w->scale == NULL ? v : vmul(v, scale[s]), VW);
        }
}

/* The calling thread's buffer for one widened panel, grown to the largest asked for
 * (one per thread of the team, kept for its life); NULL if it cannot be had. */
static __thread float *panel_buffer;
static __thread long panel_buffer_floats;

static float *thread_panel(long floats) {
    if (floats > panel_buffer_floats) {
        free(panel_buffer);
        panel_buffer = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        panel_buffer_floats = panel_buffer ? floats : 0;
    }
    return panel_buffer;
}

/* y = x . w^T, or y += x . w^T with ``add``; panels shared out to the calling team
 * (serially outside a parallel region). Every thread of the team must call it. */
void matmul_team(const float *restrict x, const Weight *w, float *restrict y, int m, int add) {
    int panels = (w->n + PANEL - 1) / PANEL;
    /* Rows in slabs that stay in L2 while every panel passes them (a prefill's 1024
     * rows do not: re-reading them from L3 for each panel cost 40% of its time). */
    for (int slab = 0; slab < m; slab += SLAB_ROWS) {
        int slab_end = m - slab < SLAB_ROWS ? m : slab + SLAB_ROWS;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            int bytes = w->kind == WEIGHT_BF16 ? 2 : 1;
            const char *panel = (const char *)w->data + (long)p * w->k * PANEL * bytes;
            float *wide = WIDE_FROM && slab_end - slab >= WIDE_FROM
                              ? thread_panel((long)w->k * PANEL) : NULL;
            if (wide)
                widen_panel(w, p, wide, PANEL);
            for (int r0 = slab; r0 < slab_end; r0 += ROWS) {
                int rows = slab_end - r0 < ROWS ? slab_end - r0 : ROWS, first = r0 == slab;
                if (wide) {
                    rows_of_panel(x, w, wide, y, p, r0, rows, 0, add, WEIGHT_FP32);
                    continue;
                }
                switch (w->kind) {
                case WEIGHT_INT8:
                    rows_of_panel(x, w, panel, y, p, r0, rows, first, add, WEIGHT_INT8);
                    break;
                case WEIGHT_FP8:
                    rows_of_panel(x, w, panel, y, p, r0, rows, first, add, WEIGHT_FP8);
                    break;
                default:
                    rows_of_panel(x, w, panel, y, p, r0, rows, first, add, WEIGHT_BF16);
                    break;
                }
            }
        }
    }
}

void matmul(const float *restrict x, const Weight *w, float *restrict y, int m) {
#pragma omp parallel
    matmul_team(x, w, y, m, 0);
}

/* out[k, panels * PANEL] = the weight in fp32, scaled: for MKL's sgemm on prefills of
 * many rows (kernels.py), one pass over the packed values, panels shared out. */
void widen_weight(const Weight *w, float *restrict out) {
    int panels = (w->n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++)
        widen_panel(w, p, out + p * PANEL, (long)panels * PANEL);
}

uint8_t fp8_from_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    uint8_t sign = (bits >> 24) & 0x80;
    float a = fabsf(x);
    if (!(a < 448.0f))  /* saturate (NaN too) */
        return sign | 0x7E;
    if (a < 0.015625f)  /* below 2^-6: subnormal, steps of 2^-9 (8 of them reach 2^-6) */
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    uint32_t mag = bits & 0x7FFFFFFF;
    /* 3 of the 23 mantissa bits, rounded to nearest even (a carry moves the exponent) */
    uint32_t r = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20;
    return sign | (uint8_t)(r - ((127 - 7) << 3));
}

void fp8_from_floats(const float *x, uint8_t *out, long n) {
    for (long i = 0; i < n; i++)
        out[i] = fp8_from_float(x[i]);
}
