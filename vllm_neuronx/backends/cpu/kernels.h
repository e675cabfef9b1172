/* What the CPU backend's native kernels share (see kernels.py for how they build). */
#include <immintrin.h>
#include <stdint.h>

void matmul_team(const float *restrict x, const uint16_t *restrict w, float *restrict y,
                 int m, int n, int k, int add);
