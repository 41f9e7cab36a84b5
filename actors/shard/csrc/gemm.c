/* Matmul of 5 to 256 tokens (layers.linear's range; any count works) against a plain row-major weight (CPU,
 * float32): y[T, out] = x[T, in] . w[out, in]^T (+ bias).
 *
 * Decode steps of 5-64 sequences are where PyTorch's GEMMs are weakest on a 2-core AVX2 box: oneDNN's packed
 * layout reaches 50-140 GFLOP/s there, the plain BLAS less. This kernel keeps twelve 8-lane accumulators in
 * registers (12 rows x 8 tokens, or 6 rows x 16 tokens), broadcasts one weight element per row and multiplies it
 * into the tokens' values at that column, so every FMA has its operands in registers or L1 and the loop runs near
 * the FMA units' rate (about 150 GFLOP/s on two cores, bench/kernels.py).
 * The tokens are first copied column-major, in tiles of 16 (zero padded), so one load gives 8 tokens' values at
 * one column; each thread takes contiguous shares of the rows in turn and, block by block, runs every tile of a panel
 * of tokens against the block while it is still in L1: the weight is read from memory once per panel.
 */
#include <stdint.h>
#include <stdlib.h>

#define TILE 16                  /* tokens per tile: two 8-lane vectors */
#define ROW_BLOCK 12             /* rows run against all tiles of a panel before the next rows */
#define PANEL_BYTES (128 * 1024) /* transposed tokens per panel: stays in L2 while the weight streams past it */
#define CHUNKS_PER_THREAD 8      /* row shares per thread, taken first come first served (see gemm_f32) */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* R rows x V vectors of 8 tokens: xt [in][V * 8] (column-major tokens), w [R rows][in]; writes y[t][r] for the
 * first `tokens` tokens. GCC keeps acc in registers only with the loops fully unrolled (else it spills them). */
#define BLOCK(NAME, R, V)                                                                                        \
    static void NAME(const float *xt, const float *w, const float *bias, float *y, int64_t in, int64_t out,   \
                     int64_t tokens) {                                                                       \
        __m256 acc[R][V];                                                                                    \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                                 \
        _Pragma("GCC unroll 16") for (int v = 0; v < V; v++) acc[r][v] = _mm256_setzero_ps();               \
        for (int64_t k = 0; k < in; k++) {                                                                   \
            const float *xk = xt + k * (V * 8);                                                              \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                           \
                __m256 wv = _mm256_broadcast_ss(w + r * in + k);                                             \
                _Pragma("GCC unroll 16") for (int v = 0; v < V; v++)                                         \
                    acc[r][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + v * 8), acc[r][v]);                 \
            }                                                                                                \
        }                                                                                                    \
        float lanes[V * 8];                                                                                  \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                               \
            _Pragma("GCC unroll 16") for (int v = 0; v < V; v++) _mm256_storeu_ps(lanes + v * 8, acc[r][v]); \
            float b = bias ? bias[r] : 0.0f;                                                                 \
            for (int64_t t = 0; t < tokens; t++) y[t * out + r] = lanes[t] + b;                              \
        }                                                                                                    \
    }

BLOCK(rows12x8, 12, 1)
BLOCK(rows1x8, 1, 1)
BLOCK(rows6x16, 6, 2)
BLOCK(rows1x16, 1, 2)

/* One tile (its `tokens` <= 16 tokens) against rows [r0, r1). */
static void tile(const float *xt, int64_t tokens, const float *w, const float *bias, float *y, int64_t in,
                 int64_t out, int64_t r0, int64_t r1) {
    int64_t r = r0;
    if (tokens <= 8) {
        for (; r + 12 <= r1; r += 12) rows12x8(xt, w + r * in, bias ? bias + r : NULL, y + r, in, out, tokens);
        for (; r < r1; r++) rows1x8(xt, w + r * in, bias ? bias + r : NULL, y + r, in, out, tokens);
    } else {
        for (; r + 6 <= r1; r += 6) rows6x16(xt, w + r * in, bias ? bias + r : NULL, y + r, in, out, tokens);
        for (; r < r1; r++) rows1x16(xt, w + r * in, bias ? bias + r : NULL, y + r, in, out, tokens);
    }
}

