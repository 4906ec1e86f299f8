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

/* exp(x) within 2 ulp for x in [-87, 88] (0 below, exp(88) above): x = n ln2 + r, |r| <= ln2 / 2,
 * exp(r) by Cephes' degree-6 polynomial, 2^n through the exponent bits. Written so that gcc
 * vectorises the loops calling it (the softmax, SiLU, the vocabulary's log-sum-exp): n is rounded
 * with the 1.5 * 2^23 trick rather than floorf, which kept those loops scalar. */
static inline float exp_f32(float x)
{
    const float x0 = x;
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return x0 < -87.0f ? 0.0f : p * two_n.f;
}

/* Sums of long rows: float partial sums of 256 terms (vectorised) accumulated in double, so the
 * rounding error does not grow with the row's length (a 150k vocabulary's log-sum-exp). */
#define SUM_CHUNK 256

static inline float sum_exp_shifted(const float *x, int64_t n, float shift, float *out) /* out may be x */
{
    double total = 0.0;
    for (int64_t c = 0; c < n; c += SUM_CHUNK) {
        const int64_t end = c + SUM_CHUNK < n ? c + SUM_CHUNK : n;
        float part = 0.0f;
        if (out) {
#pragma omp simd reduction(+ : part)
            for (int64_t i = c; i < end; ++i) {
                const float e = exp_f32(x[i] - shift);
                out[i] = e;
                part += e;
            }
        } else {
#pragma omp simd reduction(+ : part)
            for (int64_t i = c; i < end; ++i) part += exp_f32(x[i] - shift);
        }
        total += part;
    }
    return (float)total;
}

static inline float sum_squares(const float *restrict x, int64_t n)
{
    double total = 0.0;
    for (int64_t c = 0; c < n; c += SUM_CHUNK) {
        const int64_t end = c + SUM_CHUNK < n ? c + SUM_CHUNK : n;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t i = c; i < end; ++i) part += x[i] * x[i];
        total += part;
    }
    return (float)total;
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

/* Blocks ahead of the one being read whose cache lines are prefetched. */
#define PREFETCH_BLOCKS 2

/* Prefetch `rows` runs of `len` floats, row_stride floats apart: a block's keys of one kv head
 * (one run of hd * BS) or its values (BS runs of hd, nkv * hd apart). */
static inline void prefetch_rows(const float *p, int64_t len, int64_t rows, int64_t row_stride)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < len; i += 16) __builtin_prefetch(p + r * row_stride + i, 0, 3);
}

/* Per-thread scratch of an attention call: scores for the widest item, accumulators, the scaled
 * queries and the inverse softmax sums of one item's g query heads. */
typedef struct {
    float *scores; /* (g, width) for an item of width keys: room for g * max_width */
    float *acc;    /* (g, hd) */
    float *qs;     /* (g, hd) */
    float *inv;    /* (g,) */
} Scratch;

/* One (sequence, kv head) item: out rows of its g query heads from the scaled queries in w.qs;
 * width = the item's blocks * BS. */
static inline __attribute__((always_inline)) void attend_item(
    Scratch w, const float *restrict kc, const float *restrict vc, const int32_t *restrict table,
    int64_t start, int64_t len, int64_t h, int64_t g, int64_t nkv, int64_t hd, const int64_t BS,
    float *restrict out)
{
    const int64_t b0 = start / BS, b1 = (len + BS - 1) / BS, width = (b1 - b0) * BS;
    const int64_t lo = start - b0 * BS, hi = len - b0 * BS; /* live scores: [lo, hi) */
    float *restrict s = w.scores, *restrict acc = w.acc, *restrict inv = w.inv;
    const float *restrict qs = w.qs;

    /* The blocks lie anywhere in the cache: each next block is prefetched while one is scored (the
     * hardware prefetcher does not cross to it), which made this loop and the values' 1.3-1.6x faster. */
    for (int64_t b = b0; b < b1; ++b) {
        const float *keys = kc + ((int64_t)table[b] * nkv + h) * hd * BS;
        if (b + PREFETCH_BLOCKS < b1)
            prefetch_rows(kc + ((int64_t)table[b + PREFETCH_BLOCKS] * nkv + h) * hd * BS, hd * BS, 1, 0);
        else if (b + PREFETCH_BLOCKS - (b1 - b0) >= b0) /* the score pass ends: the first values next */
            prefetch_rows(vc + ((int64_t)table[b + PREFETCH_BLOCKS - (b1 - b0)] * BS * nkv + h) * hd, hd, BS, nkv * hd);
        block_scores(keys, qs, g, hd, BS, s + (b - b0) * BS, width);
    }

    for (int64_t j = 0; j < g; ++j) {
        float *restrict sj = s + j * width;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t t = lo; t < hi; ++t) m = sj[t] > m ? sj[t] : m;
        inv[j] = 1.0f / sum_exp_shifted(sj + lo, hi - lo, m, sj + lo);
    }

    for (int64_t i = 0; i < g * hd; ++i) acc[i] = 0.0f;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b == b0 ? lo - (b - b0) * BS : 0;
        const int64_t t1 = hi - (b - b0) * BS < BS ? hi - (b - b0) * BS : BS;
        const float *restrict block = vc + (int64_t)table[b] * BS * nkv * hd + h * hd;
        if (b + PREFETCH_BLOCKS < b1)
            prefetch_rows(vc + ((int64_t)table[b + PREFETCH_BLOCKS] * BS * nkv + h) * hd, hd, BS, nkv * hd);
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
        for (int64_t d = 0; d < hd; ++d) out[j * hd + d] = acc[j * hd + d] * inv[j];
}

