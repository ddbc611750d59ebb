/* Quantized matmul for the CPU: out[M, N] = x[M, K] @ W^T (+ bias), W held as 4- or 8-bit codes.
 *
 * Why our own kernel: torch's packed int4 CPU kernel needs bf16 activations (float32 ones take a
 * path ~20x slower) and has no group-wise 8-bit form, so an LM head or a Q8_0 matrix through it
 * either loses float32 accuracy or runs as two 4-bit planes. Here the activations are rounded to
 * int16 per block of 32 values (a relative error of 2^-16 of the block's largest value, far finer
 * than the bf16 rounding torch's kernel needs, 2^-9 per value) so the products run in integers,
 * exact, and only each block's partial sum is scaled in float32:
 *   - 4-bit codes on a CPU with AVX512-VNNI: each int16 activation split into its high byte
 *     (int8) and low byte (uint8), and vpdpbusd (64 byte products into 16 int32 lanes per
 *     instruction) multiplies a whole tile's 4 rows' block (64 bytes of nibbles, one load) with
 *     each half broadcast to the 4 rows: code * x = 256 * (code * hi) + code * lo, exact. About a
 *     quarter of the vector instructions of widening the nibbles to int16 (below) per row.
 *   - otherwise (8-bit codes, AVX2 or plain C): codes widened to int16 and multiplied in pairs
 *     into int32 (vpmaddwd: 32 products per instruction on AVX-512).
 *
 * Weight layout (what prepare writes; see quant_native.py): rows in tiles of 4, each tile one
 * contiguous run of bytes, so a thread streams its share of W as one sequence (not the twelve
 * streams of four rows' codes, scales and shifts read from separate arrays):
 *   scale  [K / 32][4] float32 or fp16: one per block of 32 values (groups of 64 or 128 repeat
 *          theirs), block b's 4 rows side by side (one 8- or 16-byte load per block);
 *   shift  [K / 32][4] the same, 4-bit formats only: value = scale * code + shift (q4_0's offset
 *          of 8 folded in as -8 * scale, exact in fp16 too);
 *   codes  [K / 32][4][block]: block b of the 4 rows side by side; a 4-bit block is 16 bytes in
 *          llama.cpp's nibble order (byte j: value j low, value j + 16 high), an 8-bit one 32
 *          int8 codes.
 * Each value is thus scale * code + shift exactly as the format defines it (the file's fp16
 * numbers or our float32 ones, widened to float32 exactly).
 *
 * out[m, n] = sum_b scale[n, b] * sx[m, b] * (sum_i code * xq[m, b, i]) + shift[n, b] * xsum[m, b]
 * where xq = round(x / sx) in int16 and xsum is the float32 sum of the block's x. The integer
 * part is exact (|code| <= 128, |xq| <= 32767: the int32 partial sums stay below 2^24, so their
 * float conversion too), so the one approximation is x's rounding to 16 bits per block.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rq_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define RQ_SIMD "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RQ_SIMD "avx2"
#else
#define RQ_SIMD "scalar"
#endif

#if defined(__FLT16_MAX__)
typedef _Float16 half_t;
#define RQ_HALF 1
#else
typedef uint16_t half_t; /* never read: rq_half() says 0 and callers pass float32 */
#define RQ_HALF 0
#endif

#define BLOCK 32
/* How far ahead of its reads a tile asks for the weight's bytes. A decode step reads each matrix
 * once, from memory, in runs of ~50-100 us per thread: too short for the hardware prefetcher to
 * ramp up on its own, so the matmuls streamed at ~10 GB/s where the memory gives ~20. Asking 4
 * KB ahead (2-32 KB measured alike) took a SmolLM2 token from ~11.8 to ~8.2 ms (BENCHMARKS.md,
 * "Prefetching the weights"). Past a thread's range or the matrix it is a harmless hint. */
#define RQ_AHEAD 4096
#if defined(__SSE__)
#include <xmmintrin.h>
#define RQ_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define RQ_PREFETCH(p) __builtin_prefetch((p))
#endif
/* Rows of x handled together, so each weight block is widened once for all of them. */
#define M_TILE 4

