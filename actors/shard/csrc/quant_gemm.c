/* Matmul against a weight kept in its GGUF blocks (CPU, float32 activations): y[T, out] = x[T, in] . w[out, in]^T,
 * each row of w a run of llama.cpp blocks of 32 weights: Q4_1 (fp16 scale d, fp16 minimum m, 16 bytes of 4-bit
 * values: w = d * q + m) or Q8_0 (fp16 scale d, 32 int8 values: w = q * d).
 *
 * A decode step is bound by reading its weights: a Q4_1 row is 5/32 of its float32 bytes, so each block is
 * decoded in registers (the same two roundings as gguf's own decoder, hence the fp-contract pragma: a fused
 * multiply-add would round once and give other weights than the float32 copy) and multiplied into up to 16
 * tokens while it is there. Each thread takes shares of the rows first come first served, as gemm.c does.
 */
#pragma GCC optimize("fp-contract=off")
#include <stdint.h>
#include <string.h>

#define QK 32                   /* weights per block */
#define Q4_1_BYTES 20
#define Q8_0_BYTES 34
#define CHUNKS_PER_THREAD 8
#define RUN_BLOCKS 20            /* blocks of a row per pass over the tokens at most (see quant_gemm_f32) */

enum { QTYPE_Q4_1 = 0, QTYPE_Q8_0 = 1 };

#if defined(__F16C__)
#include <immintrin.h>
static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
#else
static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else {
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define VZERO _mm512_setzero_ps()
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VSUM _mm512_reduce_add_ps

/* The 32 weights of one block as 2 vectors. */
static inline void decode_q4_1(const uint8_t *b, vec *w) {
    const __m512 d = _mm512_set1_ps(half(b)), m = _mm512_set1_ps(half(b + 2));
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + 4)), low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
    w[0] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), m);
    w[1] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), m);
}

static inline void decode_q8_0(const uint8_t *b, vec *w) {
    const __m512 d = _mm512_set1_ps(half(b));
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)))), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))), d);
}

#elif defined(__AVX2__) && defined(__FMA__)
#include "simd.h"
#define LANES 8
typedef __m256 vec;
#define VZERO _mm256_setzero_ps()
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VSUM sum1

static inline void decode_q4_1(const uint8_t *b, vec *w) {
    const __m256 d = _mm256_set1_ps(half(b)), m = _mm256_set1_ps(half(b + 2));
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + 4)), low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]))), m);
}

static inline void decode_q8_0(const uint8_t *b, vec *w) {
    const __m256 d = _mm256_set1_ps(half(b));
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i)))),
                             d);
}

#else /* no SIMD: one weight per lane, correct but slow (quant_gemm_vectorised() is 0 here) */
#define LANES 1
typedef float vec;
#define VZERO 0.0f
#define VLOAD(p) (*(p))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSUM(a) (a)

static inline void decode_q4_1(const uint8_t *b, vec *w) {
    const float d = half(b), m = half(b + 2);
    for (int i = 0; i < 16; i++) {
        w[i] = d * (float)(b[4 + i] & 0x0F) + m;
        w[i + 16] = d * (float)(b[4 + i] >> 4) + m;
    }
}

static inline void decode_q8_0(const uint8_t *b, vec *w) {
    const float d = half(b);
    for (int i = 0; i < QK; i++) w[i] = (float)(int8_t)b[2 + i] * d;
}
#endif

#define VECS (QK / LANES) /* vectors per block */

#if LANES == 16
/* Lane i of the result = the sum of a[i]'s 16 lanes, for 16 vectors at once: 45 shuffles and adds where 16
 * separate reductions take ~130. */
static inline __m512 sum16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

/* y[g * out + r] = (or += with `add`) the sum of acc[r * G + g]'s lanes, for the R x G <= 16 accumulators of one
 * pass. */
static inline void store_sums(const vec *acc, int R, int G, float *y, int64_t out, int add) {
    __m512 all[16];
    float lanes[16];
    for (int i = 0; i < 16; i++) all[i] = i < R * G ? acc[i] : _mm512_setzero_ps();
    _mm512_storeu_ps(lanes, sum16(all));
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) y[g * out + r] = add ? y[g * out + r] + lanes[r * G + g] : lanes[r * G + g];
}
#else
static inline void store_sums(const vec *acc, int R, int G, float *y, int64_t out, int add) {
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) {
            const float sum = VSUM(acc[r * G + g]);
            y[g * out + r] = add ? y[g * out + r] + sum : sum;
        }
}
#endif

/* Rows [r0, r1) of w, R at a time, over blocks [b0, b1) of each row, against G tokens x [G][in] -> y[g * out + r]
 * (added to what an earlier range of blocks left there when b0 > 0): each block is decoded once per
 * pass and meets every token while in registers; R rows share each load of the tokens and give R x G independent
 * sums (few tokens alone would wait on one chain of FMAs). GCC keeps acc in registers only fully unrolled. */