/* RoPE of one head as Attention.forward applies it: x * cos + rotate_half(x) * sin, with the tables
 * cos = [c, c] and sin = [-s, s] of one position (rotate_half(x) * sin = roll(x, hd / 2) * sin). */
static inline void rope_head(const float *restrict x, const float *restrict cos, const float *restrict sin,
                             int64_t hd, float scale, float *restrict out)
{
    const int64_t half = hd / 2;
    for (int64_t d = 0; d < half; ++d) out[d] = (x[d] * cos[d] + x[d + half] * sin[d]) * scale;
    for (int64_t d = half; d < hd; ++d) out[d] = (x[d] * cos[d] + x[d - half] * sin[d]) * scale;
}

/* A thread's scratch of `bytes` (64-byte aligned); NULL, with *failed set, when memory runs out. */
static void *thread_scratch(size_t bytes, int *failed)
{
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return p;
}

/* Indices checked before anything is read or written; returns the widest item's key span. */
static int check_indices(const int32_t *tables, int64_t table_stride, const int32_t *lens, int64_t window,
                         int64_t batch, int64_t bs, int64_t num_blocks, int64_t rope_rows,
                         int64_t *max_width, int64_t *bad_row)
{
    *max_width = 0;
    for (int64_t b = 0; b < batch; ++b) {
        const int64_t len = lens[b];
        if (len < 1 || len > table_stride * bs || len > rope_rows) { *bad_row = b; return HFRL_BAD_LENGTH; }
        const int64_t start = window > 0 && len > window ? len - window : 0;
        const int64_t b0 = start / bs, b1 = (len + bs - 1) / bs;
        for (int64_t k = b0; k < b1; ++k) {
            const int32_t block = tables[b * table_stride + k];
            if (block < 0 || block >= num_blocks) { *bad_row = b; return HFRL_BAD_BLOCK; }
        }
        if ((b1 - b0) * bs > *max_width) *max_width = (b1 - b0) * bs;
    }
    return HFRL_OK;
}

/* The shared body of the two entry points. qkv mode (cos != NULL): q rows hold the fused projection
 * [q heads | k heads | v heads] of the new tokens, unrotated; the item (b, h) rotates and stores its
 * kv head's new key and value at position lens[b] - 1 before attending. Otherwise q holds rotated
 * queries and the cache already holds the new token. */
static int decode_attention(
    const float *q, int64_t q_row_stride, int64_t q_head_stride, const float *cos, const float *sin,
    int64_t rope_rows, float *kc, float *vc, int64_t num_blocks, const int32_t *tables, int64_t table_stride,
    const int32_t *lens, int64_t window, int64_t batch, int64_t nh, int64_t nkv, int64_t hd, int64_t bs,
    float scale, float *out, int num_threads, int64_t *bad_row)
{
    const int64_t g = nh / nkv;
    int64_t max_width;
    const int code = check_indices(tables, table_stride, lens, window, batch, bs, num_blocks,
                                   cos ? rope_rows : INT64_MAX, &max_width, bad_row);
    if (code != HFRL_OK) return code;
    const int64_t items = batch * nkv;
    const size_t scratch_floats = (size_t)(g * max_width + 2 * g * hd + g);
    int failed = 0;
#pragma omp parallel num_threads(items < num_threads ? (int)items : num_threads) if (items > 1)
    {
        float *scratch = (float *)thread_scratch(scratch_floats * sizeof(float), &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            if (scratch == NULL) continue;
            const int64_t b = it / nkv, h = it % nkv, len = lens[b];
            const int64_t start = window > 0 && len > window ? len - window : 0;
            const int32_t *table = tables + b * table_stride;
            const float *qb = q + b * q_row_stride + h * g * q_head_stride;
            const Scratch w = {scratch, scratch + g * max_width, scratch + g * max_width + g * hd,
                               scratch + g * max_width + 2 * g * hd};
            float *qs = w.qs;
            if (cos) {
                const int64_t pos = len - 1, block = table[pos / bs], offset = pos % bs;
                const float *c = cos + pos * hd, *sn = sin + pos * hd;
                const float *k = q + b * q_row_stride + (nh + h) * hd, *v = k + nkv * hd;
                float *kdst = kc + (block * nkv + h) * hd * bs + offset;
                rope_head(k, c, sn, hd, 1.0f, qs); /* the rotated key, through qs */
                for (int64_t d = 0; d < hd; ++d) kdst[d * bs] = qs[d];
                memcpy(vc + ((block * bs + offset) * nkv + h) * hd, v, (size_t)hd * sizeof(float));
                for (int64_t j = 0; j < g; ++j) rope_head(qb + j * hd, c, sn, hd, scale, qs + j * hd);
            } else {
                for (int64_t j = 0; j < g; ++j)
                    for (int64_t d = 0; d < hd; ++d) qs[j * hd + d] = qb[j * q_head_stride + d] * scale;
            }
            float *ob = out + (b * nh + h * g) * hd;
            if (bs == 16)
                attend_item(w, kc, vc, table, start, len, h, g, nkv, hd, 16, ob);
            else if (bs == 32)
                attend_item(w, kc, vc, table, start, len, h, g, nkv, hd, 32, ob);
            else
                attend_item(w, kc, vc, table, start, len, h, g, nkv, hd, bs, ob);
        }
        free(scratch);
    }
    return failed ? HFRL_NO_MEMORY : HFRL_OK;
}