int rq_half(void) { return RQ_HALF; }

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Scales and shifts come as float32, or as fp16 (GGUF's own, exact in float32: the kernel widens
 * them as it reads, so the weight streams 4 bytes less per block of 32). */
typedef struct {
    const void *p;
    int half;
} nums;
static inline float num_at(nums v, int64_t i) {
#if RQ_HALF
    if (v.half) return (float)((const half_t *)v.p)[i];
#endif
    return ((const float *)v.p)[i];
}
static inline nums nums_at(nums v, int64_t offset) {
    nums r = {v.p == NULL ? NULL : (const char *)v.p + offset * (v.half ? 2 : 4), v.half};
    return r;
}
/* Block b's numbers for the tile's 4 rows (fp16 ones widened exactly). */
#if defined(__F16C__)
#include <immintrin.h>
static inline __m128 load4(nums v, int64_t b) {
    if (v.half) return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)v.p + 4 * b)));
    return _mm_loadu_ps((const float *)v.p + 4 * b);
}
#endif

/* One block of 32 activations -> int16 codes q = round(v * 32767 / amax), its scale amax / 32767
 * and its float sum. Rounding is to nearest even (the vector units' default mode; lrintf's too). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline void quantize_block(const float *v, int16_t *q, float *scale, float *sum) {
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm256_storeu_si256((__m256i *)q, _mm512_cvtsepi32_epi16(qa));
    _mm256_storeu_si256((__m256i *)(q + 16), _mm512_cvtsepi32_epi16(qb));
    *scale = amax / 32767.0f;
    *sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline void quantize_block(const float *v, int16_t *q, float *scale, float *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 x[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        x[i] = _mm256_loadu_ps(v + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x[i]));
        total = _mm256_add_ps(total, x[i]);
    }
    const float m = hmax8(amax);
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
    for (int i = 0; i < 4; i += 2) {
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], inv));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(x[i + 1], inv));
        /* packs interleaves 128-bit lanes: put them back in order. */
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm256_storeu_si256((__m256i *)(q + 8 * i), packed);
    }
    *scale = m / 32767.0f;
    *sum = hsum8(total);
}
#else
static inline void quantize_block(const float *v, int16_t *q, float *scale, float *sum) {
    float amax = 0.0f, total = 0.0f;
    for (int i = 0; i < BLOCK; i++) {
        const float a = fabsf(v[i]);
        amax = a > amax ? a : amax;
        total += v[i];
    }
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    for (int i = 0; i < BLOCK; i++) q[i] = (int16_t)lrintf(v[i] * inv);
    *scale = amax / 32767.0f;
    *sum = total;
}
#endif

void rq_quantize_rows(const float *x, int64_t M, int64_t K, int64_t ldx, int16_t *xq, float *sx,
                      float *xsum) {
    const int64_t nb = K / BLOCK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++)
            quantize_block(x + m * ldx + b * BLOCK, xq + m * K + b * BLOCK, sx + m * nb + b,
                           xsum + m * nb + b);
    /* The byte planes the VNNI kernel reads: xq = 256 * hi + lo, hi int8, lo uint8. */
    uint8_t *lo = (uint8_t *)(xq + M * K);
    int8_t *hi = (int8_t *)(lo + M * K);
#pragma omp simd
    for (int64_t i = 0; i < M * K; i++) {
        lo[i] = (uint8_t)(xq[i] & 0xFF);
        hi[i] = (int8_t)(xq[i] >> 8);
    }
}

