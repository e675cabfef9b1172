/* y[m, n] = x[m, k] . w[n, k]^T, with w in bf16 (packed, see below) and x, y in fp32.
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
 * Threads (torch's own OpenMP runtime: the same library, the same team) split panels.
 * ``matmul_team`` shares out its panels to the team it is called from, so the fused
 * decode step (decode_step.c) runs its matmuls inside one parallel region.
 */
#include "kernels.h"
#include "simd.h"

/* Three vectors of output columns; rows of x per block: 8 x 3 accumulators fill
 * AVX-512's 32 registers, 4 x 3 AVX2's 16 (with the 3 weights and the broadcast). */
#define PANEL (3 * VW)
#define ROWS (VW == 16 ? 8 : 4)
#define SLAB_ROWS 128
/* Into L2, far ahead: an L1 prefetch holds one of a core's few fill buffers until
 * DRAM answers, which capped a thread at about 10 GB/s; 8 KB ahead into L2 reached
 * about 20 GB/s on 2 threads, what torch's fp32 sum reads. */
#define PREFETCH_BYTES 8192

int matmul_bf16_panel(void) { return PANEL; }

/* ``rows`` (at most ROWS) input rows against one panel; inlined with a constant
 * ``rows`` so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
block(const float *restrict x, const uint16_t *restrict panel, float *restrict y, int rows,
      int cols, int n, int k, int prefetch, int add) {
    vec acc[ROWS][3];
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < 3; s++)
            acc[r][s] = vzero();
    for (int i = 0; i < k; i++) {
        const uint16_t *wi = panel + (long)i * PANEL;
        /* Every line of the next bytes, once per 192 (two steps of AVX-512's panel,
         * four of AVX2's). */
        if (prefetch && (i & (192 / (PANEL * 2) - 1)) == 0) {
            _mm_prefetch((const char *)wi + PREFETCH_BYTES, _MM_HINT_T1);
            _mm_prefetch((const char *)wi + PREFETCH_BYTES + 64, _MM_HINT_T1);
            _mm_prefetch((const char *)wi + PREFETCH_BYTES + 128, _MM_HINT_T1);
        }
        vec w0 = vwiden(wi), w1 = vwiden(wi + VW), w2 = vwiden(wi + 2 * VW);
        for (int r = 0; r < rows; r++) {
            vec xb = vset1(x[(long)r * k + i]);
            acc[r][0] = vfma(xb, w0, acc[r][0]);
            acc[r][1] = vfma(xb, w1, acc[r][1]);
            acc[r][2] = vfma(xb, w2, acc[r][2]);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *yr = y + (long)r * n;
        for (int s = 0; s < 3; s++) {
            int left = cols - VW * s;
            if (left <= 0)
                break;
            vec out = acc[r][s];
            if (add)
                out = vadd(out, vload_n(yr + VW * s, left));
            vstore_n(yr + VW * s, out, left);
        }
    }
}

/* y = x . w^T, or y += x . w^T with ``add``; panels shared out to the calling team
 * (serially outside a parallel region). Every thread of the team must call it. */
void matmul_team(const float *restrict x, const uint16_t *restrict w, float *restrict y,
                 int m, int n, int k, int add) {
    int panels = (n + PANEL - 1) / PANEL;
    /* Rows in slabs that stay in L2 while every panel passes them (a prefill's 1024
     * rows do not: re-reading them from L3 for each panel cost 40% of its time). */
    for (int slab = 0; slab < m; slab += SLAB_ROWS) {
        int slab_end = m - slab < SLAB_ROWS ? m : slab + SLAB_ROWS;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const uint16_t *panel = w + (long)p * k * PANEL;
            int cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
            for (int r0 = slab; r0 < slab_end; r0 += ROWS) {
                const float *xs = x + (long)r0 * k;
                float *ys = y + (long)r0 * n + p * PANEL;
                int first = r0 == slab;
                switch (slab_end - r0 < ROWS ? slab_end - r0 : ROWS) {
#if VW == 16
                case 8: block(xs, panel, ys, 8, cols, n, k, first, add); break;
                case 7: block(xs, panel, ys, 7, cols, n, k, first, add); break;
                case 6: block(xs, panel, ys, 6, cols, n, k, first, add); break;
                case 5: block(xs, panel, ys, 5, cols, n, k, first, add); break;
#endif
                case 4: block(xs, panel, ys, 4, cols, n, k, first, add); break;
                case 3: block(xs, panel, ys, 3, cols, n, k, first, add); break;
                case 2: block(xs, panel, ys, 2, cols, n, k, first, add); break;
                default: block(xs, panel, ys, 1, cols, n, k, first, add); break;
                }
            }
        }
    }
}

void matmul_bf16(const float *restrict x, const uint16_t *restrict w, float *restrict y,
                 int m, int n, int k) {
#pragma omp parallel
    matmul_team(x, w, y, m, n, k, 0);
}
