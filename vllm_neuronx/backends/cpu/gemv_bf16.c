/* y[m, n] = x[m, k] . w[n, k]^T, with w in bf16 and x, y in fp32.
 *
 * Why: a decode step of a few rows is bound by reading the weights. Kept in bf16
 * they are half the bytes of fp32, but CPUs without bf16 units (no AMX, no
 * AVX512-BF16) run torch's bf16 matmuls through slow conversions. Here a bf16
 * value widens to fp32 exactly (a 16-bit shift), so this computes the same sums as
 * an fp32 matmul over bf16-valued weights, at the speed of reading half the bytes.
 *
 * Three weight rows stream at once, and every input row, eight at a time, multiplies
 * them while they sit in L1, so the weights are read from memory once whatever m.
 * Past about 16 rows the step is bound by multiplies, not reads, and torch's fp32
 * matmul is as fast (the caller picks). Threads (torch's own OpenMP runtime: the
 * same library, the same team) split the weight rows.
 */
#include <immintrin.h>
#include <stdint.h>

#define STREAMS 3
#define CHUNK 8
/* Into L2, far ahead: an L1 prefetch holds one of a core's few fill buffers until
 * DRAM answers, which capped a thread at about 10 GB/s; 8 KB ahead into L2 reached
 * about 20 GB/s on 2 threads, what torch's fp32 sum reads. */
#define PREFETCH_BYTES 8192

static inline __m512 widen(const uint16_t *p) {
    __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

/* ``rows`` (at most CHUNK) input rows against STREAMS weight rows; inlined with a
 * constant ``rows`` so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
chunk(const float *restrict x, const uint16_t *const *w_rows, float *restrict y, int rows,
      int valid, int n, int k, int prefetch) {
    __m512 acc[CHUNK][STREAMS];
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < STREAMS; s++)
            acc[r][s] = _mm512_setzero_ps();
    for (int i = 0; i < k; i += 16) {
        __m512 v[STREAMS];
        for (int s = 0; s < STREAMS; s++) {
            if (prefetch)
                _mm_prefetch((const char *)(w_rows[s] + i) + PREFETCH_BYTES, _MM_HINT_T1);
            v[s] = widen(w_rows[s] + i);
        }
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_loadu_ps(x + (long)r * k + i);
            for (int s = 0; s < STREAMS; s++)
                acc[r][s] = _mm512_fmadd_ps(xv, v[s], acc[r][s]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < valid; s++)
            y[(long)r * n + s] = _mm512_reduce_add_ps(acc[r][s]);
}

/* k must be a multiple of 16; the caller checks. */
void gemv_bf16(const float *restrict x, const uint16_t *restrict w, float *restrict y,
               int m, int n, int k) {
#pragma omp parallel for schedule(static)
    for (int j = 0; j < n; j += STREAMS) {
        const uint16_t *w_rows[STREAMS];
        for (int s = 0; s < STREAMS; s++)
            w_rows[s] = w + (long)(j + s < n ? j + s : j) * k;
        int valid = n - j < STREAMS ? n - j : STREAMS;
        for (int r0 = 0; r0 < m; r0 += CHUNK) {
            const float *xs = x + (long)r0 * k;
            float *ys = y + (long)r0 * n + j;
            int first = r0 == 0;
            switch (m - r0 < CHUNK ? m - r0 : CHUNK) {
            case 8: chunk(xs, w_rows, ys, 8, valid, n, k, first); break;
            case 7: chunk(xs, w_rows, ys, 7, valid, n, k, first); break;
            case 6: chunk(xs, w_rows, ys, 6, valid, n, k, first); break;
            case 5: chunk(xs, w_rows, ys, 5, valid, n, k, first); break;
            case 4: chunk(xs, w_rows, ys, 4, valid, n, k, first); break;
            case 3: chunk(xs, w_rows, ys, 3, valid, n, k, first); break;
            case 2: chunk(xs, w_rows, ys, 2, valid, n, k, first); break;
            default: chunk(xs, w_rows, ys, 1, valid, n, k, first); break;
            }
        }
    }
}