/* The vector unit's pieces: a widened block of 32 codes (W), a float vector (V), the int16
 * dot of a block with 32 activations as float partial sums, and a horizontal sum. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512i W;
typedef __m512 V;
static inline W widen_block(const uint8_t *codes, int bits) {
    if (bits == 4) {
        __m128i v = _mm_loadu_si128((const __m128i *)codes);
        __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
        return _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
    }
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)codes));
}
static inline V v_zero(void) { return _mm512_setzero_ps(); }
static inline V v_dot(W w, const int16_t *x) {
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512((const void *)x)));
}
static inline V v_fma(V a, float s, V acc) { return _mm512_fmadd_ps(a, _mm512_set1_ps(s), acc); }
static inline float v_sum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct {
    __m256i lo, hi;
} W;
typedef __m256 V;
static inline W widen_block(const uint8_t *codes, int bits) {
    W w;
    if (bits == 4) {
        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)codes));
        w.lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
        w.hi = _mm256_srli_epi16(v, 4);
    } else {
        const int8_t *c = (const int8_t *)codes;
        w.lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)c));
        w.hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 16)));
    }
    return w;
}
static inline V v_zero(void) { return _mm256_setzero_ps(); }
static inline V v_dot(W w, const int16_t *x) {
    __m256i p0 = _mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i *)x));
    __m256i p1 = _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i *)(x + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
}
static inline V v_fma(V a, float s, V acc) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc); }
static inline float v_sum(V v) { return hsum8(v); }
#else
typedef struct {
    int16_t c[BLOCK];
} W;
typedef float V;
static inline W widen_block(const uint8_t *codes, int bits) {
    W w;
    for (int i = 0; i < BLOCK; i++) {
        if (bits == 4) {
            uint8_t byte = codes[i & 15];
            w.c[i] = i < 16 ? (byte & 0x0F) : (byte >> 4);
        } else {
            w.c[i] = ((const int8_t *)codes)[i];
        }
    }
    return w;
}
static inline V v_zero(void) { return 0.0f; }
static inline V v_dot(W w, const int16_t *x) {
    int32_t dot = 0;
    for (int i = 0; i < BLOCK; i++) dot += w.c[i] * x[i];
    return (float)dot;
}
static inline V v_fma(V a, float s, V acc) { return acc + a * s; }
static inline float v_sum(V v) { return v; }
#endif

/* The shift term of rows r = 0..3 of a tile for one row of x: sum_b shift[b][r] * xsum[b]. */
static inline void add_shifts(nums shift, const float *xsum, int64_t nb, float *res) {
#if defined(__F16C__)
    __m128 acc = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) acc = _mm_fmadd_ps(load4(shift, b), _mm_set1_ps(xsum[b]), acc);
    float s[4];
    _mm_storeu_ps(s, acc);
    for (int r = 0; r < 4; r++) res[r] += s[r];
#else
    for (int r = 0; r < 4; r++) {
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) total += num_at(shift, b * 4 + r) * xsum[b];
        res[r] += total;
    }
#endif
}

/* One tile: rows n..n+3 of W against rows m..m+MT-1 of x (MT and bits compile-time constants:
 * the switch below spells every pair out), codes widened to int16. The 4 x MT accumulators are
 * named variables, not an array, so they stay in registers: independent FMA chains whose latency
 * overlaps, and each widened block of codes serves MT rows of x. comb[m][b][r] = scale[b][r] *
 * sx[m][b] is made before the block loop. */
#define ACC_DECL(m) V a##m##0 = v_zero(), a##m##1 = v_zero(), a##m##2 = v_zero(), a##m##3 = v_zero()
#define ACC_STEP(m)                                                                          \
    if (MT > m) {                                                                            \
        const int16_t *xb = xq + m * K + b * BLOCK;                                          \
        const float *cb = comb + (m * nb + b) * 4;                                           \
        a##m##0 = v_fma(v_dot(w0, xb), cb[0], a##m##0);                                      \
        a##m##1 = v_fma(v_dot(w1, xb), cb[1], a##m##1);                                      \
        a##m##2 = v_fma(v_dot(w2, xb), cb[2], a##m##2);                                      \
        a##m##3 = v_fma(v_dot(w3, xb), cb[3], a##m##3);                                      \
    }
