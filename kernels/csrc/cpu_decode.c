/* hfrl's CPU decode kernels, fp32: paged decode attention over a dim-major key cache, and the
 * write of a decode step's new keys and values into the cache.
 *
 * Compiled on first use by hfrl_kernels.native with the host's C compiler (-O3 -march=native
 * -fopenmp) and called through ctypes; see native.py for the layouts and the Python side.
 *
 * Layouts (one layer): keys stored (num_blocks, num_kv_heads, head_dim, block_size), each block's
 * keys dimension by dimension; values (num_blocks, block_size, num_kv_heads, head_dim). Token p of
 * a sequence lives in block table[p / block_size] at offset p % block_size.
 *
 * Attention: one work item per (sequence, kv head), spread over OpenMP threads. An item reads its
 * kv head's keys once for all the query heads of its group: for a block, each of head_dim rows of
 * block_size keys is one FMA into the block's scores per query head. The softmax runs over the
 * sequence's [start, seq_len) scores (exp by a polynomial the compiler vectorises), then the values
 * are read once, token by token, each scaled into every query head's accumulator.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HFRL_OK 0
#define HFRL_BAD_LENGTH 1
#define HFRL_BAD_BLOCK 2
#define HFRL_NO_MEMORY 3

/* exp(x) for x <= 0 (a softmax's shifted scores), within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2,
 * exp(r) by Cephes' degree-6 polynomial, 2^n through the exponent bits. Below -87 it returns 0. */
static inline float exp_nonpositive(float x)
{
    const float lo = -87.0f;
    const int under = x < lo;
    x = under ? lo : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return under ? 0.0f : p * two_n;
}

/* s[j * stride + t] = sum_d q[j * hd + d] * keys[d * BS + t], t < BS, for the g query heads of one
 * kv head: four partial sums per score break the FMA dependency chain. */
static inline __attribute__((always_inline)) void block_scores(
    const float *restrict keys, const float *restrict q, int64_t g, int64_t hd, const int64_t BS,
    float *restrict s, int64_t stride)
{
    for (int64_t j = 0; j < g; ++j) {
        const float *restrict qj = q + j * hd;
        float a0[BS], a1[BS], a2[BS], a3[BS];
        for (int64_t t = 0; t < BS; ++t) a0[t] = a1[t] = a2[t] = a3[t] = 0.0f;
        int64_t d = 0;
        for (; d + 4 <= hd; d += 4) {
            const float *restrict k0 = keys + d * BS;
            const float q0 = qj[d], q1 = qj[d + 1], q2 = qj[d + 2], q3 = qj[d + 3];
            for (int64_t t = 0; t < BS; ++t) {
                a0[t] += q0 * k0[t];
                a1[t] += q1 * k0[BS + t];
                a2[t] += q2 * k0[2 * BS + t];
                a3[t] += q3 * k0[3 * BS + t];
            }
        }
        for (; d < hd; ++d)
            for (int64_t t = 0; t < BS; ++t) a0[t] += qj[d] * keys[d * BS + t];
        float *restrict sj = s + j * stride;
        for (int64_t t = 0; t < BS; ++t) sj[t] = (a0[t] + a1[t]) + (a2[t] + a3[t]);
    }
}

/* One (sequence, kv head) item: out rows of its g query heads. scratch holds g * width scores and
 * g * hd accumulators, width = the item's blocks * BS. */
static inline __attribute__((always_inline)) void attend_item(
    const float *restrict q, const float *restrict kc, const float *restrict vc,
    const int32_t *restrict table, int64_t start, int64_t len, int64_t h, int64_t g, int64_t nkv,
    int64_t hd, const int64_t BS, float scale, float *restrict out, int64_t out_head_stride,
    float *restrict scratch)
{
    const int64_t b0 = start / BS, b1 = (len + BS - 1) / BS, width = (b1 - b0) * BS;
    const int64_t lo = start - b0 * BS, hi = len - b0 * BS; /* live scores: [lo, hi) */
    float *restrict s = scratch;              /* (g, width) */
    float *restrict acc = scratch + g * width; /* (g, hd) */
    float *restrict qs = acc + g * hd;          /* (g, hd): the scaled queries */
    for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < hd; ++d) qs[j * hd + d] = q[j * hd + d] * scale;

    for (int64_t b = b0; b < b1; ++b) {
        const float *keys = kc + ((int64_t)table[b] * nkv + h) * hd * BS;
        block_scores(keys, qs, g, hd, BS, s + (b - b0) * BS, width);
    }

    float inv[64];
    for (int64_t j = 0; j < g; ++j) {
        float *restrict sj = s + j * width;
        float m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
        for (int64_t t = lo; t < hi; ++t) m = sj[t] > m ? sj[t] : m;
#pragma omp simd
        for (int64_t t = lo; t < hi; ++t) sj[t] = exp_nonpositive(sj[t] - m);
#pragma omp simd reduction(+ : sum)
        for (int64_t t = lo; t < hi; ++t) sum += sj[t];
        inv[j] = 1.0f / sum;
    }

    for (int64_t i = 0; i < g * hd; ++i) acc[i] = 0.0f;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b == b0 ? lo - (b - b0) * BS : 0;
        const int64_t t1 = hi - (b - b0) * BS < BS ? hi - (b - b0) * BS : BS;
        const float *restrict block = vc + (int64_t)table[b] * BS * nkv * hd + h * hd;
        for (int64_t t = t0; t < t1; ++t) {
            const float *restrict v = block + t * nkv * hd;
            for (int64_t j = 0; j < g; ++j) {
                const float w = s[j * width + (b - b0) * BS + t];
                float *restrict aj = acc + j * hd;
                for (int64_t d = 0; d < hd; ++d) aj[d] += w * v[d];
            }
        }
    }
    for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < hd; ++d) out[j * out_head_stride + d] = acc[j * hd + d] * inv[j];
}

