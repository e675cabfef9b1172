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
 * On CPUs with AMX (the amx build) bf16 weights are packed in pairs along k
 * ([k/2, PANEL, 2], k padded to K_ALIGN) and multiplied as they are stored, by AMX tiles
 * of 16 rows x 32 k (`tdpbf16ps`) from ``amx_rows`` rows, and under that by fp32 FMAs
 * (a pair widens with a shift and a mask). AMX multiplies bf16 by bf16, so each row of x
 * is split into two bf16 halves, x = hi + lo (hi = x rounded, lo = the rest rounded):
 * x . w = hi . w + lo . w keeps 16 of x's 24 bits (relative error about 2^-17, against
 * bf16's 2^-9), so the results match the fp32 kernels' (and HF's fp32 over the same
 * weights) to within their own rounding, at twice the tile work, which AMX has to spare.
 * Threads (torch's own OpenMP runtime: the same library, the same team) split panels.
 * ``matmul_team`` shares out its panels to the team it is called from, so the fused
 * decode step (decode_step.c) runs its matmuls inside one parallel region.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels.h"
#include "simd.h"

/* Three vectors of output columns; rows of x per block: 8 x 3 accumulators fill
 * AVX-512's 32 registers, 4 x 3 AVX2's 16 (with the 3 weights and the broadcast). */
#define PANEL (3 * VW)
#define ROWS (VW == 16 ? 8 : 4)
#define SLAB_ROWS 128
/* From this many rows (a prefill) panels are shared out as the threads come for them
 * (``schedule(dynamic)``): a thread the VM slows takes fewer instead of the other waiting
 * at the barrier (SmolLM2, 32x128 prefill: amx 0.94-0.96x, avx2 0.94-0.95x). Decode steps
 * keep a static split, so each thread's prefetch runs on into its next panel (dynamic
 * there: b=32 1.03x slower). */
#define SHARED_FROM SLAB_ROWS
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

#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
/* The amx build: bf16 weights packed in k-pairs, k padded to a whole AMX tile's depth */
#define PAIRED_BF16 1
#define K_ALIGN 32
#else
#define PAIRED_BF16 0
#define K_ALIGN 1 /* bf16 weights [k, PANEL] per panel, widened to fp32 */
#endif
/* Python packs bf16 weights by this (kernels.PackedMatmul): 1, or the paired layout's. */
int matmul_k_align(void) { return K_ALIGN; }

/* Internal to this file: a panel already widened and scaled (fp32, no scale to apply). */
#define WEIGHT_FP32 (-1)

/* One row's sums of a panel (three vectors) into its first ``cols`` columns of ``yr``,
 * or added to them. */
static inline __attribute__((always_inline)) void put_row(float *yr, const vec sums[3],
                                                          int cols, int add) {
    for (int s = 0; s < 3; s++) {
        int left = cols - VW * s;
        if (left <= 0)
            break;
        vstore_n(yr + VW * s, add ? vadd(sums[s], vload_n(yr + VW * s, left)) : sums[s], left);
    }
}

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
        for (int s = 0; s < 3 && scaled; s++)
            acc[r][s] = vmul(acc[r][s], scales[s]);
        put_row(y + (long)r * n, acc[r], cols, add);
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

/* ``*buffer`` grown to at least ``bytes`` (64-byte aligned, kept until a bigger one is
 * asked for); NULL if it cannot be had. */
static void *grown(void **buffer, long *held, long bytes) {
    if (bytes > *held) {
        free(*buffer);
        *buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        *held = *buffer ? bytes : 0;
    }
    return *buffer;
}

/* The calling thread's buffer for one widened panel (one per thread of the team, kept for
 * its life). */
static __thread void *panel_buffer;
static __thread long panel_buffer_bytes;

static float *thread_panel(long floats) {
    return grown(&panel_buffer, &panel_buffer_bytes, floats * (long)sizeof(float));
}

#if PAIRED_BF16
/* AMX from this many rows (0: never); set by matmul_use_amx once Linux lets this
 * process use the tile registers (kernels.py's table says from how many rows). */
static int amx_rows;

/* The calling thread's bf16 halves of a slab of x, hi then lo, each [rows rounded up to
 * 16, kpad] (zeros past k and past the rows: an AMX tile reads 16 rows), kept for the
 * thread's life. */
static __thread void *xbf_buffer;
static __thread long xbf_bytes;

static uint16_t *thread_xbf(long elems) {
    return grown(&xbf_buffer, &xbf_bytes, elems * (long)sizeof(uint16_t));
}

/* Rows of x [., k] fp32 -> hi [rows16, kpad] bf16 (rounded to nearest even) and lo (the
 * remainder x - hi, rounded) at hi + rows16 * kpad. */
static void rows_to_bf16(const float *x, int k, int kpad, int rows, int rows16, uint16_t *hi) {
    uint16_t *lo = hi + (long)rows16 * kpad;
    for (int r = 0; r < rows16; r++)
        for (int c = 0; c < kpad; c += 16) {
            int left = r < rows ? k - c : 0;
            __m512 v = left > 0 ? vload_n(x + (long)r * k + c, left) : vzero();
            __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
            __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(
                                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
            _mm256_storeu_si256((__m256i *)(hi + (long)r * kpad + c), h);
            _mm256_storeu_si256((__m256i *)(lo + (long)r * kpad + c),
                                (__m256i)_mm512_cvtneps_pbh(rest));
        }
}

/* ``rows`` (at most ROWS) fp32 rows of x against a paired panel, with fp32 FMAs in the
 * order of ``block`` (so with the same sums as the avx512 build): each 64 bytes hold k
 * pairs of 16 columns, whose even and odd k widen with one shift and one mask. */
static inline __attribute__((always_inline)) void
block_pairs(const float *restrict x, const uint16_t *restrict panel, float *restrict y,
            int rows, int cols, int n, int k, int prefetch, int add) {
    const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000u);
    vec acc[ROWS][3];
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < 3; s++)
            acc[r][s] = vzero();
    for (int i = 0; 2 * i < k; i++) {
        const uint16_t *at = panel + (long)i * 2 * PANEL;
        if (prefetch) { /* each pair of k is 192 bytes: three lines */
            const char *next = (const char *)at + PREFETCH_BYTES;
            _mm_prefetch(next, _MM_HINT_T1);
            _mm_prefetch(next + 64, _MM_HINT_T1);
            _mm_prefetch(next + 128, _MM_HINT_T1);
        }
        __m512i v[3] = {_mm512_loadu_si512(at), _mm512_loadu_si512(at + 32),
                        _mm512_loadu_si512(at + 64)};
        vec even[3], odds[3];
        for (int s = 0; s < 3; s++) {
            even[s] = _mm512_castsi512_ps(_mm512_slli_epi32(v[s], 16));
            odds[s] = _mm512_castsi512_ps(_mm512_and_si512(v[s], odd));
        }
        int both = 2 * i + 1 < k; /* odd k: the last pair's second half is padding */
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (long)r * k + 2 * i;
            vec xe = vset1(xr[0]);
            for (int s = 0; s < 3; s++)
                acc[r][s] = vfma(xe, even[s], acc[r][s]);
            if (both) {
                vec xo = vset1(xr[1]);
                for (int s = 0; s < 3; s++)
                    acc[r][s] = vfma(xo, odds[s], acc[r][s]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        put_row(y + (long)r * n, acc[r], cols, add);
}

static void rows_of_paired_panel(const float *x, const uint16_t *panel, float *y, int rows,
                                 int cols, int n, int k, int first, int add) {
    switch (rows) {
    case 8: block_pairs(x, panel, y, 8, cols, n, k, first, add); break;
    case 7: block_pairs(x, panel, y, 7, cols, n, k, first, add); break;
    case 6: block_pairs(x, panel, y, 6, cols, n, k, first, add); break;
    case 5: block_pairs(x, panel, y, 5, cols, n, k, first, add); break;
    case 4: block_pairs(x, panel, y, 4, cols, n, k, first, add); break;
    case 3: block_pairs(x, panel, y, 3, cols, n, k, first, add); break;
    case 2: block_pairs(x, panel, y, 2, cols, n, k, first, add); break;
    default: block_pairs(x, panel, y, 1, cols, n, k, first, add); break;
    }
}

/* Tiles 0-2: sums, 16 rows x 16 columns fp32 each (a panel's 48); 3: 16 rows of x by 32
 * k; 4-6: the panel's 32 k (16 pairs) by its three groups of 16 columns. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static void load_tile_config(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 7; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* 16 rows of x (bf16 halves: ``xb``, ``xb + lo``; ``rows`` of them real) against a
 * paired panel: each B tile loaded once serves both halves. ``prefetch``: the first 16
 * rows of a decode step's batch bring the panel's next bytes into L2 as the FMA blocks
 * do; the hardware prefetcher alone left the tile loads waiting on memory (SmolLM2's
 * matmuls at 32 rows, all layers: 36.6 -> 26.7 ms; a b=32 step 0.91x). A prefill's
 * 128-row slabs are bound by the tiles' arithmetic, and go without. */
static void tiles_of_panel(const uint16_t *xb, long lo, const uint16_t *panel, float *y,
                           int rows, int cols, int n, int kpad, int add, int prefetch) {
    float out[16 * PANEL] __attribute__((aligned(64)));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int kb = 0; kb < kpad; kb += 32) {
        const uint16_t *b = panel + (long)kb * PANEL; /* pair kb/2: (kb/2) * 2 * PANEL */
        if (prefetch) { /* 32 k of a panel: 3 KB, 48 lines, PREFETCH_BYTES ahead */
            const char *next = (const char *)b + PREFETCH_BYTES;
            for (int line = 0; line < 32 * PANEL * 2; line += 64)
                _mm_prefetch(next + line, _MM_HINT_T1);
        }
        _tile_loadd(3, xb + kb, kpad * 2);
        _tile_loadd(4, b, PANEL * 4);
        _tile_loadd(5, b + 32, PANEL * 4);
        _tile_loadd(6, b + 64, PANEL * 4);
        _tile_dpbf16ps(0, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(2, 3, 6);
        _tile_loadd(3, xb + lo + kb, kpad * 2);
        _tile_dpbf16ps(0, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(2, 3, 6);
    }
    _tile_stored(0, out, PANEL * 4);
    _tile_stored(1, out + 16, PANEL * 4);
    _tile_stored(2, out + 32, PANEL * 4);
    for (int r = 0; r < rows; r++) {
        vec sums[3] = {vload_n(out + r * PANEL, VW), vload_n(out + r * PANEL + VW, VW),
                       vload_n(out + r * PANEL + 2 * VW, VW)};
        put_row(y + (long)r * n, sums, cols, add);
    }
}

/* Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA) and use
 * tiles from ``rows`` rows; 0 where it refuses (or rows <= 0: never). */
int matmul_use_amx(int rows) {
    amx_rows = 0;
    if (rows > 0 && syscall(SYS_arch_prctl, 0x1023, 18) == 0)
        amx_rows = rows;
    return amx_rows;
}

/* Panel ``p`` of a paired ``w`` for a slab of ``rows`` rows (x at ``xs``; its bf16 halves
 * at ``xb``, ``lo`` apart, where AMX runs: else NULL) into the slab's ``ys``. */
static inline void pairs_of_panel(const float *xs, const Weight *w, const uint16_t *xb,
                                  long lo, float *ys, int p, int rows, int kpad, int add) {
    int n = w->n, k = w->k, cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
    const uint16_t *panel = (const uint16_t *)w->data + (long)p * kpad * PANEL;
    float *yp = ys + p * PANEL;
    if (xb != NULL) {
        for (int r0 = 0; r0 < rows; r0 += 16)
            tiles_of_panel(xb + (long)r0 * kpad, lo, panel, yp + (long)r0 * n,
                           rows - r0 < 16 ? rows - r0 : 16, cols, n, kpad, add,
                           r0 == 0 && rows <= 64);
        return;
    }
    for (int r0 = 0; r0 < rows; r0 += ROWS)
        rows_of_paired_panel(xs + (long)r0 * k, panel, yp + (long)r0 * n,
                             rows - r0 < ROWS ? rows - r0 : ROWS, cols, n, k, r0 == 0, add);
}

/* matmul_team for bf16 weights in the paired layout: AMX tiles from amx_rows rows, fp32
 * FMAs under. */
static void matmul_pairs(const float *restrict x, const Weight *w, float *restrict y, int m,
                         int add) {
    int panels = (w->n + PANEL - 1) / PANEL, n = w->n, k = w->k;
    int kpad = (k + K_ALIGN - 1) / K_ALIGN * K_ALIGN;
    for (int slab = 0; slab < m; slab += SLAB_ROWS) {
        int rows = m - slab < SLAB_ROWS ? m - slab : SLAB_ROWS, rows16 = (rows + 15) / 16 * 16;
        const float *xs = x + (long)slab * k;
        uint16_t *xb = NULL;
        long lo = (long)rows16 * kpad;
        if (amx_rows > 0 && rows >= amx_rows) {
            /* each thread splits the slab for itself: m * k conversions against
             * m * k * n / threads products */
            xb = thread_xbf(2 * lo);
            if (xb == NULL)
                abort();
            rows_to_bf16(xs, k, kpad, rows, rows16, xb);
            load_tile_config(); /* per call: oneDNN may have loaded its own on this thread */
        }
        if (m >= SHARED_FROM) {
#pragma omp for schedule(dynamic, 2)
            for (int p = 0; p < panels; p++)
                pairs_of_panel(xs, w, xb, lo, y + (long)slab * n, p, rows, kpad, add);
        } else {
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++)
                pairs_of_panel(xs, w, xb, lo, y + (long)slab * n, p, rows, kpad, add);
        }
    }
}
#else
int matmul_use_amx(int rows) { (void)rows; return 0; }
#endif

/* Panel ``p`` of ``w`` against the slab's rows [slab, slab_end) of x, into y. */
static inline void rows_of_slab(const float *restrict x, const Weight *w, float *restrict y,
                                int p, int slab, int slab_end, int add) {
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

/* y = x . w^T, or y += x . w^T with ``add``; panels shared out to the calling team
 * (serially outside a parallel region). Every thread of the team must call it. */
void matmul_team(const float *restrict x, const Weight *w, float *restrict y, int m, int add) {
#if PAIRED_BF16
    if (w->kind == WEIGHT_BF16) {
        matmul_pairs(x, w, y, m, add);
        return;
    }
#endif
    int panels = (w->n + PANEL - 1) / PANEL;
    /* Rows in slabs that stay in L2 while every panel passes them (a prefill's 1024
     * rows do not: re-reading them from L3 for each panel cost 40% of its time). */
    for (int slab = 0; slab < m; slab += SLAB_ROWS) {
        int slab_end = m - slab < SLAB_ROWS ? m : slab + SLAB_ROWS;
        if (m >= SHARED_FROM) {
#pragma omp for schedule(dynamic, 2)
            for (int p = 0; p < panels; p++)
                rows_of_slab(x, w, y, p, slab, slab_end, add);
        } else {
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++)
                rows_of_slab(x, w, y, p, slab, slab_end, add);
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