#define ACC_OUT(m)                                                                           \
    if (MT > m) {                                                                            \
        res[m][0] = v_sum(a##m##0);                                                          \
        res[m][1] = v_sum(a##m##1);                                                          \
        res[m][2] = v_sum(a##m##2);                                                          \
        res[m][3] = v_sum(a##m##3);                                                          \
    }

static inline __attribute__((always_inline)) void tile4(
    const int MT, const int bits, const uint8_t *codes, nums scale, nums shift,
    const int16_t *xq, const float *sx, const float *xsum, int64_t K, float *out, int64_t ldo,
    const float *bias) {
    const int64_t nb = K / BLOCK;
    const int64_t bb = bits == 4 ? BLOCK / 2 : BLOCK; /* bytes per block of codes */
    float comb[MT * nb * 4];
    for (int m = 0; m < MT; m++)
        for (int64_t b = 0; b < nb; b++) {
#if defined(__F16C__)
            _mm_storeu_ps(comb + (m * nb + b) * 4, _mm_mul_ps(load4(scale, b), _mm_set1_ps(sx[m * nb + b])));
#else
            for (int r = 0; r < 4; r++) comb[(m * nb + b) * 4 + r] = num_at(scale, b * 4 + r) * sx[m * nb + b];
#endif
        }
    ACC_DECL(0);
    ACC_DECL(1);
    ACC_DECL(2);
    ACC_DECL(3);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *c = codes + b * 4 * bb; /* the tile's 4 rows' block b, side by side */
        RQ_PREFETCH(c + RQ_AHEAD); /* 4 rows' block: 64 bytes of nibbles, 128 of int8 codes */
        if (bits == 8) RQ_PREFETCH(c + RQ_AHEAD + 64);
        const W w0 = widen_block(c, bits), w1 = widen_block(c + bb, bits),
                w2 = widen_block(c + 2 * bb, bits), w3 = widen_block(c + 3 * bb, bits);
        ACC_STEP(0)
        ACC_STEP(1)
        ACC_STEP(2)
        ACC_STEP(3)
    }
    float res[4][4];
    ACC_OUT(0)
    ACC_OUT(1)
    ACC_OUT(2)
    ACC_OUT(3)
    for (int m = 0; m < MT; m++) {
        if (shift.p != NULL) add_shifts(shift, xsum + m * nb, nb, res[m]);
        for (int r = 0; r < 4; r++) out[m * ldo + r] = res[m][r] + (bias != NULL ? bias[r] : 0.0f);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
#define RQ_VNNI 1
/* One tile of 4-bit codes against rows m..m+MT-1 of x through vpdpbusd. A 512-bit register holds
 * block b of the tile's 4 rows (row r in 128-bit lane r: 16 bytes, values j and j + 16 in byte
 * j's low and high nibble); x's block is broadcast to all four lanes, its values 0..15 against
 * the low nibbles and 16..31 against the high ones, its high bytes (int8) against the codes as
 * unsigned and its low bytes (uint8) against the codes as signed (0..15 is both). Lane r's four
 * int32 partial sums are exact (below 2^22), scaled by scale[b][r] * sx[m][b] in float32. */
#define VACC_STEP(m)                                                                         \
    if (MT > m) {                                                                            \
        const uint8_t *xl = lo + m * K + b * BLOCK;                                          \
        const int8_t *xh = hi + m * K + b * BLOCK;                                           \
        const __m512i h0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xh));      \
        const __m512i h1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xh + 16))); \
        const __m512i l0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xl));      \
        const __m512i l1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xl + 16))); \
        __m512i ih = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c_lo, h0);                  \
        ih = _mm512_dpbusd_epi32(ih, c_hi, h1);                                              \
        __m512i il = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, c_lo);                  \
        il = _mm512_dpbusd_epi32(il, l1, c_hi);                                              \
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(ih, 8), il);                  \
        const __m512 sc = _mm512_mul_ps(s16, _mm512_set1_ps(sx[m * nb + b]));                \
        acc##m = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sc, acc##m);                        \
    }

