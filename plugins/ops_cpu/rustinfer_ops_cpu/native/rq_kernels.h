/* What the C files of rustinfer's CPU kernels share: the pieces that decode_step.c strings into
 * one call for a whole decode step (qlinear.c's block matmul, layer_ops.c's small ops). Each file
 * keeps its own exported entry points (the ctypes calls of one op) on these same pieces, so a
 * fused step computes what the ops one by one compute, bit for bit. */
#ifndef RQ_KERNELS_H
#define RQ_KERNELS_H
#include <stdint.h>

/* A matrix [n_pad, K] with its bias or NULL: quantized in the packed tile layout of qlinear.c (bits
 * 4 or 8), or float32 column-major, [K, n_pad] in memory (bits 32; decode_step.c alone reads those). */
typedef struct {
    const uint8_t *packed;
    const float *bias;
    int64_t n_pad;
    int32_t bits, half, has_shift, pad_;
} rq_matrix;

/* int16 slots of the xq buffer for M rows of K: the int16 codes [M, K], then their low bytes
 * (uint8 [M, K]) and high bytes (int8 [M, K]), all three written by rq_quantize_rows. */
#define RQ_XQ_SLOTS(M, K) (2 * (M) * (K))
/* x [M, K] (row stride ldx) -> xq (RQ_XQ_SLOTS), sx and xsum [M, K / 32] (qlinear.c). */
void rq_quantize_rows(const float *x, int64_t M, int64_t K, int64_t ldx, int16_t *xq, float *sx,
                      float *xsum);
/* Tile t (rows 4t..4t+3) of out [M, n_pad] (row stride ldo) from M quantized rows of x. */
void rq_matrix_tile(const rq_matrix *w, int64_t t, int64_t K, const int16_t *xq, const float *sx,
                    const float *xsum, int64_t M, float *out, int64_t ldo);

/* layer_ops.c */
void rq_add_rmsnorm(const float *x, int64_t ldx, const float *residual, int64_t ldr,
                    const float *weight, float eps, int64_t T, int64_t H, float *norm, float *sum);
void rq_silu_mul(const float *x, int64_t ldx, int64_t T, int64_t I, float *out);
void rq_rope_kv_store(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v,
                      int64_t ldv, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                      const int64_t *positions, const float *cos_sin, float *k_cache,
                      float *v_cache, const int64_t *slots, float *q_out);
/* Floats of scratch one attention pair needs for a step whose longest sequence is max_ctx. */
int64_t rq_attention_scratch(int64_t group, int64_t D, int64_t max_ctx);
/* One (sequence, KV head) pair of decode attention: its query heads g0..g1-1 (of the group sharing
 * the KV head), or all of them, into out. */
void rq_attention_heads(int64_t pair, int64_t g0, int64_t g1, const float *q, int64_t ldq,
                        int64_t Hq, int64_t Hkv, int64_t D, const float *k_cache,
                        const float *v_cache, int64_t block_size, const int32_t *block_tables,
                        int64_t width, const int32_t *seq_lens, float scale, float *scores,
                        int64_t max_ctx, float *out);
void rq_attention_pair(int64_t pair, const float *q, int64_t ldq, int64_t Hq, int64_t Hkv,
                       int64_t D, const float *k_cache, const float *v_cache, int64_t block_size,
                       const int32_t *block_tables, int64_t width, const int32_t *seq_lens,
                       float scale, float *scratch, int64_t max_ctx, float *out);
#endif