#define ROWS(NAME, G, R, DECODE, BYTES)                                                                        \
    static int64_t NAME(const float *x, const uint8_t *w, float *y, int64_t in, int64_t out, int64_t r0,     \
                        int64_t r1, int64_t b0, int64_t b1) {                                                \
        const int64_t blocks = in / QK;                                                                      \
        int64_t r = r0;                                                                                      \
        for (; r + R <= r1; r += R) {                                                                        \
            vec acc[R * G];                                                                                  \
            _Pragma("GCC unroll 16") for (int i = 0; i < R * G; i++) acc[i] = VZERO;                        \
            for (int64_t b = b0; b < b1; b++) {                                                              \
                vec wv[R][VECS];                                                                             \
                _Pragma("GCC unroll 8") for (int j = 0; j < R; j++)                                          \
                    DECODE(w + ((r + j) * blocks + b) * BYTES, wv[j]);                                       \
                const float *xb = x + b * QK;                                                                \
                _Pragma("GCC unroll 16") for (int g = 0; g < G; g++)                                         \
                _Pragma("GCC unroll 32") for (int v = 0; v < VECS; v++) {                                    \
                    const vec xv = VLOAD(xb + g * in + v * LANES);                                           \
                    _Pragma("GCC unroll 8") for (int j = 0; j < R; j++)                                      \
                        acc[j * G + g] = VFMA(wv[j][v], xv, acc[j * G + g]);                                 \
                }                                                                                            \
            }                                                                                                \
            store_sums(acc, R, G, y + r, out, b0 > 0);                                                       \
        }                                                                                                    \
        return r;                                                                                            \
    }

/* Per token group: the register-filling pass, then single rows for the rest of [r0, r1). */
#define FAMILY(Q, DECODE, BYTES)                                                                               \
    ROWS(Q##_16x1, 16, 1, DECODE, BYTES)                                                                     \
    ROWS(Q##_8x2, 8, 2, DECODE, BYTES)                                                                       \
    ROWS(Q##_8x1, 8, 1, DECODE, BYTES)                                                                       \
    ROWS(Q##_4x4, 4, 4, DECODE, BYTES)                                                                       \
    ROWS(Q##_4x1, 4, 1, DECODE, BYTES)                                                                       \
    ROWS(Q##_2x4, 2, 4, DECODE, BYTES)                                                                       \
    ROWS(Q##_2x1, 2, 1, DECODE, BYTES)                                                                       \
    ROWS(Q##_1x8, 1, 8, DECODE, BYTES)                                                                       \
    ROWS(Q##_1x1, 1, 1, DECODE, BYTES)                                                                       \
    static void Q##_tokens(const float *x, const uint8_t *w, float *y, int64_t tokens, int64_t in,          \
                           int64_t out, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {                    \
        int64_t t = 0;                                                                                       \
        if (LANES == 16) /* AVX2's 16 registers hold 8 tokens' accumulators and a block */                   \
            for (; t + 16 <= tokens; t += 16) Q##_16x1(x + t * in, w, y + t * out, in, out, r0, r1, b0, b1); \
        for (; t + 8 <= tokens; t += 8) {                                                                    \
            const int64_t rest = Q##_8x2(x + t * in, w, y + t * out, in, out, r0, r1, b0, b1);              \
            Q##_8x1(x + t * in, w, y + t * out, in, out, rest, r1, b0, b1);                                  \
        }                                                                                                    \
        if (t + 4 <= tokens) {                                                                               \
            const int64_t rest = Q##_4x4(x + t * in, w, y + t * out, in, out, r0, r1, b0, b1);              \
            Q##_4x1(x + t * in, w, y + t * out, in, out, rest, r1, b0, b1);                                  \
            t += 4;                                                                                          \
        }                                                                                                    \
        if (t + 2 <= tokens) {                                                                               \
            const int64_t rest = Q##_2x4(x + t * in, w, y + t * out, in, out, r0, r1, b0, b1);              \
            Q##_2x1(x + t * in, w, y + t * out, in, out, rest, r1, b0, b1);                                  \
            t += 2;                                                                                          \
        }                                                                                                    \
        if (t < tokens) {                                                                                    \
            const int64_t rest = Q##_1x8(x + t * in, w, y + t * out, in, out, r0, r1, b0, b1);              \
            Q##_1x1(x + t * in, w, y + t * out, in, out, rest, r1, b0, b1);                                  \
        }                                                                                                    \
    }

FAMILY(q4_1, decode_q4_1, Q4_1_BYTES)
FAMILY(q8_0, decode_q8_0, Q8_0_BYTES)

/* 1 where the blocks are decoded into SIMD vectors (AVX-512 or AVX2 + FMA), else 0. */
int quant_gemm_vectorised(void) { return LANES > 1; }

/* y[tokens, out] = x[tokens, in] . w^T for w [out][in / 32 blocks of `qtype`], all contiguous, on `threads`
 * OpenMP threads. Returns 0, or -1 for an unknown qtype or an `in` that is not whole blocks. */
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int64_t tokens, int64_t in, int64_t out, int qtype,
                   int threads) {
    if (in % QK || (qtype != QTYPE_Q4_1 && qtype != QTYPE_Q8_0)) return -1;
    const int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    const int64_t share = (out + chunks - 1) / chunks;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r0 = c * share, r1 = r0 + share < out ? r0 + share : out;
        if (r0 >= r1) continue;
        /* Blocks in runs whose tokens' values stay in L1 (16 tokens x 20 blocks = 40 KiB) while the rows pass. */
        const int64_t blocks = in / QK, runs = (blocks + RUN_BLOCKS - 1) / RUN_BLOCKS;
        const int64_t run = (blocks + runs - 1) / runs;
        for (int64_t b0 = 0; b0 < blocks; b0 += run) {
            const int64_t b1 = b0 + run < blocks ? b0 + run : blocks;
            if (qtype == QTYPE_Q4_1) q4_1_tokens(x, w, y, tokens, in, out, r0, r1, b0, b1);
            else q8_0_tokens(x, w, y, tokens, in, out, r0, r1, b0, b1);
        }
    }
    return 0;
}
