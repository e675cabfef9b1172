/* y[m, n] = x[m, k] . w[n, k]^T for m <= 4, with w in bf16 and x, y in fp32.
 *
 * Why: a decode step of a few rows is bound by reading the weights. Kept in bf16
 * they are half the bytes of fp32, but CPUs without bf16 units (no AMX, no
 * AVX512-BF16) run torch's bf16 matmuls through slow conversions. Here a bf16
 * value widens to fp32 exactly (a 16-bit shift), so this computes the same sums as
 * an fp32 matmul over bf16-valued weights, at the speed of reading half the bytes.
 *
 * Four weight rows stream at once, each prefetched well ahead, and every
 * one of the m input rows multiplies them, so the weights are read once whatever m.
 * Threads (torch's own OpenMP runtime: same library, same team) split the rows.
 */
#include <immintrin.h>
#include <stdint.h>

#define MAX_ROWS 4
#define STREAMS 4
/* Into L2, far ahead: an L1 prefetch holds one of a core's few fill buffers until
 * DRAM answers, which capped a thread at about 10 GB/s; 8 KB ahead into L2 reached
 * about 20 GB/s on 2 threads, what torch's fp32 sum reads. */
#define PREFETCH_BYTES 8192

static inline __m512 widen(const uint16_t *p) {
    __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

int gemv_bf16_max_rows(void) { return MAX_ROWS; }

/* k must be a multiple of 16 and m at most MAX_ROWS; the caller checks. */
void gemv_bf16(const float *restrict x, const uint16_t *restrict w, float *restrict y,
               int m, int n, int k) {
#pragma omp parallel for schedule(static)
    for (int j = 0; j < n; j += STREAMS) {
        const uint16_t *row[STREAMS];
        for (int s = 0; s < STREAMS; s++)
            row[s] = w + (long)(j + s < n ? j + s : j) * k;
        __m512 acc[MAX_ROWS][STREAMS];
        for (int r = 0; r < MAX_ROWS; r++)
            for (int s = 0; s < STREAMS; s++)
                acc[r][s] = _mm512_setzero_ps();
        for (int i = 0; i < k; i += 16) {
            __m512 v[STREAMS];
            for (int s = 0; s < STREAMS; s++) {
                _mm_prefetch((const char *)(row[s] + i) + PREFETCH_BYTES, _MM_HINT_T1);
                v[s] = widen(row[s] + i);
            }
            for (int r = 0; r < m; r++) {
                __m512 xv = _mm512_loadu_ps(x + (long)r * k + i);
                for (int s = 0; s < STREAMS; s++)
                    acc[r][s] = _mm512_fmadd_ps(xv, v[s], acc[r][s]);
            }
        }
        for (int r = 0; r < m; r++)
            for (int s = 0; s < STREAMS && j + s < n; s++)
                y[(long)r * n + j + s] = _mm512_reduce_add_ps(acc[r][s]);
    }
}
