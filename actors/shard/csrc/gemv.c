/* Few-token matmul against a plain row-major weight (CPU, float32): y[T, out] = x[T, in] . w[out, in]^T.
 *
 * A decode step with one to a few tokens per linear layer is bound by reading the weight, not by arithmetic.
 * PyTorch's paths re-block the weight (BLAS), or walk oneDNN's packed layout tuned for 32 tokens, and reach about
 * half to two thirds of the box's read bandwidth there; this loop streams each thread's contiguous share of rows once
 * and reuses every loaded weight vector for two tokens (bench/kernels.py, "few-token matmul" table).
 * Four rows at a time keep four independent FMA chains per token; sums are eight lanes per row, folded at the end.
 */
#include <stdint.h>

#define CHUNKS_PER_THREAD 8 /* row shares per thread, taken first come first served (see gemv_f32) */

#if defined(__AVX2__) && defined(__FMA__)
#include "simd.h"

int gemv_vectorised(void) { return 1; }

/* Scalar tail of a dot product: the last in % 8 columns. */
static inline float tail(const float *x, const float *w, int64_t from, int64_t in) {
    float s = 0.0f;
    for (int64_t i = from; i < in; i++) s += x[i] * w[i];
    return s;
}

/* Four rows of w against tokens x0 and (when x1 is not NULL) x1; writes y0[0..3] and y1[0..3]. */
static void rows4(const float *x0, const float *x1, const float *w, int64_t in, float *y0, float *y1) {
    const float *w1 = w + in, *w2 = w1 + in, *w3 = w2 + in;
    const int64_t body = in & ~(int64_t)7;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    if (x1 == NULL) {
        for (int64_t i = 0; i < body; i += 8) {
            __m256 xv = _mm256_loadu_ps(x0 + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
        }
    } else {
        for (int64_t i = 0; i < body; i += 8) {
            __m256 xv = _mm256_loadu_ps(x0 + i), xu = _mm256_loadu_ps(x1 + i);
            __m256 v0 = _mm256_loadu_ps(w + i), v1 = _mm256_loadu_ps(w1 + i);
            __m256 v2 = _mm256_loadu_ps(w2 + i), v3 = _mm256_loadu_ps(w3 + i);
            a0 = _mm256_fmadd_ps(v0, xv, a0); b0 = _mm256_fmadd_ps(v0, xu, b0);
            a1 = _mm256_fmadd_ps(v1, xv, a1); b1 = _mm256_fmadd_ps(v1, xu, b1);
            a2 = _mm256_fmadd_ps(v2, xv, a2); b2 = _mm256_fmadd_ps(v2, xu, b2);
            a3 = _mm256_fmadd_ps(v3, xv, a3); b3 = _mm256_fmadd_ps(v3, xu, b3);
        }
        __m128 s = _mm_add_ps(sum4(b0, b1, b2, b3), _mm_setr_ps(tail(x1, w, body, in), tail(x1, w1, body, in),
                                                                 tail(x1, w2, body, in), tail(x1, w3, body, in)));
        _mm_storeu_ps(y1, s);
    }
    __m128 s = _mm_add_ps(sum4(a0, a1, a2, a3), _mm_setr_ps(tail(x0, w, body, in), tail(x0, w1, body, in),
                                                             tail(x0, w2, body, in), tail(x0, w3, body, in)));
    _mm_storeu_ps(y0, s);
}

/* One row of w against one token (the rows left over after blocks of four). */
static float row1(const float *x, const float *w, int64_t in) {
    const int64_t body = in & ~(int64_t)7;
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < body; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a);
    return sum1(a) + tail(x, w, body, in);
}

#else  /* no AVX2 + FMA: a plain loop, correct but not faster than torch (the caller checks gemv_vectorised) */

int gemv_vectorised(void) { return 0; }

static float row1(const float *x, const float *w, int64_t in) {
    float s = 0.0f;
    for (int64_t i = 0; i < in; i++) s += x[i] * w[i];
    return s;
}

static void rows4(const float *x0, const float *x1, const float *w, int64_t in, float *y0, float *y1) {
    for (int r = 0; r < 4; r++) {
        y0[r] = row1(x0, w + r * in, in);
        if (x1 != NULL) y1[r] = row1(x1, w + r * in, in);
    }
}

#endif

/* Rows [r0, r1) of the output for every token. */
static void rows(const float *x, const float *w, float *y, int64_t tokens, int64_t in, int64_t out, int64_t r0,
                 int64_t r1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        int64_t t = 0;
        for (; t + 2 <= tokens; t += 2)
            rows4(x + t * in, x + (t + 1) * in, w + r * in, in, y + t * out + r, y + (t + 1) * out + r);
        if (t < tokens) rows4(x + t * in, NULL, w + r * in, in, y + t * out + r, NULL);
    }
    for (; r < r1; r++)
        for (int64_t t = 0; t < tokens; t++) y[t * out + r] = row1(x + t * in, w + r * in, in);
}

/* y[tokens, out] = x[tokens, in] . w[out, in]^T, all contiguous; `threads` OpenMP threads take contiguous shares
 * of the rows (multiples of four) in turn, so every core streams its own parts of the weight. */
void gemv_f32(const float *x, const float *w, float *y, int64_t tokens, int64_t in, int64_t out, int threads) {
    /* Many small shares taken dynamically (as in gemm.c): a preempted thread holds up one share, not half. */
    const int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    const int64_t share = ((out + chunks - 1) / chunks + 3) / 4 * 4;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t r0 = c * share, r1 = r0 + share < out ? r0 + share : out;
        if (r0 < r1) rows(x, w, y, tokens, in, out, r0, r1);
    }
}
