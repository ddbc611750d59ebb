/* The small per-layer ops of a float32 decode step, each one C call.
 *
 * Why: at batch 1 a SmolLM2 layer's norms, rope, KV store, attention and SwiGLU are a few
 * thousand flops each, and the torch calls around them cost 5-60 us each of dispatch and
 * allocation on a 2-core VM (BENCHMARKS.md, "Where a quantized decode step goes"): together about
 * as much as the layer's matmuls. Here each op is one ctypes call (~4 us) doing the arithmetic.
 *
 * Every function takes float32 rows with a row stride (the views a fused QKV or gate/up output
 * hands out) and writes contiguous outputs. Loops are plain C the compiler vectorizes; sums that
 * may be reordered say so with `omp simd reduction`.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rq_kernels.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* a . b over n floats. Spelled out: an `omp simd` reduction compiled to a vector loop and then a
 * scalar sum through the stack, per dot, which made attention's scores its slowest part. */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* e^x in float32 that the compiler vectorizes (libm's expf is a call per value: SwiGLU's 1,536
 * of them cost more than the rest of the op). x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in
 * two parts so k ln2 is exact enough), e^r by its Taylor series to r^6 (relative error below
 * 2e-7, about float32's rounding), 2^k built in the exponent bits. x is clamped to [-87, 88],
 * where e^x stays a normal float32: below, the true value is under 1.7e-38 anyway. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* NaN passes through */
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* sum = x + residual (one float32 rounding, as torch's add); norm = sum * rsqrt(mean(sum^2) +
 * eps) * weight, the HF LlamaRMSNorm order in float32. */
void rq_add_rmsnorm(const float *x, int64_t ldx, const float *residual, int64_t ldr,
                    const float *weight, float eps, int64_t T, int64_t H, float *norm,
                    float *sum) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * ldx, *rr = residual + t * ldr;
        float *s = sum + t * H, *n = norm + t * H;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < H; i++) {
            const float v = xr[i] + rr[i];
            s[i] = v;
            squares += v * v;
        }
        const float inv = 1.0f / sqrtf(squares / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) n[i] = s[i] * inv * weight[i];
    }
}

/* out [T, I] = silu(x[:, :I]) * x[:, I:], silu(g) = g / (1 + exp(-g)). */
void rq_silu_mul(const float *x, int64_t ldx, int64_t T, int64_t I, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * ldx, *u = g + I;
        float *o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
    }
}

/* Rotate-half rope of one head in place of out: x [D] at angle row cs = [cos(D/2) | sin(D/2)]. */
static inline void rotate(const float *x, const float *cs, int64_t D, float *out) {
    const int64_t half = D / 2;
    const float *c = cs, *s = cs + half;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * c[i] - x[i + half] * s[i];
        out[i + half] = x[i + half] * c[i] + x[i] * s[i];
    }
}

/* q_out [T, Hq, D] = rope(q); the cache slot of token t gets rope(k)[t] and v[t] (slot < 0: a
 * padding token, nothing stored). q, k, v: rows with strides ldq, ldk, ldv, heads D apart. The
 * caches are [slots, Hkv, D], contiguous. */
void rq_rope_kv_store(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v,
                      int64_t ldv, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                      const int64_t *positions, const float *cos_sin, float *k_cache,
                      float *v_cache, const int64_t *slots, float *q_out) {
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_sin + positions[t] * D;
        for (int64_t h = 0; h < Hq; h++) rotate(q + t * ldq + h * D, cs, D, q_out + (t * Hq + h) * D);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        float *kc = k_cache + slot * Hkv * D, *vc = v_cache + slot * Hkv * D;
        for (int64_t h = 0; h < Hkv; h++) {
            rotate(k + t * ldk + h * D, cs, D, kc + h * D);
            const float *vr = v + t * ldv + h * D;
            for (int64_t i = 0; i < D; i++) vc[h * D + i] = vr[i];
        }
    }
}

int64_t rq_attention_scratch(int64_t group, int64_t D, int64_t max_ctx) {
    return group * max_ctx + group * D;
}

/* Decode attention of one (sequence b, KV head) pair = pair / Hkv, pair % Hkv, for the query heads
 * g0..g1-1 of the group sharing that KV head: they read its keys and values once, score into a
 * scratch row each (stride max_ctx), then a float32 softmax (max subtracted) and the weighted sum
 * of values. Each head's arithmetic is the same whichever range it comes in. */
