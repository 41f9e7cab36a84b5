/* Decode attention read straight from the paged KV cache (CPU, float32).
 *
 * One query token per sequence attends over that sequence's cached keys and values, found through its block
 * table, without first copying the blocks into a contiguous buffer: the torch path gathers K and V (one read and
 * one write of the whole context) and then reads them again in small batched matmuls. Here each (sequence,
 * KV head) pair is one task: its keys are read once for the scores of every query head in its GQA group, its
 * values once for the weighted sum. Plain C loops written so that gcc vectorises them (lane-wise sums, a
 * polynomial exp); tasks are shared out over the caller's OpenMP threads (torch's own pool when it is libgomp).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8

/* q . k over d values, as LANES independent partial sums (vectorisable without reassociating the sum). */
static float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

/* x[i] = exp(x[i] - shift) for x[i] <= shift, returning the sum: range reduction by powers of two and the Cephes
 * degree-5 polynomial (relative error ~1e-7, as expf), with no branch or call so the loop vectorises; the sum is
 * taken in LANES partial sums for the same reason. */
static float exp_shifted(float *x, int64_t n, float shift) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] - shift;
        v = v > -87.0f ? v : -87.0f;                         /* e^-87 is still a normal float */
        float k = (v * 1.44269504f + 12582912.0f) - 12582912.0f;  /* round(v / ln 2) */
        float r = v - k * 0.693359375f + k * 2.12194440e-4f;  /* v - k ln 2, in two parts */
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        float e = p * r * r + r + 1.0f;
        int32_t bits = ((int32_t)k + 127) << 23;             /* 2^k */
        float scale;
        memcpy(&scale, &bits, sizeof scale);
        x[i] = e * scale;
    }
    float acc[LANES] = {0}, total = 0.0f;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l];
    for (int l = 0; l < LANES; l++) total += acc[l];
    for (; i < n; i++) total += x[i];
    return total;
}

#if defined(__AVX2__) && defined(__FMA__)
#include "simd.h"
#define HAVE_AVX2 1

/* scores[j][i] = scale * q_j . key i for `count` consecutive keys at `keys` (d % 8 == 0): four keys at a time,
 * so one horizontal sum serves four dot products. */
static void scores_avx2(const float *q, const float *keys, int64_t count, int64_t d, int64_t group, float scale,
                        float *scores, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= count; i += 4) {
        const float *k0 = keys + i * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        for (int64_t j = 0; j < group; j++) {
            const float *qj = q + j * d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < d; c += 8) {
                __m256 qv = _mm256_loadu_ps(qj + c);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + c), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + c), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + c), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + c), a3);
            }
            _mm_storeu_ps(scores + j * n + i, _mm_mul_ps(sum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
        }
    }
    for (; i < count; i++)
        for (int64_t j = 0; j < group; j++) scores[j * n + i] = dot(q + j * d, keys + i * d, d) * scale;
}

/* out_j[c:c+64] += sum over `count` values at `vals` of p_j[i] * value i, the 64 sums held in registers. */
static void values_avx2(const float *p, const float *vals, int64_t count, int64_t d, float *out) {
    for (int64_t c = 0; c < d; c += 64) {
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_loadu_ps(out + c + 8 * r);
        for (int64_t i = 0; i < count; i++) {
            __m256 w = _mm256_broadcast_ss(p + i);
            const float *vi = vals + i * d + c;
            for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vi + 8 * r), a[r]);
        }
        for (int r = 0; r < 8; r++) _mm256_storeu_ps(out + c + 8 * r, a[r]);
    }
}
#else
#define HAVE_AVX2 0
#endif

/* Ask for the next block's rows while this one is computed: blocks lie at random places in the cache, a page or
 * so each, and the hardware prefetcher does not follow a jump to another page. */
static void prefetch_block(const float *base, const int64_t *table, int64_t blk, int64_t last, int64_t block_size,
                           int64_t d) {
    if (blk > last) return;
    const char *row = (const char *)(base + table[blk] * block_size * d);
    for (int64_t off = 0; off < block_size * d * (int64_t)sizeof(float); off += 64) __builtin_prefetch(row + off);
}

