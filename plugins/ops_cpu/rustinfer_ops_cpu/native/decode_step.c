/* Every layer of a decode step in one call: norms, the quantized matmuls, rope and the KV store,
 * paged attention and SwiGLU, for T sequences of one new token each.
 *
 * Why: one token of SmolLM2 through the ops one by one is ~270 ctypes calls from Python (30
 * layers of norm, four matmuls, rope, attention, SwiGLU) and ~120 OpenMP parallel regions, whose
 * dispatch (~15-25 us a call) cost as much as the arithmetic on two cores. Here the threads enter
 * one parallel region for the whole step: the matmuls split their tiles with `omp for`, the
 * small ops run on one thread (`omp single`), and each stage ends at the region's barrier.
 *
 * The pieces are the ones the single ops call (rq_kernels.h), in the same order on the same
 * data, so the step's result equals the op-by-op path's bit for bit (a test holds it to that).
 */
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>

#include "rq_kernels.h"

#define BLOCK 32

/* One layer's tensors: float32 norm weights and four packed matrices. */
typedef struct {
    const float *input_norm, *post_attn_norm;
    rq_matrix qkv, o, gate_up, down;
} rq_layer;

#if defined(__AVX512F__)
#include <immintrin.h>
/* out [M, N] (row stride ldo) = x [M, K] @ W^T + bias for a float32 W held column-major, as the
 * CPU's prepare_linear_weight stores it (wt [K, N]: wt[k * N + n] = W[n, k]; N % 16 == 0). Each
 * thread of the region takes a contiguous range of columns and streams the K rows of its range,
 * four at a time, into its outputs (in L1), so the weight is read once, in long runs. */
static void f32_matmul(const float *wt, int64_t N, int64_t K, const float *x, int64_t M,
                       const float *bias, float *out, int64_t ldo) {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t vecs = N / 16, n0 = vecs * me / threads * 16, n1 = vecs * (me + 1) / threads * 16;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) out[m * ldo + n] = bias != NULL ? bias[n] : 0.0f;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const float *w0 = wt + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        for (int64_t n = n0; n < n1; n += 16) {
            const __m512 a = _mm512_loadu_ps(w0 + n), b = _mm512_loadu_ps(w1 + n),
                         c = _mm512_loadu_ps(w2 + n), d = _mm512_loadu_ps(w3 + n);
            for (int64_t m = 0; m < M; m++) {
                const float *xm = x + m * K + k;
                float *o = out + m * ldo + n;
                __m512 acc = _mm512_loadu_ps(o);
                acc = _mm512_fmadd_ps(a, _mm512_set1_ps(xm[0]), acc);
                acc = _mm512_fmadd_ps(b, _mm512_set1_ps(xm[1]), acc);
                acc = _mm512_fmadd_ps(c, _mm512_set1_ps(xm[2]), acc);
                acc = _mm512_fmadd_ps(d, _mm512_set1_ps(xm[3]), acc);
                _mm512_storeu_ps(o, acc);
            }
        }
    }
    for (; k < K; k++)
        for (int64_t n = n0; n < n1; n += 16)
            for (int64_t m = 0; m < M; m++) {
                float *o = out + m * ldo + n;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(wt + k * N + n),
                                                    _mm512_set1_ps(x[m * K + k]), _mm512_loadu_ps(o)));
            }
#pragma omp barrier
}
#define RQ_F32_STEP 1
#else
#define RQ_F32_STEP 0
#endif

int rq_step_serves_f32(void) { return RQ_F32_STEP; }

/* out [M, w->n_pad] = x @ W^T, split among the region's threads (an orphaned `omp for`, bound to
 * the caller's parallel region), with a barrier at the end. A quantized W reads x as
 * rq_quantize_rows left it in xq, sx, xsum; a float32 one (bits 32, column-major) reads x. */
static void matmul(const rq_matrix *w, int64_t K, const float *x, const int16_t *xq,
                   const float *sx, const float *xsum, int64_t M, float *out) {
    const int64_t n_tiles = w->n_pad / 4;
#if RQ_F32_STEP
    if (w->bits == 32) {
        f32_matmul((const float *)w->packed, w->n_pad, K, x, M, w->bias, out, w->n_pad);
        return;
    }
#else
    (void)x;
#endif
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; t++) rq_matrix_tile(w, t, K, xq, sx, xsum, M, out, w->n_pad);
}

/* x [M, K] rounded to int16 for w's next matmul; a float32 w reads x itself, so nothing. */
static void quantize_for(const rq_matrix *w, const float *x, int64_t M, int64_t K, int16_t *xq,
                         float *sx, float *xsum) {
    if (w->bits != 32) rq_quantize_rows(x, M, K, K, xq, sx, xsum);
}

