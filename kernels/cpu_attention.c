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
    /* exp(x), x clamped to [-87.3, 88.3] (a float's range; scores minus their max are <= 0, the
     * SiLU's -g any sign): n = round(x / ln 2), r = x - n ln 2 in two
     * parts (Cody-Waite), exp(r) by its degree-6 polynomial, times 2^n from the exponent bits */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
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

/* ---- the whole decode step's layers (kernels/cpu_attention.py `decode_layers`) ----
 *
 * For a few rows a decode step is op dispatch, not arithmetic: ~350 ATen ops of a few
 * microseconds each where the arithmetic is ~0.3 ms (docs/engine.md, "The decode step in C").
 * This runs every layer of model/decode.py `_fused_layers` in one call, the same math in the same
 * order per row (sums in a different order: fp32 rounding apart); its matmuls keep a 4-row x
 * 16-column block of the output in registers, so it keeps up with MKL to ~96 rows.
 *
 * Weights: per layer, LAYER_PTRS pointers (NULL where absent), in this order: */
enum { W_LN1, W_QKV, W_QKV_B, W_O, W_O_B, W_LN2, W_GU, W_GU_B, W_DN, W_DN_B,
       W_CNORM, W_CQKV, W_CQKV_B, W_CO, W_CO_B, LAYER_PTRS };

/* y[m0 .. m0+MB, n0 .. n0+8*NV] of x (M, K) wt (K, N) + b: MB x NV accumulators held in registers,
 * each k one broadcast of x per row and NV vectors of the transposed weight */
static inline __attribute__((always_inline)) void block(const float* x, int K, const float* wt, int N,
                                                       const float* b, float* y, int m0,
                         int n0, const int MB, const int NV) {
    __m256 acc[4][2];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NV; j++) acc[i][j] = b ? _mm256_loadu_ps(b + n0 + 8 * j) : _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float* wk = wt + (int64_t)k * N + n0;
        __m256 wv[2];
        for (int j = 0; j < NV; j++) wv[j] = _mm256_loadu_ps(wk + 8 * j);
        for (int i = 0; i < MB; i++) {
            const __m256 xb = _mm256_broadcast_ss(x + (int64_t)(m0 + i) * K + k);
            for (int j = 0; j < NV; j++) acc[i][j] = _mm256_fmadd_ps(xb, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NV; j++) _mm256_storeu_ps(y + (int64_t)(m0 + i) * N + n0 + 8 * j, acc[i][j]);
}

/* y (M, N) = x (M, K) wt (K, N) + b, wt the weight transposed (N % 8 == 0): a strip of 16 columns
 * of the weight is read once from memory and reused from cache by every block of 4 rows */
static void linear(const float* x, int M, int K, const float* wt, const float* b, int N, float* y) {
    for (int n0 = 0; n0 < N; n0 += 16) {
        const int nv = N - n0 >= 16 ? 2 : 1;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mb = M - m0 >= 4 ? 4 : M - m0;
            /* constant block shapes, so that the accumulators stay in registers */
            if (nv == 2) {
                switch (mb) {
                    case 4: block(x, K, wt, N, b, y, m0, n0, 4, 2); break;
                    case 3: block(x, K, wt, N, b, y, m0, n0, 3, 2); break;
                    case 2: block(x, K, wt, N, b, y, m0, n0, 2, 2); break;
                    default: block(x, K, wt, N, b, y, m0, n0, 1, 2); break;
                }
            } else {
                switch (mb) {
                    case 4: block(x, K, wt, N, b, y, m0, n0, 4, 1); break;
                    case 3: block(x, K, wt, N, b, y, m0, n0, 3, 1); break;
                    case 2: block(x, K, wt, N, b, y, m0, n0, 2, 1); break;
                    default: block(x, K, wt, N, b, y, m0, n0, 1, 1); break;
                }
            }
        }
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w, per row of K */
static void rms_norm(const float* x, int M, int K, const float* w, float eps, float* y) {
    for (int m = 0; m < M; m++) {
        const float* xr = x + (int64_t)m * K;
        float ss = 0.0f;
        for (int k = 0; k < K; k++) ss += xr[k] * xr[k];
        const float r = 1.0f / sqrtf(ss / K + eps);
        for (int k = 0; k < K; k++) y[(int64_t)m * K + k] = xr[k] * r * w[k];
    }
}

/* RoPE of `heads` heads of D at t (row m of a (M, stride) matrix) in place:
 * t * cos + roll(t, D/2) * sin, cos and signed sin (M, D) */
static void rope(float* t, int M, int64_t stride, int heads, int D, const float* cs, const float* sn, float* tmp) {
    const int half = D / 2;
    for (int m = 0; m < M; m++)
        for (int h = 0; h < heads; h++) {
            float* v = t + (int64_t)m * stride + (int64_t)h * D;
            const float* c = cs + (int64_t)m * D;
            const float* s = sn + (int64_t)m * D;
            memcpy(tmp, v, sizeof(float) * (size_t)D);
            int d = 0;
            if (half % 8 == 0)  /* roll(v, D/2): the halves swap */
                for (; d < half; d += 8) {
                    const __m256 lo = _mm256_loadu_ps(tmp + d), hi = _mm256_loadu_ps(tmp + half + d);
                    _mm256_storeu_ps(v + d, _mm256_fmadd_ps(lo, _mm256_loadu_ps(c + d),
                                                            _mm256_mul_ps(hi, _mm256_loadu_ps(s + d))));
                    _mm256_storeu_ps(v + half + d,
                                     _mm256_fmadd_ps(hi, _mm256_loadu_ps(c + half + d),
                                                     _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + d))));
                }
            for (; d < half; d++) {
                v[d] = tmp[d] * c[d] + tmp[half + d] * s[d];
                v[half + d] = tmp[half + d] * c[half + d] + tmp[d] * s[half + d];
            }
        }
}