/* One (sequence, KV head) task: `group` query rows attend over keys [start, ctx) of this sequence. */
static void attend(const float *q, const float *k, const float *v, const int64_t *table, int64_t start,
                   int64_t ctx, int64_t group, int64_t d, int64_t block_size, float scale, float *scores,
                   float *out) {
    int64_t n = ctx - start, last = (ctx - 1) / block_size;
    for (int64_t j = 0; j < group; j++) memset(out + j * d, 0, d * sizeof(float));
    for (int64_t blk = start / block_size; blk * block_size < ctx; blk++) {
        int64_t first = blk * block_size, t0 = first > start ? first : start;
        int64_t t1 = first + block_size < ctx ? first + block_size : ctx;
        const float *kb = k + (table[blk] * block_size - first) * d;  /* key t of this block at kb + t * d */
        prefetch_block(k, table, blk + 1, last, block_size, d);
#if HAVE_AVX2
        if (d % 8 == 0) {
            scores_avx2(q, kb + t0 * d, t1 - t0, d, group, scale, scores + t0 - start, n);
            continue;
        }
#endif
        for (int64_t t = t0; t < t1; t++)
            for (int64_t j = 0; j < group; j++) scores[j * n + t - start] = dot(q + j * d, kb + t * d, d) * scale;
    }
    for (int64_t j = 0; j < group; j++) {
        float *s = scores + j * n, top = -INFINITY;
        for (int64_t i = 0; i < n; i++) top = s[i] > top ? s[i] : top;  /* not fmaxf: a call, not vectorised */
        float inv = 1.0f / exp_shifted(s, n, top);
        for (int64_t i = 0; i < n; i++) s[i] *= inv;
    }
    for (int64_t blk = start / block_size; blk * block_size < ctx; blk++) {
        int64_t first = blk * block_size, t0 = first > start ? first : start;
        int64_t t1 = first + block_size < ctx ? first + block_size : ctx;
        const float *vb = v + (table[blk] * block_size - first) * d;
        prefetch_block(v, table, blk + 1, last, block_size, d);
#if HAVE_AVX2
        if (d % 64 == 0) {
            for (int64_t j = 0; j < group; j++)
                values_avx2(scores + j * n + t0 - start, vb + t0 * d, t1 - t0, d, out + j * d);
            continue;
        }
#endif
        for (int64_t t = t0; t < t1; t++)
            for (int64_t j = 0; j < group; j++) {
                float p = scores[j * n + t - start], *o = out + j * d;
                const float *vt = vb + t * d;
                for (int64_t i = 0; i < d; i++) o[i] += p * vt[i];
            }
    }
}

/* q, out: [B, heads, d]; k, v: one layer's cache, [kv_heads, slots, d] with `head_stride` = slots * d values
 * between heads; tables: [B, width] block ids; ctx_lens: [B]; window <= 0 means none. Returns 0; -1 if memory ran
 * out; -2, before reading any key, if a length is outside 1..width * block_size or a block it reaches is not in
 * the cache. */
int paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                     const int64_t *ctx_lens, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t d, int64_t width, int64_t block_size, int64_t head_stride, int64_t window,
                     float scale, int threads) {
    int64_t group = heads / kv_heads, longest = 0, num_blocks = head_stride / d / block_size;
    for (int64_t b = 0; b < batch; b++) {  /* the loops below trust these bounds: check them once, here */
        int64_t ctx = ctx_lens[b];
        if (ctx < 1 || ctx > width * block_size) return -2;
        for (int64_t blk = 0; blk <= (ctx - 1) / block_size; blk++)
            if (tables[b * width + blk] < 0 || tables[b * width + blk] >= num_blocks) return -2;
        longest = ctx > longest ? ctx : longest;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc((size_t)(group * longest) * sizeof(float));  /* one per thread, every task */
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)  /* first come first served: a preempted thread holds up one task */
        for (int64_t task = 0; task < batch * kv_heads; task++) {
            if (!scores) continue;
            int64_t b = task / kv_heads, h = task % kv_heads, ctx = ctx_lens[b];
            int64_t start = window > 0 && ctx > window ? ctx - window : 0;
            int64_t row = (b * heads + h * group) * d;
            attend(q + row, k + h * head_stride, v + h * head_stride, tables + b * width, start, ctx, group, d,
                   block_size, scale, scores, out + row);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