/* Attention of one query token per sequence, its key and value already in the cache.
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
    return decode_attention(q, q_row_stride, q_head_stride, NULL, NULL, 0, (float *)kc, (float *)vc, num_blocks,
                            tables, table_stride, lens, window, batch, nh, nkv, hd, bs, scale, out,
                            num_threads, bad_row);
}

/* A decode step's attention from the fused projection: qkv (batch, (nh + 2 nkv) hd) rows at
 * qkv_row_stride floats, unrotated; cos, sin (rope_rows, hd) tables as in rope_head, row = position.
 * Rotates q and k, stores k and v at position lens[b] - 1, attends; out (batch, nh, hd). */
int hfrl_decode_attention_qkv_f32(
    const float *qkv, int64_t qkv_row_stride, const float *cos, const float *sin, int64_t rope_rows,
    float *kc, float *vc, int64_t num_blocks, const int32_t *tables, int64_t table_stride, const int32_t *lens,
    int64_t window, int64_t batch, int64_t nh, int64_t nkv, int64_t hd, int64_t bs, float scale, float *out,
    int num_threads, int64_t *bad_row)
{
    return decode_attention(qkv, qkv_row_stride, hd, cos, sin, rope_rows, kc, vc, num_blocks, tables,
                            table_stride, lens, window, batch, nh, nkv, hd, bs, scale, out, num_threads, bad_row);
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

/* out = weight * (x * rsqrt(mean(x^2) + eps)) per row (RMSNorm): x (rows, n) at x_row_stride,
 * out (rows, n) contiguous. */
void hfrl_rms_norm_f32(const float *x, int64_t x_row_stride, int64_t rows, int64_t n, const float *weight,
                       float eps, float *out, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) if (rows * n >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_row_stride;
        float *o = out + r * n;
        const float inv = 1.0f / sqrtf(sum_squares(xr, n) / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = weight[i] * (xr[i] * inv);
    }
}

/* SwiGLU's product: out (rows, inner) = silu(gate) * up for gate_up rows [gate | up] at
 * row_stride floats. */
void hfrl_silu_mul_f32(const float *gate_up, int64_t row_stride, int64_t rows, int64_t inner, float *out,
                       int num_threads)
{
#pragma omp parallel for num_threads(num_threads) if (rows * inner >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gate_up + r * row_stride, *u = g + inner;
        float *o = out + r * inner;
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}

/* The maximum of a row of n, with the 256-entry chunk where it first appears, or -1 and the chunk of
 * the row's first NaN in *nan_chunk (else -1 there): vectorised chunk by chunk. */
static inline float row_max(const float *x, int64_t n, int64_t *max_chunk, int64_t *nan_chunk)
{
    float m = -INFINITY;
    *max_chunk = 0;
    *nan_chunk = -1;
    for (int64_t c = 0; c < n; c += SUM_CHUNK) {
        const int64_t end = c + SUM_CHUNK < n ? c + SUM_CHUNK : n;
        float cm = -INFINITY;
        int nan = 0;
#pragma omp simd reduction(max : cm) reduction(| : nan)
        for (int64_t i = c; i < end; ++i) {
            cm = x[i] > cm ? x[i] : cm;
            nan |= x[i] != x[i];
        }
        if (nan) { *nan_chunk = c; break; }
        if (cm > m) { m = cm; *max_chunk = c; }
    }
    return m;
}

/* The first index from `from` holding a NaN (nan != 0) or the value m (a row's NaN or maximum is known
 * to be there). */
static inline int64_t first_at(const float *x, int64_t from, float m, int nan)
{
    int64_t i = from;
    while (nan ? x[i] == x[i] : x[i] != m) ++i;
    return i;
}

/* Greedy decoding's token and log-prob per row of logits (rows, vocab) at row_stride: the first
 * maximum, and its log-softmax value -log(sum exp(x - max)). */
void hfrl_greedy_f32(const float *logits, int64_t row_stride, int64_t rows, int64_t vocab, int64_t *tokens,
                     float *log_probs, int num_threads)
{
#pragma omp parallel for num_threads(rows < num_threads ? (int)rows : num_threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = logits + r * row_stride;
        /* the maximum chunk by chunk, then the first chunk holding it is searched; a NaN counts as
         * the maximum, as in torch.argmax (its log-prob is NaN); a row of -inf only gives its first id */
        int64_t at, nan_at;
        const float m = row_max(x, vocab, &at, &nan_at);
        if (nan_at >= 0) {
            tokens[r] = first_at(x, nan_at, m, 1);
            log_probs[r] = NAN;
            continue;
        }
        const int64_t first = first_at(x, at, m, 0);
        tokens[r] = first;
        log_probs[r] = -logf(sum_exp_shifted(x, vocab, m, NULL));
    }
}