#else /* no AVX2 + FMA: a plain loop, correct but slower than torch (native.gemv_available() is False there) */

static void tile(const float *xt, int64_t tokens, const float *w, const float *bias, float *y, int64_t in,
                 int64_t out, int64_t r0, int64_t r1) {
    const int64_t width = tokens <= 8 ? 8 : TILE;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < tokens; t++) {
            float s = bias ? bias[r] : 0.0f;
            for (int64_t k = 0; k < in; k++) s += w[r * in + k] * xt[k * width + t];
            y[t * out + r] = s;
        }
}

#endif

/* Copy tokens [t0, t0 + n) of x into tiles: tile j is [in][8 or 16] at xt + j * TILE * in, zero padded. */
static void transpose(const float *x, float *xt, int64_t t0, int64_t n, int64_t in) {
    for (int64_t j = 0; j * TILE < n; j++) {
        const int64_t first = t0 + j * TILE, count = n - j * TILE < TILE ? n - j * TILE : TILE;
        const int64_t width = count <= 8 ? 8 : TILE;
        float *dst = xt + j * TILE * in;
        for (int64_t k = 0; k < in; k++) {
            for (int64_t t = 0; t < count; t++) dst[k * width + t] = x[(first + t) * in + k];
            for (int64_t t = count; t < width; t++) dst[k * width + t] = 0.0f;
        }
    }
}

/* The calling thread's token panel buffer of at least `floats`, kept between calls instead of a malloc and free
 * of up to 128 KiB per matmul. */
static float *staging(size_t floats) {
    static __thread float *buffer = NULL;
    static __thread size_t capacity = 0;
    if (capacity < floats) {
        free(buffer);
        buffer = malloc(floats * sizeof(float));
        capacity = buffer == NULL ? 0 : floats;
    }
    return buffer;
}

/* y[tokens, out] = x[tokens, in] . w[out, in]^T (+ bias[out] when not NULL), all contiguous, on `threads` OpenMP
 * threads. Returns 0, or -1 when the token panel could not be allocated. */
int gemm_f32(const float *x, const float *w, const float *bias, float *y, int64_t tokens, int64_t in, int64_t out,
             int threads) {
    int64_t panel = PANEL_BYTES / (in * (int64_t)sizeof(float)) / TILE * TILE;
    const int64_t padded = (tokens + TILE - 1) / TILE * TILE;
    if (panel > padded) panel = padded;  /* a small step stages only its own tiles */
    if (panel < TILE) panel = TILE;
    float *xt = staging((size_t)(panel * in));
    if (xt == NULL) return -1;
    /* Many small shares taken dynamically, not one per thread: a thread the OS preempts (a busy box: the engine,
     * the HTTP side, a client) delays only its current share while the others take the rest, instead of the
     * whole matmul waiting for its fixed half at the barrier. */
    const int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    const int64_t share = ((out + chunks - 1) / chunks + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK;
    for (int64_t p0 = 0; p0 < tokens; p0 += panel) {
        const int64_t n = tokens - p0 < panel ? tokens - p0 : panel;
        transpose(x, xt, p0, n, in);
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t r0 = c * share, r1 = r0 + share < out ? r0 + share : out;
            for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
                const int64_t re = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;
                for (int64_t j = 0; j * TILE < n; j++) {
                    const int64_t count = n - j * TILE < TILE ? n - j * TILE : TILE;
                    tile(xt + j * TILE * in, count, w, bias, y + (p0 + j * TILE) * out, in, out, rb, re);
                }
            }
        }
    }
    return 0;
}