/* K/V of entry m (H_kv heads of D from rows of y at offset) into a cache buffer of one layer at
 * slot `slot[m]` (plus `base`) of row row[m] */
static void write_kv(const float* y, int M, int64_t stride, int64_t off, int Hkv, int D, float* buf,
                     int64_t rs, int64_t hs, const int64_t* row, const int64_t* slot, int64_t base) {
    for (int m = 0; m < M; m++)
        for (int h = 0; h < Hkv; h++)
            memcpy(buf + row[m] * rs + h * hs + (slot[m] + base) * D, y + m * stride + off + (int64_t)h * D,
                   sizeof(float) * (size_t)D);
}

/* dims: {B, hidden, L, H, Hkv, D, mlp, N (image tokens), Bmax}; text caches (L, Bmax, Hkv, C, D)
 * with C = text_slots; CASA buffers (Lc, Bmax, Hkv, K, D) with K = ca_slots (NULL without);
 * casa_of[l]: the layer's CASA index or -1; entry m: row[m], text slot sa_slot[m] (it sees
 * [0, sa_slot]), window slot ca_slot[m] and n_img[m] image tokens; RoPE tables (B, D) each.
 * x (B, hidden) in place. Returns 0, -1 (no memory), -2 (a row or slot outside its buffer). */
