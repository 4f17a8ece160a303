/* One decode query per row over that row's ragged slice of a preallocated K/V cache, on a CPU
 * with AVX2 and FMA, fp32 (kernels/cpu_attention.py builds it, kernels/dispatch.py calls it).
 *
 * The decode step's attention: for each entry b and query head h,
 *     out[b, h] = softmax_j(q[b, h] . K[row[b], h / G, j] * scale) . V[row[b], h / G, j]
 * over the visible slots j in [0, a_end[b]) and [b_start[b], b_end[b]) of the row's buffer
 * (self-attention: [0, length + 1) of the text cache; CASA: the frame's image tokens [0, n_img)
 * and the window's text [N, N + slot + 1) of the [image | window] buffer). G = H / Hkv.
 *
 * Why a kernel of its own: the torch path is a batched matrix-vector product per (row, head),
 * a bias add, a softmax and another batched product over every row padded to the longest, four
 * ops whose small products run far below memory speed (docs/engine.md, "The ragged decode
 * attention"). Here each row reads exactly its own slots, keys once, then values once.
 *
 * Scores are kept in a per-call buffer (G * visible slots floats per (row, kv head)); exp is a
 * degree-6 polynomial on 2^n (relative error ~2e-7, as the libm's expf on the tail); sums are
 * fp32 throughout. An entry with no visible slot outputs zeros.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 exp_ps(__m256 x) {
    /* exp(x) for x <= 0 (scores minus their max): n = round(x / ln 2), r = x - n ln 2 in two
     * parts (Cody-Waite), exp(r) by its degree-6 polynomial, times 2^n from the exponent bits */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* q . k over D floats (D a multiple of 8) */
static inline float dot(const float* q, const float* k, int D) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (int d = 8; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    return hsum(acc);
}

/* The same for D == 64, the bundled model's head size, with q held in registers. */
static inline float dot64(const __m256* q, const float* k) {
    __m256 a0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
    __m256 a1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(k + 8));
    a0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(k + 16), a0);
    a1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(k + 24), a1);
    a0 = _mm256_fmadd_ps(q[4], _mm256_loadu_ps(k + 32), a0);
    a1 = _mm256_fmadd_ps(q[5], _mm256_loadu_ps(k + 40), a1);
    a0 = _mm256_fmadd_ps(q[6], _mm256_loadu_ps(k + 48), a0);
    a1 = _mm256_fmadd_ps(q[7], _mm256_loadu_ps(k + 56), a1);
    return hsum(_mm256_add_ps(a0, a1));
}

/* Returns 0; -1 when the score buffer cannot be allocated, -2 when an entry's row is not one of
 * the buffer's n_rows (nothing written either way). Ranges are clamped to [0, max_keys).
 * q: entry b, head h at q + b * q_bs + h * D; keys/values: a layer's (Bmax, Hkv, C, D) buffers,
 * row stride rs and head stride hs in floats, slots D apart; out (B, H, D) contiguous; the range
 * arrays int64 (B,); max_keys: the buffers' slots per (row, head). */
