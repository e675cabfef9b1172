/* The few vector operations the kernels use, for each instruction set they build for.
 *
 * kernels.py compiles the same sources once per variant: with -mavx512f -mavx512bw
 * (16 fp32 lanes, masked loads and stores) or with -mavx2 -mfma -mf16c (8 lanes, masks
 * from a table). The kernels are written against these names only, so both variants do
 * the same arithmetic in the same order per lane; only the vector width differs.
 *
 * Weights widen exactly to fp32 from three formats: bf16 (the top half of an fp32),
 * int8, and fp8 e4m3fn. An e4m3fn byte (sign, 4 exponent bits biased by 7, 3 mantissa
 * bits) moved to bits 15 and 13..7 of a half is the same value times 2^-8, subnormals
 * included (a half's exponent is biased by 15), and the hardware widens halves exactly:
 * vwiden_fp8 returns the weight / 256, and FP8_UNIT (256) is folded into the scale. */
#ifndef VLLM_NEURONX_SIMD_H
#define VLLM_NEURONX_SIMD_H

#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)

#define VW 16
typedef __m512 vec;

static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vclamp(vec a, float lo, float hi) {
    return _mm512_min_ps(_mm512_max_ps(a, vset1(lo)), vset1(hi));
}
static inline vec vround(vec a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* 2^n of whole numbers n in [-126, 127]. */
static inline vec vexp2_int(vec n) {
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}

static inline __mmask16 lanes(int n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}
/* The first ``n`` lanes (n may exceed VW: then all of them); the rest read as 0. */
static inline vec vload_n(const float *p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
static inline void vstore_n(float *p, vec v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }

/* VW bf16 values widened exactly to fp32 (a bf16 is the top half of an fp32). */
static inline vec vwiden(const uint16_t *p) {
    __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}
static inline vec vwiden_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vwiden_fp8(const uint8_t *p) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF));
    return _mm512_cvtph_ps(h);
}

#elif defined(__AVX2__) && defined(__FMA__)

#define VW 8
typedef __m256 vec;

static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vclamp(vec a, float lo, float hi) {
    return _mm256_min_ps(_mm256_max_ps(a, vset1(lo)), vset1(hi));
}
static inline vec vround(vec a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec vexp2_int(vec n) {
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 lanes on, then 8 off: the mask of the first n lanes starts at 8 - n. */
static const int32_t LANE_MASKS[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static inline __m256i lanes(int n) {
    return _mm256_loadu_si256((const __m256i *)(LANE_MASKS + 8 - (n >= 8 ? 8 : n)));
}
static inline vec vload_n(const float *p, int n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n));
}
static inline void vstore_n(float *p, vec v, int n) {
    if (n >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, lanes(n), v);
}

static inline vec vwiden(const uint16_t *p) {
    __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
}
static inline vec vwiden_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vwiden_fp8(const uint8_t *p) {
    __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16((short)0xBFFF));
    return _mm256_cvtph_ps(h);
}

#else
#error "the CPU kernels build with -mavx512f -mavx512bw or with -mavx2 -mfma -mf16c"
#endif

#define FP8_UNIT 256.0f /* vwiden_fp8 gives the weight / FP8_UNIT */

/* e^x in every lane, within 2 ulp of libm's expf (Cephes' range reduction and
 * polynomial); inputs are clamped to [-87.3, 88.3], where e^x stays a normal float.
 * Softmax and SiLU call it once per vector instead of expf once per value. */
static inline vec vexp(vec x) {
    x = vclamp(x, -87.3365448f, 88.3762626f);
    vec n = vround(vmul(x, vset1(1.44269504088896341f)));
    vec r = vfma(n, vset1(-0.693359375f), x);  /* x - n ln 2, in two parts */
    r = vfma(n, vset1(2.12194440e-4f), r);
    vec y = vset1(1.9875691500e-4f);
    y = vfma(y, r, vset1(1.3981999507e-3f));
    y = vfma(y, r, vset1(8.3334519073e-3f));
    y = vfma(y, r, vset1(4.1665795894e-2f));
    y = vfma(y, r, vset1(1.6666665459e-1f));
    y = vfma(y, r, vset1(5.0000001201e-1f));
    y = vfma(y, vmul(r, r), vadd(r, vset1(1.0f)));
    return vmul(y, vexp2_int(n));
}

#endif
