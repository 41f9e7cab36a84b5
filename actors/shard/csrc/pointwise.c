/* Row-wise ops of a decoder layer (CPU, float32), one call each instead of PyTorch's chain of small ops.
 *
 * At decode sizes (one to a few dozen rows of a few hundred values) an RMSNorm in PyTorch is five to six
 * dispatched ops whose cost is the dispatch, not the arithmetic; the loops here are written so that gcc vectorises
 * them (lane-wise sums), and run on the caller's thread unless there are enough rows to share out.
 */
#include <math.h>
#include <stdint.h>

#define LANES 8
#define ROWS_PER_THREAD 64  /* fewer rows than this per thread: one thread (waking the pool costs more) */

/* The mean of x[i]^2 over n values, as LANES partial sums (vectorisable without reassociating the sum). */
static float mean_square(const float *restrict x, int64_t n) {
    float acc[LANES] = {0}, s = 0.0f;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l] * x[i + l];
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < n; i++) s += x[i] * x[i];
    return s / (float)n;
}

/* y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w for each of `rows` rows of `n` values (the reference's order:
 * normalise, then scale by the weight). */
void rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps, int threads) {
    int use = rows >= (int64_t)threads * ROWS_PER_THREAD ? threads : 1;
    #pragma omp parallel for num_threads(use) schedule(dynamic, 16) if (use > 1)  /* preempted thread: see gemm.c */
    for (int64_t t = 0; t < rows; t++) {
        const float *restrict xt = x + t * n;
        float *restrict yt = y + t * n;
        const float r = 1.0f / sqrtf(mean_square(xt, n) + eps);
        for (int64_t i = 0; i < n; i++) yt[i] = (xt[i] * r) * w[i];
    }
}