int casa_ragged_decode_attention(const float* q, int64_t q_bs, const float* keys, const float* values,
                                 int64_t rs, int64_t hs, const int64_t* row, const int64_t* a_end,
                                 const int64_t* b_start, const int64_t* b_end, float* out, int B, int H,
                                 int Hkv, int D, float scale, int64_t max_keys, int64_t n_rows) {
    const int G = H / Hkv;
    for (int b = 0; b < B; b++)
        if (row[b] < 0 || row[b] >= n_rows) return -2;
    float* scores = (float*)malloc(sizeof(float) * (size_t)G * (size_t)(2 * max_keys + 8));
    float* acc = (float*)malloc(sizeof(float) * (size_t)D);
    float* qs = (float*)malloc(sizeof(float) * (size_t)G * (size_t)D);
    if (!scores || !acc || !qs) {
        free(scores);
        free(acc);
        free(qs);
        return -1;
    }
    for (int b = 0; b < B; b++) {
        int64_t lo[2] = {0, b_start[b]}, hi[2] = {a_end[b], b_end[b]};
        for (int r = 0; r < 2; r++) {
            lo[r] = lo[r] < 0 ? 0 : lo[r];
            hi[r] = hi[r] > max_keys ? max_keys : hi[r];
        }
        int64_t n = 0;
        for (int r = 0; r < 2; r++) n += hi[r] > lo[r] ? hi[r] - lo[r] : 0;
        for (int kh = 0; kh < Hkv; kh++) {
            const float* K = keys + row[b] * rs + kh * hs;
            const float* V = values + row[b] * rs + kh * hs;
            float* o = out + ((int64_t)b * H + (int64_t)kh * G) * D;
            if (n == 0) {
                memset(o, 0, sizeof(float) * (size_t)G * (size_t)D);
                continue;
            }
            /* the G query heads of this kv head, pre-scaled */
            for (int g = 0; g < G; g++) {
                const float* qh = q + b * q_bs + ((int64_t)kh * G + g) * D;
                for (int d = 0; d < D; d++) qs[g * D + d] = qh[d] * scale;
            }
            /* scores[g * n + i]: each key read once for the G queries */
            int64_t i = 0;
            if (D == 64 && G == 1) {
                __m256 qr[8];
                for (int d = 0; d < 8; d++) qr[d] = _mm256_loadu_ps(qs + 8 * d);
                for (int r = 0; r < 2; r++)
                    for (int64_t j = lo[r]; j < hi[r]; j++) scores[i++] = dot64(qr, K + j * D);
            } else {
                for (int r = 0; r < 2; r++)
                    for (int64_t j = lo[r]; j < hi[r]; j++, i++)
                        for (int g = 0; g < G; g++) scores[g * n + i] = dot(qs + g * D, K + j * D, D);
            }
            /* softmax numerators in place, their sum, then the weighted sum of values: each
             * value row read once per query head (from L1/L2 after the first of G heads) */
            for (int g = 0; g < G; g++) {
                float* s = scores + g * n;
                float m = s[0];
                for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
                const __m256 mv = _mm256_set1_ps(m);
                __m256 sum = _mm256_setzero_ps();
                int64_t j = 0;
                for (; j + 8 <= n; j += 8) {
                    __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
                    _mm256_storeu_ps(s + j, e);
                    sum = _mm256_add_ps(sum, e);
                }
                float tot = hsum(sum);
                for (; j < n; j++) {
                    s[j] = expf(s[j] - m);
                    tot += s[j];
                }
                const __m256 w = _mm256_set1_ps(1.0f / tot);
                float* og = o + g * D;
                int64_t t = 0;
                if (D == 64) {
                    __m256 a[8];
                    for (int d = 0; d < 8; d++) a[d] = _mm256_setzero_ps();
                    for (int r = 0; r < 2; r++)
                        for (int64_t jj = lo[r]; jj < hi[r]; jj++, t++) {
                            const __m256 p = _mm256_set1_ps(s[t]);
                            const float* v = V + jj * D;
                            for (int d = 0; d < 8; d++) a[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * d), a[d]);
                        }
                    for (int d = 0; d < 8; d++) _mm256_storeu_ps(og + 8 * d, _mm256_mul_ps(a[d], w));
                } else {
                    for (int d = 0; d < D; d++) acc[d] = 0.0f;
                    for (int r = 0; r < 2; r++)
                        for (int64_t jj = lo[r]; jj < hi[r]; jj++, t++) {
                            const __m256 p = _mm256_set1_ps(s[t]);
                            const float* v = V + jj * D;
                            for (int d = 0; d < D; d += 8)
                                _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + d),
                                                                          _mm256_loadu_ps(acc + d)));
                        }
                    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(og + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), w));
                }
            }
        }
    }
    free(scores);
    free(acc);
    free(qs);
    return 0;
}