static inline float lane_sum(__m512 v, int r) {
    __m128 s;
    switch (r) {
    case 0: s = _mm512_extractf32x4_ps(v, 0); break;
    case 1: s = _mm512_extractf32x4_ps(v, 1); break;
    case 2: s = _mm512_extractf32x4_ps(v, 2); break;
    default: s = _mm512_extractf32x4_ps(v, 3); break;
    }
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void tile4_vnni(
    const int MT, const uint8_t *codes, nums scale, nums shift, const uint8_t *lo,
    const int8_t *hi, const float *sx, const float *xsum, int64_t K, float *out, int64_t ldo,
    const float *bias) {
    const int64_t nb = K / BLOCK;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        RQ_PREFETCH(codes + b * 64 + RQ_AHEAD);
        const __m512i v = _mm512_loadu_si512((const void *)(codes + b * 64));
        const __m512i c_lo = _mm512_and_si512(v, nibble);
        const __m512i c_hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        /* scale[b][r] in lane r's four int32 slots */
        const __m512 s16 = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(load4(scale, b)));
        VACC_STEP(0)
        VACC_STEP(1)
        VACC_STEP(2)
        VACC_STEP(3)
    }
    const __m512 accs[4] = {acc0, acc1, acc2, acc3};
    for (int m = 0; m < MT; m++) {
        float res[4];
        for (int r = 0; r < 4; r++) res[r] = lane_sum(accs[m], r);
        if (shift.p != NULL) add_shifts(shift, xsum + m * nb, nb, res);
        for (int r = 0; r < 4; r++) out[m * ldo + r] = res[r] + (bias != NULL ? bias[r] : 0.0f);
    }
}
#else
#define RQ_VNNI 0
#endif

const char *rq_simd(void) { return RQ_VNNI ? RQ_SIMD "-vnni" : RQ_SIMD; }

#define TILE_ARGS codes, scale, shift, xq, sx, xsum, K, out, ldo, bias
#define VNNI_ARGS codes, scale, shift, lo, hi, sx, xsum, K, out, ldo, bias
/* xq, lo, hi: the tile's first row of x's int16 codes and of their low and high bytes. */
static void tile(int mt, int bits, const uint8_t *codes, nums scale, nums shift,
                 const int16_t *xq, const uint8_t *lo, const int8_t *hi, const float *sx,
                 const float *xsum, int64_t K, float *out, int64_t ldo, const float *bias) {
#if RQ_VNNI
    if (bits == 4) {
        switch (mt) {
        case 1: tile4_vnni(1, VNNI_ARGS); return;
        case 2: tile4_vnni(2, VNNI_ARGS); return;
        case 3: tile4_vnni(3, VNNI_ARGS); return;
        default: tile4_vnni(4, VNNI_ARGS); return;
        }
    }
#else
    (void)lo;
    (void)hi;
#endif
    switch (mt * 16 + bits) {
    case 16 + 4: tile4(1, 4, TILE_ARGS); break;
    case 32 + 4: tile4(2, 4, TILE_ARGS); break;
    case 48 + 4: tile4(3, 4, TILE_ARGS); break;
    case 64 + 4: tile4(4, 4, TILE_ARGS); break;
    case 16 + 8: tile4(1, 8, TILE_ARGS); break;
    case 32 + 8: tile4(2, 8, TILE_ARGS); break;
    case 48 + 8: tile4(3, 8, TILE_ARGS); break;
    default: tile4(4, 8, TILE_ARGS); break;
    }
}

/* Bytes of one tile of 4 rows in the packed layout (see the top of this file). */
int64_t rq_tile_bytes(int64_t K, int bits, int half, int has_shift) {
    const int64_t nb = K / BLOCK;
    const int64_t numbers = 4 * nb * (half ? 2 : 4) * (has_shift ? 2 : 1);
    return numbers + 4 * nb * (bits == 4 ? BLOCK / 2 : BLOCK);
}

/* Tile t of the packed weight: its scales, shifts (or none) and codes. */
typedef struct {
    nums scale, shift;
    const uint8_t *codes;
} tile_parts;
static inline tile_parts parts_of(const uint8_t *packed, int64_t t, int64_t K, int bits, int half,
                                  int has_shift) {
    const uint8_t *base = packed + t * rq_tile_bytes(K, bits, half, has_shift);
    const int64_t number_bytes = 4 * (K / BLOCK) * (half ? 2 : 4);
    tile_parts p = {{base, half},
                    {has_shift ? base + number_bytes : NULL, half},
                    base + number_bytes * (has_shift ? 2 : 1)};
    return p;
}