/* Attention of one query token per sequence.
 *
 * q: (batch, nh, hd) at q_row_stride / q_head_stride floats (hd contiguous); kc, vc: the layer's
 * caches as above, num_blocks blocks; tables: (batch, table_stride) int32; lens: (batch,) int32;
 * window: the sliding window, 0 for none; out: (batch, nh, hd) contiguous.
 * Returns HFRL_OK, or an error code with *bad_row the first offending sequence (nothing written). */
int hfrl_decode_attention_f32(
    const float *q, int64_t q_row_stride, int64_t q_head_stride, const float *kc, const float *vc,
    int64_t num_blocks, const int32_t *tables, int64_t table_stride, const int32_t *lens, int64_t window,
    int64_t batch, int64_t nh, int64_t nkv, int64_t hd, int64_t bs, float scale, float *out,
    int num_threads, int64_t *bad_row)
{
    const int64_t g = nh / nkv;
    int64_t max_width = 0;
    for (int64_t b = 0; b < batch; ++b) { /* every index checked before anything is read */
        const int64_t len = lens[b];
        if (len < 1 || len > table_stride * bs) { *bad_row = b; return HFRL_BAD_LENGTH; }
        const int64_t start = window > 0 && len > window ? len - window : 0;
        const int64_t b0 = start / bs, b1 = (len + bs - 1) / bs;
        for (int64_t k = b0; k < b1; ++k) {
            const int32_t block = tables[b * table_stride + k];
            if (block < 0 || block >= num_blocks) { *bad_row = b; return HFRL_BAD_BLOCK; }
        }
        if ((b1 - b0) * bs > max_width) max_width = (b1 - b0) * bs;
    }
    const int64_t items = batch * nkv;
    const size_t scratch_floats = (size_t)(g * max_width + 2 * g * hd);
    int failed = 0;
#pragma omp parallel num_threads(items < num_threads ? (int)items : num_threads) if (items > 1)
    {
        float *scratch = (float *)aligned_alloc(64, ((scratch_floats * sizeof(float) + 63) / 64) * 64);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            if (scratch == NULL) continue;
            const int64_t b = it / nkv, h = it % nkv, len = lens[b];
            const int64_t start = window > 0 && len > window ? len - window : 0;
            const float *qb = q + b * q_row_stride + h * g * q_head_stride;
            float *ob = out + (b * nh + h * g) * hd;
            const int32_t *table = tables + b * table_stride;
            /* q's heads are hd apart in every caller (checked in native.py) */
            if (bs == 16)
                attend_item(qb, kc, vc, table, start, len, h, g, nkv, hd, 16, scale, ob, hd, scratch);
            else if (bs == 32)
                attend_item(qb, kc, vc, table, start, len, h, g, nkv, hd, 32, scale, ob, hd, scratch);
            else
                attend_item(qb, kc, vc, table, start, len, h, g, nkv, hd, bs, scale, ob, hd, scratch);
        }
        free(scratch);
    }
    return failed ? HFRL_NO_MEMORY : HFRL_OK;
}

/* Store n tokens' keys and values: k, v (n, nkv, hd) at k_row_stride / v_row_stride floats (heads
 * hd apart), slots (n,) int64 flat slots block * bs + offset. Returns HFRL_BAD_BLOCK (nothing
 * written) when a slot lies outside the cache. */
int hfrl_write_kv_f32(const float *k, int64_t k_row_stride, const float *v, int64_t v_row_stride,
                      float *kc, float *vc, int64_t num_blocks, const int64_t *slots, int64_t n,
                      int64_t nkv, int64_t hd, int64_t bs, int64_t *bad_row)
{
    for (int64_t i = 0; i < n; ++i)
        if (slots[i] < 0 || slots[i] >= num_blocks * bs) { *bad_row = i; return HFRL_BAD_BLOCK; }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t block = slots[i] / bs, offset = slots[i] % bs;
        for (int64_t h = 0; h < nkv; ++h) {
            const float *ki = k + i * k_row_stride + h * hd;
            float *dst = kc + (block * nkv + h) * hd * bs + offset;
            for (int64_t d = 0; d < hd; ++d) dst[d * bs] = ki[d];
            memcpy(vc + (slots[i] * nkv + h) * hd, v + i * v_row_stride + h * hd, (size_t)hd * sizeof(float));
        }
    }
    return HFRL_OK;
}
