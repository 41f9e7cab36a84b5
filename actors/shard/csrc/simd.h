/* AVX2 helpers the CPU kernels share (included only where __AVX2__ and __FMA__ are defined). */
#ifndef GRIDSERVE_SIMD_H
#define GRIDSERVE_SIMD_H
#include <immintrin.h>

/* The sums of a..d's eight lanes as one 4-lane vector: element r is the sum of the r-th argument. */
static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d), abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* The sum of a's eight lanes. */
static inline float sum1(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

#endif