int casa_decode_layers(float* x, const int64_t* dims, const float* const* weights, const int64_t* casa_of,
                       float* text_k, float* text_v, int64_t text_slots, float* ca_k, float* ca_v,
                       int64_t ca_slots, const int64_t* row, const int64_t* sa_slot, const int64_t* ca_slot,
                       const int64_t* n_img, const float* sa_cos, const float* sa_sin, const float* ca_cos,
                       const float* ca_sin, float eps, float scale) {
    const int B = (int)dims[0], E = (int)dims[1], L = (int)dims[2], H = (int)dims[3], Hkv = (int)dims[4];
    const int D = (int)dims[5], F = (int)dims[6];
    const int64_t N = dims[7], Bmax = dims[8];
    const int Q = (H + 2 * Hkv) * D;  /* the fused q|k|v projection's width */
    for (int m = 0; m < B; m++) {
        if (row[m] < 0 || row[m] >= Bmax || sa_slot[m] < 0 || sa_slot[m] >= text_slots) return -2;
        if (ca_k && (ca_slot[m] < 0 || N + ca_slot[m] >= ca_slots || n_img[m] < 0 || n_img[m] > N)) return -2;
    }
    const int64_t ths = text_slots * D, trs = Hkv * ths, tls = Bmax * trs;
    const int64_t chs = ca_slots * D, crs = Hkv * chs, cls = Bmax * crs;
    float* buf = (float*)malloc(sizeof(float) * (size_t)B * (size_t)(E * 3 + 2 * Q + 2 * H * D + 2 * F) +
                                sizeof(float) * (size_t)(D + 2 * (ca_slots > text_slots ? ca_slots : text_slots) + 8));
    int64_t* zero = (int64_t*)calloc((size_t)B, sizeof(int64_t));
    int64_t* ends = (int64_t*)malloc(sizeof(int64_t) * (size_t)B * 3);
    if (!buf || !zero || !ends) {
        free(buf);
        free(zero);
        free(ends);
        return -1;
    }
    float *h = buf, *a = h + B * E, *c = a + B * E, *y = c + B * E, *yc = y + B * Q, *o = yc + B * Q;
    float *oc = o + B * H * D, *gu = oc + B * H * D, *tmp = gu + 2 * B * F;
    int64_t *sa_end = ends, *ca_start = ends + B, *ca_end = ends + 2 * B;
    for (int m = 0; m < B; m++) {
        sa_end[m] = sa_slot[m] + 1;
        ca_start[m] = N;
        ca_end[m] = N + ca_slot[m] + 1;
    }
    int rc = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        const float* const* w = weights + (int64_t)l * LAYER_PTRS;
        rms_norm(x, B, E, w[W_LN1], eps, h);
        linear(h, B, E, w[W_QKV], w[W_QKV_B], Q, y);
        rope(y, B, Q, H + Hkv, D, sa_cos, sa_sin, tmp);
        float* tk = text_k + l * tls;
        float* tv = text_v + l * tls;
        write_kv(y, B, Q, (int64_t)H * D, Hkv, D, tk, trs, ths, row, sa_slot, 0);
        write_kv(y, B, Q, (int64_t)(H + Hkv) * D, Hkv, D, tv, trs, ths, row, sa_slot, 0);
        rc = casa_ragged_decode_attention(y, Q, tk, tv, trs, ths, row, sa_end, zero, zero, o, B, H, Hkv, D,
                                          scale, text_slots, Bmax);
        linear(o, B, H * D, w[W_O], w[W_O_B], E, a);
        const int64_t ci = casa_of[l];
        if (ci >= 0 && ca_k && rc == 0) {
            if (w[W_CQKV]) {  /* its own norm and projections; shared CASA reads the un-rotated y */
                rms_norm(x, B, E, w[W_CNORM], eps, h);
                linear(h, B, E, w[W_CQKV], w[W_CQKV_B], Q, yc);
            } else {
                /* y was rotated in place above: recompute the shared projections */
                rms_norm(x, B, E, w[W_LN1], eps, h);
                linear(h, B, E, w[W_QKV], w[W_QKV_B], Q, yc);
            }
            rope(yc, B, Q, H + Hkv, D, ca_cos, ca_sin, tmp);
            float* ck = ca_k + ci * cls;
            float* cv = ca_v + ci * cls;
            write_kv(yc, B, Q, (int64_t)H * D, Hkv, D, ck, crs, chs, row, ca_slot, N);
            write_kv(yc, B, Q, (int64_t)(H + Hkv) * D, Hkv, D, cv, crs, chs, row, ca_slot, N);
            rc = casa_ragged_decode_attention(yc, Q, ck, cv, crs, chs, row, n_img, ca_start, ca_end, oc, B, H,
                                              Hkv, D, scale, ca_slots, Bmax);
            linear(oc, B, H * D, w[W_CO], w[W_CO_B], E, c);
            for (int64_t i = 0; i < (int64_t)B * E; i++) x[i] = c[i] + (x[i] + a[i]);
        } else {
            for (int64_t i = 0; i < (int64_t)B * E; i++) x[i] = a[i] + x[i];
        }
        rms_norm(x, B, E, w[W_LN2], eps, h);
        linear(h, B, E, w[W_GU], w[W_GU_B], 2 * F, gu);
        for (int m = 0; m < B; m++) {  /* silu(gate) * up = gate / (1 + exp(-gate)) * up */
            float* g = gu + (int64_t)m * 2 * F;
            for (int f = 0; f < F; f += 8) {
                const __m256 gv = _mm256_loadu_ps(g + f);
                const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
                _mm256_storeu_ps(g + f, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(g + F + f)));
            }
        }
        /* silu(gate) * up into the first F columns, packed to (B, F) rows for the down projection */
        for (int m = 1; m < B; m++) memmove(gu + (int64_t)m * F, gu + (int64_t)m * 2 * F, sizeof(float) * (size_t)F);
        linear(gu, B, F, w[W_DN], w[W_DN_B], E, a);
        for (int64_t i = 0; i < (int64_t)B * E; i++) x[i] = x[i] + a[i];
    }
    free(buf);
    free(zero);
    free(ends);
    return rc == 0 ? 0 : rc;
}