/* The embedded tokens residual [T, H] through layers 0..L-1, x [T, H] being layer 0's normed input
 * (the model's own rmsnorm of them: the first norm stays the one every path shares). caches: 2L
 * pointers, layer l's K cache at 2l and V cache at 2l + 1, each [blocks, block_size, Hkv, D]. On
 * return mlp_out [T, H] is the last layer's MLP output and residual [T, H] the residual stream
 * before it (the model's final norm adds the two). Every matrix's n_pad is its true row count
 * (the caller checks). Returns 0, or -1 when scratch memory cannot be had. */
int rq_decode_layers(const rq_layer *layers, float *const *caches, int64_t L, int64_t T,
                     int64_t H, int64_t Hq, int64_t Hkv, int64_t D, int64_t I, float eps,
                     float scale, const float *cos_sin, const int64_t *positions,
                     const int64_t *slots, int64_t block_size, const int32_t *block_tables,
                     int64_t width, const int32_t *seq_lens, const float *x, float *residual,
                     float *mlp_out) {
    const int64_t nq = Hq * D, nqkv = (Hq + 2 * Hkv) * D;
    const int64_t k_max = H > nq ? (H > I ? H : I) : (nq > I ? nq : I);
    int64_t max_ctx = 0;
    for (int64_t b = 0; b < T; b++) max_ctx = seq_lens[b] > max_ctx ? seq_lens[b] : max_ctx;
    /* Activations between stages: the norm's output, q k v, rotated q, attention's output,
     * o's output, gate|up, SwiGLU's output; and x rounded to int16 for the next matmul. */
    const size_t floats = (size_t)(T * (H + nqkv + nq + nq + H + 2 * I + I) + 2 * T * (k_max / BLOCK));
    float *f = (float *)malloc(sizeof(float) * floats);
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)RQ_XQ_SLOTS(T, k_max));
    if (f == NULL || xq == NULL) {
        free(f);
        free(xq);
        return -1;
    }
    float *xn = f, *qkv = xn + T * H, *qrot = qkv + T * nqkv, *att = qrot + T * nq;
    float *o = att + T * nq, *gate_up = o + T * H, *act = gate_up + T * 2 * I;
    float *sx = act + T * I, *xsum = sx + T * (k_max / BLOCK);
    const size_t scratch = (size_t)rq_attention_scratch(Hq / Hkv, D, max_ctx);
    int failed = 0;
    const int64_t group = Hq / Hkv;
    const int per_head = T * Hkv < 4 * omp_get_max_threads();
    const int64_t items = per_head ? T * Hq : T * Hkv;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * scratch);
        /* Every thread must reach every barrier: one without scratch still takes part. */
        if (scores == NULL) failed = 1;
        for (int64_t l = 0; l < L; l++) {
            const rq_layer *ly = layers + l;
            float *k_cache = caches[2 * l], *v_cache = caches[2 * l + 1];
#pragma omp single
            {
                if (l == 0)
                    quantize_for(&ly->qkv, x, T, H, xq, sx, xsum);
                else {
                    rq_add_rmsnorm(mlp_out, H, residual, H, ly->input_norm, eps, T, H, xn, residual);
                    quantize_for(&ly->qkv, xn, T, H, xq, sx, xsum);
                }
            }
            matmul(&ly->qkv, H, l == 0 ? x : xn, xq, sx, xsum, T, qkv);
#pragma omp single
            rq_rope_kv_store(qkv, nqkv, qkv + nq, nqkv, qkv + nq + Hkv * D, nqkv, T, Hq, Hkv, D,
                             positions, cos_sin, k_cache, v_cache, slots, qrot);
            /* Work items: (sequence, KV head) pairs, each reading its keys and values once for
             * its group of query heads; or, when pairs are too few to keep the threads busy (one
             * sequence of SmolLM2: 3 pairs on 2 threads), single query heads. */
#pragma omp for schedule(dynamic)
            for (int64_t item = 0; item < items; item++) {
                if (scores == NULL) continue;
                const int64_t pair = per_head ? item / group : item;
                const int64_t g0 = per_head ? item % group : 0, g1 = per_head ? g0 + 1 : group;
                rq_attention_heads(pair, g0, g1, qrot, nq, Hq, Hkv, D, k_cache, v_cache,
                                   block_size, block_tables, width, seq_lens, scale, scores,
                                   max_ctx, att);
            }
#pragma omp single
            quantize_for(&ly->o, att, T, nq, xq, sx, xsum);
            matmul(&ly->o, nq, att, xq, sx, xsum, T, o);
#pragma omp single
            {
                rq_add_rmsnorm(o, H, residual, H, ly->post_attn_norm, eps, T, H, xn, residual);
                quantize_for(&ly->gate_up, xn, T, H, xq, sx, xsum);
            }
            matmul(&ly->gate_up, H, xn, xq, sx, xsum, T, gate_up);
#pragma omp single
            {
                rq_silu_mul(gate_up, 2 * I, T, I, act);
                quantize_for(&ly->down, act, T, I, xq, sx, xsum);
            }
            matmul(&ly->down, I, act, xq, sx, xsum, T, mlp_out);
        }
        free(scores);
    }
    free(f);
    free(xq);
    return failed ? -1 : 0;
}