/* Sampling at a temperature without top-k/top-p filtering, by inverse CDF over the vocabulary in id
 * order: row r draws the first token whose cumulative probability exceeds uniforms[r] (in [0, 1))
 * and returns its log-softmax value at that temperature. The scaled row is x / T (as torch's
 * logits / temperature); the sum of exponentials is kept per 256-entry chunk (in double), so the
 * draw walks the chunk sums and then one chunk. A row holding a NaN gets its first NaN's id and a
 * NaN log-prob, as the greedy kernel does. */
int hfrl_sample_f32(const float *logits, int64_t row_stride, int64_t rows, int64_t vocab,
                    const float *temperature, const double *uniforms, int64_t *tokens, float *log_probs,
                    int num_threads)
{
    const int64_t chunks = (vocab + SUM_CHUNK - 1) / SUM_CHUNK;
    int failed = 0;
#pragma omp parallel num_threads(rows < num_threads ? (int)rows : num_threads) if (rows > 1)
    {
        double *sums = (double *)thread_scratch((size_t)chunks * sizeof(double), &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; ++r) {
            if (sums == NULL) continue;
            const float *x = logits + r * row_stride;
            const float t = temperature[r] < 1e30f ? temperature[r] : 1e30f;
            int64_t at, nan_at;
            const float mx = row_max(x, vocab, &at, &nan_at);
            if (nan_at >= 0 || !isfinite(mx)) { /* a NaN, +inf, or -inf everywhere: no distribution */
                tokens[r] = nan_at >= 0 ? first_at(x, nan_at, mx, 1) : first_at(x, at, mx, 0);
                log_probs[r] = NAN;
                continue;
            }
            const float m = mx / t; /* division is monotonic: the maximum of x / t */
            double total = 0.0;
            for (int64_t c = 0, k = 0; c < vocab; c += SUM_CHUNK, ++k) {
                const int64_t end = c + SUM_CHUNK < vocab ? c + SUM_CHUNK : vocab;
                float part = 0.0f;
#pragma omp simd reduction(+ : part)
                for (int64_t i = c; i < end; ++i) part += exp_f32(x[i] / t - m);
                sums[k] = part;
                total += part;
            }
            const double target = uniforms[r] * total;
            double below = 0.0;
            int64_t k = 0;
            while (k < chunks - 1 && below + sums[k] <= target) below += sums[k++];
            const int64_t c = k * SUM_CHUNK, end = c + SUM_CHUNK < vocab ? c + SUM_CHUNK : vocab;
            int64_t token = -1, last = -1;
            for (int64_t i = c; i < end; ++i) {
                const float e = exp_f32(x[i] / t - m);
                if (e > 0.0f) last = i;
                below += e;
                if (below > target && e > 0.0f) { token = i; break; }
            }
            if (token < 0) { /* rounding left the target past this chunk's last token */
                token = last;
                for (int64_t j = c - 1; token < 0 && j >= 0; --j)
                    if (exp_f32(x[j] / t - m) > 0.0f) token = j;
                if (token < 0) /* cannot happen with a finite maximum (its term is 1); kept in range */
                    token = first_at(x, at, mx, 0);
            }
            tokens[r] = token;
            log_probs[r] = (x[token] / t - m) - logf((float)total);
        }
        free(sums);
    }
    return failed ? HFRL_NO_MEMORY : HFRL_OK;
}