void rq_attention_heads(int64_t pair, int64_t g0, int64_t g1, const float *q, int64_t ldq,
                        int64_t Hq, int64_t Hkv, int64_t D, const float *k_cache,
                        const float *v_cache, int64_t block_size, const int32_t *block_tables,
                        int64_t width, const int32_t *seq_lens, float scale, float *scores,
                        int64_t max_ctx, float *out) {
    const int64_t group = Hq / Hkv;
    const int64_t b = pair / Hkv, kvh = pair % Hkv, ctx = seq_lens[b];
    const int32_t *table = block_tables + b * width;
    const float *qb = q + b * ldq + kvh * group * D;
    float *acc = scores + group * max_ctx; /* [group, D] */
    /* Positions block by block (no division per position: an idiv costs ~40 cycles). */
    for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
        const int64_t first = (int64_t)table[t0 / block_size] * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const float *kr = k_cache + ((first + j) * Hkv + kvh) * D;
            for (int64_t g = g0; g < g1; g++)
                scores[g * max_ctx + t0 + j] = dot_f32(qb + g * D, kr, D) * scale;
        }
    }
    for (int64_t g = g0; g < g1; g++) {
        float *s = scores + g * max_ctx, top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < ctx; t++) top = s[t] > top ? s[t] : top;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < ctx; t++) {
            s[t] = fast_expf(s[t] - top);
            total += s[t];
        }
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < ctx; t++) s[t] *= inv;
        for (int64_t i = 0; i < D; i++) acc[g * D + i] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
        const int64_t first = (int64_t)table[t0 / block_size] * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const float *vr = v_cache + ((first + j) * Hkv + kvh) * D;
            for (int64_t g = g0; g < g1; g++) {
                const float p = scores[g * max_ctx + t0 + j];
                float *a = acc + g * D;
#pragma omp simd
                for (int64_t i = 0; i < D; i++) a[i] += p * vr[i];
            }
        }
    }
    for (int64_t g = g0; g < g1; g++) {
        float *o = out + (b * Hq + kvh * group + g) * D;
        for (int64_t i = 0; i < D; i++) o[i] = acc[g * D + i];
    }
}

void rq_attention_pair(int64_t pair, const float *q, int64_t ldq, int64_t Hq, int64_t Hkv,
                       int64_t D, const float *k_cache, const float *v_cache, int64_t block_size,
                       const int32_t *block_tables, int64_t width, const int32_t *seq_lens,
                       float scale, float *scores, int64_t max_ctx, float *out) {
    rq_attention_heads(pair, 0, Hq / Hkv, q, ldq, Hq, Hkv, D, k_cache, v_cache, block_size,
                       block_tables, width, seq_lens, scale, scores, max_ctx, out);
}

/* Decode attention over the paged cache: q [B, Hq, D] (rows ldq apart, heads D apart), one query
 * per sequence at position seq_lens[b] - 1, every earlier position visible. Caches [blocks,
 * block_size, Hkv, D] contiguous; block_tables [B, width] int32; out [B, Hq, D]. GQA: each
 * (sequence, KV head) pair is one rq_attention_pair; pairs run in parallel when the step is big
 * enough to pay for a parallel region. Returns 0, or -1 when scratch memory cannot be had. */
int rq_attention_decode(const float *q, int64_t ldq, int64_t B, int64_t Hq, int64_t Hkv,
                        int64_t D, const float *k_cache, const float *v_cache,
                        int64_t block_size, const int32_t *block_tables, int64_t width,
                        const int32_t *seq_lens, float scale, float *out) {
    int64_t max_ctx = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        max_ctx = seq_lens[b] > max_ctx ? seq_lens[b] : max_ctx;
        work += seq_lens[b];
    }
    int failed = 0;
    const int parallel = work * Hq * D >= 256 * 1024;
    const size_t floats = (size_t)rq_attention_scratch(Hq / Hkv, D, max_ctx);
#pragma omp parallel if (parallel) reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * floats);
        if (scores == NULL) failed = 1;
#pragma omp for schedule(dynamic)
        for (int64_t pair = 0; pair < B * Hkv; pair++) {
            if (scores == NULL) continue;
            rq_attention_pair(pair, q, ldq, Hq, Hkv, D, k_cache, v_cache, block_size,
                              block_tables, width, seq_lens, scale, scores, max_ctx, out);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