void rq_matrix_tile(const rq_matrix *w, int64_t t, int64_t K, const int16_t *xq, const float *sx,
                    const float *xsum, int64_t M, float *out, int64_t ldo) {
    const int64_t nb = K / BLOCK;
    const tile_parts p = parts_of(w->packed, t, K, w->bits, w->half, w->has_shift);
    const uint8_t *lo = (const uint8_t *)(xq + M * K); /* rq_quantize_rows' byte planes */
    const int8_t *hi = (const int8_t *)(lo + M * K);
    for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
        const int mt = (int)(M - m0 < M_TILE ? M - m0 : M_TILE);
        tile(mt, w->bits, p.codes, p.scale, p.shift, xq + m0 * K, lo + m0 * K, hi + m0 * K,
             sx + m0 * nb, xsum + m0 * nb, K, out + m0 * ldo + t * 4, ldo,
             w->bias != NULL ? w->bias + t * 4 : NULL);
    }
}

/* out [M, N] (row stride ldo) = x [M, K] (row stride ldx) @ W^T + bias; W packed in tiles of 4
 * rows (N % 4 == 0, K % 32 == 0). Returns 0; -1 when scratch memory cannot be had, -2 for fp16
 * numbers from a compiler without _Float16. */
int rq_linear(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *packed, int bits,
              int half, int has_shift, const float *bias, float *out, int64_t N, int64_t ldo) {
    if (half && !RQ_HALF) return -2;
    const int64_t nb = K / BLOCK;
    int16_t *xq = (int16_t *)aligned_alloc(64, (size_t)((RQ_XQ_SLOTS(M, K) * 2 + 63) / 64 * 64));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(M * nb) * 2);
    if (xq == NULL || sx == NULL) {
        free(xq);
        free(sx);
        return -1;
    }
    float *xsum = sx + M * nb;
    rq_quantize_rows(x, M, K, ldx, xq, sx, xsum);
    const rq_matrix w = {packed, bias, N, bits, half, has_shift, 0};
    /* Threads split the tiles: each streams its own share of W once, whatever M is. Small
     * matrices stay on one thread (a parallel region costs a few microseconds). */
    const int parallel = N * rq_tile_bytes(K, bits, half, has_shift) / 4 * (M < 8 ? M : 8) >= 64 * 1024;
    const int64_t n_tiles = N / 4;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < n_tiles; t++) rq_matrix_tile(&w, t, K, xq, sx, xsum, M, out, ldo);
    free(xq);
    free(sx);
    return 0;
}

/* out [N, K] float32 = the packed weight's values, scale * code + shift in float32 (one rounding
 * where that needs more than float32's 24 bits, as QuantizedWeight.dequantize(float32) rounds):
 * for prompts, where a dense float32 GEMM over the widened weight beats the block kernel's
 * rows-at-a-time arithmetic, and the widening is paid once for all the prompt's rows. */
void rq_dequantize(const uint8_t *packed, int bits, int half, int has_shift, int64_t N,
                   int64_t K, float *out) {
    const int64_t nb = K / BLOCK, bb = bits == 4 ? BLOCK / 2 : BLOCK;
#pragma omp parallel for schedule(static) if (N * K >= 256 * 1024)
    for (int64_t t = 0; t < N / 4; t++) {
        const tile_parts p = parts_of(packed, t, K, bits, half, has_shift);
        const nums scale = p.scale, shift = p.shift;
        const uint8_t *codes = p.codes;
        for (int r = 0; r < 4; r++) {
            float *row = out + (t * 4 + r) * K;
            for (int64_t b = 0; b < nb; b++) {
                const float s = num_at(scale, b * 4 + r);
                const float m = shift.p != NULL ? num_at(shift, b * 4 + r) : 0.0f;
                const uint8_t *c = codes + (b * 4 + r) * bb;
                float *v = row + b * BLOCK;
                if (bits == 4) {
                    for (int i = 0; i < 16; i++) {
                        v[i] = fmaf(s, (float)(c[i] & 0x0F), m);
                        v[i + 16] = fmaf(s, (float)(c[i] >> 4), m);
                    }
                } else {
                    for (int i = 0; i < BLOCK; i++) v[i] = s * (float)((const int8_t *)c)[i];
                }
            }
        }
    }
}
