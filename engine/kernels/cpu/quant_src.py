"""C source of the quantized-weight parts of the CPU kernel library (spliced into `moe_mlp_src.SOURCE`).

Weights stay as the checkpoint stores them and are decoded in registers, one vector of VW values at a time:

- FMT_FP4: MXFP4, two e2m1 values per byte (element 2k in the low nibble), one E8M0 scale per 32 values of a
  row: row r of a [R, K] matrix is K/2 bytes at r*K/2, its scales K/32 entries at r*K/32.
- FMT_FP8: e4m3fn, one byte per value, one scale per 128x128 block: scale [ceil(R/128), ceil(K/128)].
- FMT_BF16: bfloat16, no scale.

Scales (SC_E8M0: one byte, 2^(b-127); SC_F32: float32) multiply the decoded values. A decoded value is exact
in float32, so a dot product differs from the dequantized reference only in summation order.

Entry points (each trusts the shapes the Python wrapper checked; K must be a multiple of 32):
- megaserve_moe_mlp_q: the routed-expert MLP of `moe_mlp` with quantized w1/w3/w2 (stacked [S, I, D] /
  [S, D, I] in the format above, scales stacked likewise); same threads and stages as the fp32 kernel.
- megaserve_qlinear: y [M, N] = x [M, K] @ W^T for a quantized W [N, K] (stage 2 of the MLP with one
  "expert": every weight row is read once per call for up to NR activation rows at a time).
- megaserve_dequant: W [N, K] -> float32 (prefill: dequantize one expert or tile, then the BLAS).
"""

QUANT_SOURCE = r"""
#define FMT_F32 0
#define FMT_FP4 1
#define FMT_FP8 2
#define FMT_BF16 3
#define SC_E8M0 0
#define SC_F32 1

typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

/* A scale entry as float: E8M0 byte b is 2^(b-127) (b = 0 is the subnormal 2^-127), or a float32. */
static inline float scale_at(const uint8_t *sc, int sfmt, int64_t idx) {
    if (sfmt == SC_F32) {
        float f;
        memcpy(&f, sc + 4 * idx, 4);
        return f;
    }
    const uint32_t b = sc[idx];
    const uint32_t bits = b ? b << 23 : 1u << 22;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* VW e2m1 codes (0..15) -> float: magnitude code 2e+m is (1 + m/2) 2^(e-1) for e > 0, m/2 for e = 0.
   With 16 or 8 lanes a table lookup in registers (one vpermps / two), else arithmetic. */
static inline vf fp4_decode(vu c) {
#if VW == 16
    const vf tab = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    return __builtin_shuffle(tab, (vi)c);
#elif VW == 8
    const vf lo = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return __builtin_shuffle(lo, -lo, (vi)c);
#else
    const vu e = (c >> 1) & 3, m = c & 1;
    const vu normal = ((e + 126) << 23) | (m << 22);
    const vu sub = m * (126u << 23); /* 0.5 or 0 */
    const vu isn = (vu)(e != 0);
    const vu bits = (normal & isn) | (sub & ~isn) | ((c & 8) << 28);
    return (vf)bits;
#endif
}

/* VW e4m3fn bytes -> float: (1 + m/8) 2^(e-7) for e > 0, m 2^-9 for e = 0 (no NaN in weights). The portable
   version; with F16C (AVX2 / AVX-512) `fp8_decode_scaled` below places the bits in half precision instead. */
static inline vf fp8_decode(vu c) {
    const vu e = (c >> 3) & 15, m = c & 7;
    const vu normal = ((e + 120) << 23) | (m << 20);
    const vf subf = __builtin_convertvector(m, vf) * (1.0f / 512.0f);
    const vu isn = (vu)(e != 0);
    const vu bits = (normal & isn) | ((vu)subf & ~isn) | ((c & 0x80) << 24);
    return (vf)bits;
}

/* Widening loads: VW bytes / VW uint16 -> VW uint32 lanes; and the VW nibbles of VW/2 bytes, in element order
   (low nibble first). With AVX2/AVX-512 one or two instructions each; elsewhere a scalar fill. */
#if defined(__AVX512F__) && VW == 16
#include <immintrin.h>
static inline vu widen_u8(const uint8_t *p) { return (vu)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vu widen_u16(const uint8_t *p) {
    return (vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
}
static inline vu nibbles(const uint8_t *p) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(15);
    return (vu)_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m)));
}
#elif defined(__AVX2__) && VW == 8
#include <immintrin.h>
static inline vu widen_u8(const uint8_t *p) { return (vu)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vu widen_u16(const uint8_t *p) { return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vu nibbles(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    const __m128i b = _mm_cvtsi32_si128(w), m = _mm_set1_epi8(15);
    return (vu)_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m)));
}
#else
static inline vu widen_u8(const uint8_t *p) {
    vu v;
    for (int l = 0; l < VW; l++) v[l] = p[l];
    return v;
}
static inline vu widen_u16(const uint8_t *p) {
    vu v;
    for (int l = 0; l < VW; l++) v[l] = (uint32_t)p[2 * l] | (uint32_t)p[2 * l + 1] << 8;
    return v;
}
static inline vu nibbles(const uint8_t *p) {
    vu v;
    for (int l = 0; l < VW; l++) v[l] = (p[l / 2] >> (4 * (l & 1))) & 15;
    return v;
}
#endif

/* Values k..k+VW-1 of one weight row `p`, times `scale`: the factor of their scale group as `group_scale_*`
   returns it (FP4: 32 values share an E8M0 scale; FP8: 128 values of a row share the scale of their 128 x 128
   block; BF16: no scale). The dot products read a group's scale once, not once per vector. */
static inline vf load_fp4(const uint8_t *p, int64_t k, float scale) { return fp4_decode(nibbles(p + k / 2)) * scale; }

#if defined(__AVX512F__) && VW == 16
/* e4m3 bits s.eeee.mmm placed as half-precision bits s.0eeee.mmm0000000 are the same value times 2^-8 (the
   exponent biases are 15 and 7), subnormals included (they become half subnormals, which the hardware conversion
   widens exactly): in 16-bit lanes (b << 8) shifted right arithmetically by one copies the sign into bit 14,
   which the mask clears; then one conversion per VW values. The 2^8 is in the group's scale. */
static inline vf load_fp8(const uint8_t *p, int64_t k, float scale) {
    const __m256i b = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + k))), 8);
    const __m256i h = _mm256_and_si256(_mm256_srai_epi16(b, 1), _mm256_set1_epi16((short)0xBFFF));
    return (vf)_mm512_cvtph_ps(h) * scale;
}
#define FP8_HALF_SCALE 256.0f
#elif defined(__AVX2__) && defined(__F16C__) && VW == 8
static inline vf load_fp8(const uint8_t *p, int64_t k, float scale) {
    const __m128i b = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(p + k))), 8);
    const __m128i h = _mm_and_si128(_mm_srai_epi16(b, 1), _mm_set1_epi16((short)0xBFFF));
    return (vf)_mm256_cvtph_ps(h) * scale;
}
#define FP8_HALF_SCALE 256.0f
#else
static inline vf load_fp8(const uint8_t *p, int64_t k, float scale) { return fp8_decode(widen_u8(p + k)) * scale; }
#define FP8_HALF_SCALE 1.0f
#endif

static inline vf load_bf16(const uint8_t *p, int64_t k, float scale) {
    (void)scale;
    return (vf)(widen_u16(p + 2 * k) << 16);
}

/* The factor applied to the values of the scale group starting at value k of a row. */
static inline float group_scale_fp4(const uint8_t *sc, int sfmt, int64_t k) { return scale_at(sc, sfmt, k >> 5); }
static inline float group_scale_fp8(const uint8_t *sc, int sfmt, int64_t k) {
    return scale_at(sc, sfmt, k >> 7) * FP8_HALF_SCALE;
}
static inline float group_scale_bf16(const uint8_t *sc, int sfmt, int64_t k) {
    (void)sc;
    (void)sfmt;
    (void)k;
    return 1.0f;
}

/* One weight row: its bytes and the scales of its row (FP8: of its 128-row block). */
typedef struct {
    const uint8_t *p, *sc;
} wrow;

/* Row r of matrix s of a stack of [R, K] matrices in format fmt. */
static inline wrow qrow(int fmt, int sfmt, const uint8_t *base, const uint8_t *sbase, int64_t s, int64_t r,
                        int64_t R, int64_t K) {
    const int64_t ssz = sfmt == SC_F32 ? 4 : 1;
    wrow w = {0, 0};
    if (fmt == FMT_FP4) {
        w.p = base + (s * R + r) * (K / 2);
        w.sc = sbase + (s * R + r) * (K / 32) * ssz;
    } else if (fmt == FMT_FP8) {
        const int64_t rb = (R + 127) / 128, kb = (K + 127) / 128;
        w.p = base + (s * R + r) * K;
        w.sc = sbase + ((s * rb + r / 128) * kb) * ssz;
    } else {
        w.p = base + (s * R + r) * K * 2;
    }
    return w;
}

/* out[a * NRMAX + r] = sum_k w[a][k] * x[r * ldx + k] for a < nw, r < nr (K % (2 * VW) == 0), the weights read in
   scale groups of GROUP values (their scale read once per group); the next weight block (pf bytes on) is
   prefetched as the rows are read. */
#define FEW_ROWS 3 /* up to this many activation rows the dot products keep two accumulator sets */

#define DEF_DOTSQ(NAME, LOAD, SCALE, GROUP, BYTES_PER_VEC)                                                        \
    static inline __attribute__((always_inline)) void NAME(const wrow *w, const int nw, const int sfmt,          \
                                                           const float *x, const int64_t ldx, const int nr,      \
                                                           const int64_t K, const int64_t pf, float *out) {      \
        vf acc[NWMAX][NRMAX], odd[NWMAX][FEW_ROWS];                                                              \
        for (int a = 0; a < nw; a++)                                                                             \
            for (int r = 0; r < nr; r++) acc[a][r] = (vf){0};                                                    \
        for (int a = 0; a < nw; a++)                                                                             \
            for (int r = 0; r < FEW_ROWS; r++) odd[a][r] = (vf){0};                                              \
        for (int64_t g = 0; g < K; g += (GROUP)) {                                                               \
            float sg[NWMAX];                                                                                     \
            for (int a = 0; a < nw; a++) sg[a] = SCALE(w[a].sc, sfmt, g);                                        \
            const int64_t gend = g + (GROUP) < K ? g + (GROUP) : K;                                              \
            if (nr <= FEW_ROWS) { /* few rows: a second set of accumulators (odd vectors) hides FMA latency */   \
                for (int64_t k = g; k < gend; k += 2 * VW) {                                                     \
                    vf w0[NWMAX], w1[NWMAX];                                                                     \
                    for (int a = 0; a < nw; a++) {                                                               \
                        w0[a] = LOAD(w[a].p, k, sg[a]);                                                          \
                        w1[a] = LOAD(w[a].p, k + VW, sg[a]);                                                     \
                    }                                                                                            \
                    if (pf && (k % (64 * VW / BYTES_PER_VEC)) == 0)                                              \
                        for (int a = 0; a < nw; a++)                                                             \
                            __builtin_prefetch(w[a].p + pf + k * BYTES_PER_VEC / VW, 0, PFL);                    \
                    for (int r = 0; r < nr; r++) {                                                               \
                        const vf x0 = vload(x + r * ldx + k), x1 = vload(x + r * ldx + k + VW);                  \
                        for (int a = 0; a < nw; a++) {                                                           \
                            acc[a][r] += w0[a] * x0;                                                             \
                            odd[a][r] += w1[a] * x1;                                                             \
                        }                                                                                        \
                    }                                                                                            \
                }                                                                                                \
                continue;                                                                                        \
            }                                                                                                    \
            for (int64_t k = g; k < gend; k += VW) {                                                             \
                vf wv[NWMAX];                                                                                    \
                for (int a = 0; a < nw; a++) wv[a] = LOAD(w[a].p, k, sg[a]);                                     \
                if (pf && (k % (64 * VW / BYTES_PER_VEC)) == 0)                                                  \
                    for (int a = 0; a < nw; a++) __builtin_prefetch(w[a].p + pf + k * BYTES_PER_VEC / VW, 0, PFL); \
                for (int r = 0; r < nr; r++) {                                                                   \
                    vf xv = vload(x + r * ldx + k);                                                              \
                    PIN(xv);                                                                                     \
                    for (int a = 0; a < nw; a++) acc[a][r] += wv[a] * xv;                                        \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        if (nr <= FEW_ROWS)                                                                                      \
            for (int a = 0; a < nw; a++)                                                                         \
                for (int r = 0; r < nr; r++) acc[a][r] += odd[a][r];                                             \
        for (int a = 0; a < nw; a++)                                                                             \
            for (int r = 0; r < nr; r++) out[a * NRMAX + r] = hsum(acc[a][r]);                                   \
    }

DEF_DOTSQ(dots_fp4, load_fp4, group_scale_fp4, 32, (VW / 2))
DEF_DOTSQ(dots_fp8, load_fp8, group_scale_fp8, 128, VW)
DEF_DOTSQ(dots_bf16, load_bf16, group_scale_bf16, K, (VW * 2))

/* FP4 with AVX-512: the dot products read the activations "split" per 32-value scale group (its 16 even values,
   then its 16 odd ones; `fp4_pos`), so the 16 bytes of a group widen once into 16 lanes whose low nibbles are the
   even values and whose high nibbles (shifted down) the odd ones: two table lookups (vpermps reads the low 4 bits
   of each lane) in the group's scaled table, no interleaving of nibbles. The entry points split x (and stage 1
   writes `a` split) when the format is FP4. */
#if defined(__AVX512F__) && VW == 16
#define FP4_SPLIT 1
static inline int64_t fp4_pos(int64_t i) { return (i & ~(int64_t)31) | ((i & 1) << 4) | ((i & 31) >> 1); }

static void fp4_split_rows(const float *src, float *dst, int64_t n, int64_t K) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < K; i++) dst[r * K + fp4_pos(i)] = src[r * K + i];
}

static inline __attribute__((always_inline)) void dots_fp4_split(const wrow *w, const int nw, const int sfmt,
                                                                 const float *x, const int64_t ldx, const int nr,
                                                                 const int64_t K, const int64_t pf, float *out) {
    const vf tab = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    vf acc[NWMAX][NRMAX], odd[NWMAX][FEW_ROWS]; /* odd values: own accumulators for few rows (FMA latency) */
    for (int a = 0; a < nw; a++)
        for (int r = 0; r < nr; r++) acc[a][r] = (vf){0};
    for (int a = 0; a < nw; a++)
        for (int r = 0; r < FEW_ROWS; r++) odd[a][r] = (vf){0};
    for (int64_t g = 0; g < K; g += 32) {
        vf we[NWMAX], wo[NWMAX];
        for (int a = 0; a < nw; a++) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w[a].p + g / 2)));
            const vf t = tab * scale_at(w[a].sc, sfmt, g >> 5);
            we[a] = (vf)_mm512_permutexvar_ps(b, (__m512)t);
            wo[a] = (vf)_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), (__m512)t);
        }
        if (pf && (g % 128) == 0)
            for (int a = 0; a < nw; a++) __builtin_prefetch(w[a].p + pf + g / 2, 0, PFL);
        for (int r = 0; r < nr; r++) {
            vf xe = vload(x + r * ldx + g), xo = vload(x + r * ldx + g + 16);
            PIN(xe);
            PIN(xo);
            for (int a = 0; a < nw; a++) {
                acc[a][r] += we[a] * xe;
                if (nr <= FEW_ROWS) odd[a][r] += wo[a] * xo;
                else acc[a][r] += wo[a] * xo;
            }
        }
    }
    if (nr <= FEW_ROWS)
        for (int a = 0; a < nw; a++)
            for (int r = 0; r < nr; r++) acc[a][r] += odd[a][r];
    for (int a = 0; a < nw; a++)
        for (int r = 0; r < nr; r++) out[a * NRMAX + r] = hsum(acc[a][r]);
}
#endif

#define QCALL(F, NW, NRC) case NRC: F(w, NW, sfmt, x, ldx, NRC, K, pf, out); break;
#define QROWS_6(F, NW) QCALL(F, NW, 1) QCALL(F, NW, 2) QCALL(F, NW, 3) QCALL(F, NW, 4) QCALL(F, NW, 5) QCALL(F, NW, 6)
#define QROWS_12(F, NW) QROWS_6(F, NW) QCALL(F, NW, 7) QCALL(F, NW, 8) QCALL(F, NW, 9) QCALL(F, NW, 10) \
    QCALL(F, NW, 11) QCALL(F, NW, 12)
#if NR == 12
#define QROWS QROWS_12
#else
#define QROWS QROWS_6
#endif
#define QFMT(F)                                \
    if (nw == 2) {                             \
        switch (nr) { QROWS(F, 2) }            \
    } else {                                   \
        switch (nr) { QROWS(F, 1) }            \
    }

static void dotsq(int fmt, const wrow *w, int nw, int sfmt, const float *x, int64_t ldx, int nr, int64_t K,
                  int64_t pf, float *out) {
    if (fmt == FMT_FP4) {
#ifdef FP4_SPLIT
        QFMT(dots_fp4_split)
#else
        QFMT(dots_fp4)
#endif
    } else if (fmt == FMT_FP8) {
        QFMT(dots_fp8)
    } else {
        QFMT(dots_bf16)
    }
}

static inline int64_t row_bytes(int fmt, int64_t K) { return fmt == FMT_FP4 ? K / 2 : fmt == FMT_FP8 ? K : 2 * K; }

/* Stage 1 for expert s, weight rows [i0, i1): a = route_w * swiglu(x W1^T, x W3^T), quantized W1/W3. */
static void stage1q(const job_t *j, int64_t s, int64_t i0, int64_t i1) {
    const int64_t D = j->D, I = j->I;
    const int64_t r0 = j->off[s], n = j->off[s + 1] - r0;
    const int64_t pf = PFB * row_bytes(j->fmt, D);
    float out[NWMAX * NRMAX];
    for (int64_t rc = 0; rc < n; rc += RC) {
        const int64_t nrc = n - rc < RC ? n - rc : RC;
        for (int64_t i = i0; i < i1; i++) {
            const wrow w[2] = {qrow(j->fmt, j->sfmt, j->q1, j->s1, s, i, I, D),
                               qrow(j->fmt, j->sfmt, j->q3, j->s3, s, i, I, D)};
#ifdef FP4_SPLIT
            const int64_t ia = j->fmt == FMT_FP4 ? fp4_pos(i) : i; /* stage 2 reads `a` split too */
#else
            const int64_t ia = i;
#endif
            for (int64_t r = 0; r < nrc; r += NR) {
                const int nr = nrc - r < NR ? (int)(nrc - r) : NR;
                const int64_t row = r0 + rc + r;
                dotsq(j->fmt, w, 2, j->sfmt, j->x + row * D, D, nr, D, r == 0 ? pf : 0, out);
                for (int rr = 0; rr < nr; rr++)
                    j->a[(row + rr) * I + ia] = swiglu(out[rr], out[NRMAX + rr], j->limit) * j->route_w[row + rr];
            }
        }
    }
}

/* Stage 2 for expert s, output columns [d0, d1): y = a W2^T, quantized W2 (also the quantized linear). */
static void stage2q(const job_t *j, int64_t s, int64_t d0, int64_t d1) {
    const int64_t D = j->D, I = j->I;
    const int64_t r0 = j->off[s], n = j->off[s + 1] - r0;
    const int64_t pf = PFB * DB * row_bytes(j->fmt, I);
    float out[NWMAX * NRMAX];
    for (int64_t rc = 0; rc < n; rc += RC) {
        const int64_t nrc = n - rc < RC ? n - rc : RC;
        for (int64_t d = d0; d < d1; d += DB) {
            const int nd = d1 - d >= DB ? DB : (int)(d1 - d);
            wrow w[NWMAX];
            for (int q = 0; q < nd; q++) w[q] = qrow(j->fmt, j->sfmt, j->q2, j->s2, s, d + q, D, I);
            for (int64_t r = 0; r < nrc; r += NR) {
                const int nr = nrc - r < NR ? (int)(nrc - r) : NR;
                const int64_t row = r0 + rc + r;
                dotsq(j->fmt, w, nd, j->sfmt, j->a + row * I, I, nr, I, r == 0 ? pf : 0, out);
                for (int q = 0; q < nd; q++)
                    for (int rr = 0; rr < nr; rr++) j->y[(row + rr) * D + d + q] = out[q * NRMAX + rr];
            }
        }
    }
}
"""

QUANT_ENTRIES = r"""
#ifdef FP4_SPLIT
#define FP4_SPLIT_ON 1
#else
#define FP4_SPLIT_ON 0
#endif

/* FP4 with FP4_SPLIT: a split copy of the activations x [n, K] (NULL when malloc fails); else NULL (x as is). */
static float *split_input(const float *x, int fmt, int64_t n, int64_t K) {
#ifdef FP4_SPLIT
    if (fmt == FMT_FP4) {
        float *xs = malloc((size_t)(n * K) * sizeof(float));
        if (xs) fp4_split_rows(x, xs, n, K);
        return xs;
    }
#endif
    (void)x, (void)fmt, (void)n, (void)K;
    return NULL;
}

/* The routed-expert MLP over quantized weights; returns -1 on bad offsets, -2 on a bad format. */
int megaserve_moe_mlp_q(const float *x, const int64_t *off, const float *route_w, const uint8_t *w1,
                        const uint8_t *s1, const uint8_t *w3, const uint8_t *s3, const uint8_t *w2, const uint8_t *s2,
                        int fmt, int sfmt, float *a, float *y, int64_t N, int64_t S, int64_t D, int64_t I, float limit,
                        int nthreads) {
    if (fmt != FMT_FP4 && fmt != FMT_FP8 && fmt != FMT_BF16) return -2;
    if (check_offsets(off, S, N)) return -1;
    if (N == 0) return 0;
    float *xs = split_input(x, fmt, N, D);
    if (fmt == FMT_FP4 && FP4_SPLIT_ON && !xs) return -3;
    job_t j = {.x = xs ? xs : x, .route_w = route_w, .q1 = w1, .q3 = w3, .q2 = w2, .s1 = s1, .s3 = s3, .s2 = s2,
               .off = off, .a = a, .y = y, .S = S, .D = D, .I = I, .limit = limit, .nthreads = 1, .parts = 1,
               .fmt = fmt, .sfmt = sfmt, .stages = 3};
    run_job(&j, useful_threads(off, S, N, D, I, nthreads));
    free(xs);
    return 0;
}

/* The routed experts straight from the router, for few tokens (decode): x [T, D], slot [T*k] (the local slot of
   each assignment; < 0 or >= S: not held here, skipped), route_w [T*k] -> y [T, D] = the sum over the held
   assignments of route_w * Expert_slot(x_t). The assignments are grouped by slot here (a stable counting sort),
   run through the same MLP as megaserve_moe_mlp(_q) and summed back per token in grouped order (what sorting,
   the MLP and an index_add would give). fmt FMT_F32: float32 weights (no scales). Returns -2 on a bad format,
   -3 when out of memory. */
int megaserve_moe_topk(const float *x, const int64_t *slot, const float *route_w, const void *w1, const uint8_t *s1,
                       const void *w3, const uint8_t *s3, const void *w2, const uint8_t *s2, int fmt, int sfmt,
                       float *y, int64_t T, int64_t k, int64_t S, int64_t D, int64_t I, float limit, int nthreads) {
    if (fmt != FMT_F32 && fmt != FMT_FP4 && fmt != FMT_FP8 && fmt != FMT_BF16) return -2;
    const int64_t A = T * k;
    int64_t *off = calloc((size_t)(S + 2), sizeof(int64_t));
    if (!off) return -3;
    for (int64_t r = 0; r < A; r++)
        if (slot[r] >= 0 && slot[r] < S) off[slot[r] + 2]++;
    for (int64_t s = 0; s < S; s++) off[s + 2] += off[s + 1];  /* off[s + 1]: first row of slot s */
    const int64_t N = off[S + 1];
    memset(y, 0, (size_t)(T * D) * sizeof(float));
    if (N == 0) { free(off); return 0; }
    int64_t *tok = malloc((size_t)N * sizeof(int64_t));
    float *rw = malloc((size_t)N * sizeof(float)), *xs = malloc((size_t)(N * D) * sizeof(float));
    float *a = malloc((size_t)(N * I) * sizeof(float)), *ys = malloc((size_t)(N * D) * sizeof(float));
    int rc = (tok && rw && xs && a && ys) ? 0 : -3;
    if (rc == 0) {
        for (int64_t r = 0; r < A; r++) {  /* stable: assignments of a slot keep their order */
            const int64_t s = slot[r];
            if (s < 0 || s >= S) continue;
            const int64_t row = off[s + 1]++;
            tok[row] = r / k;
            rw[row] = route_w[r];
            memcpy(xs + row * D, x + (r / k) * D, (size_t)D * sizeof(float));
        }
        /* off[s + 1] now ends slot s: off[0..S] are the offsets */
        rc = fmt == FMT_F32
                 ? megaserve_moe_mlp(xs, off, rw, w1, w3, w2, a, ys, N, S, D, I, limit, nthreads)
                 : megaserve_moe_mlp_q(xs, off, rw, w1, s1, w3, s3, w2, s2, fmt, sfmt, a, ys, N, S, D, I, limit,
                                       nthreads);
        if (rc == 0)
            for (int64_t row = 0; row < N; row++) {
                float *dst = y + tok[row] * D;
                const float *src = ys + row * D;
                for (int64_t d = 0; d < D; d++) dst[d] += src[d];
            }
    }
    free(off), free(tok), free(rw), free(xs), free(a), free(ys);
    return rc;
}

/* y [M, N] = x [M, K] @ W^T, W [N, K] quantized; returns -2 on a bad format. */
int megaserve_qlinear(const float *x, const uint8_t *w, const uint8_t *s, int fmt, int sfmt, float *y, int64_t M,
                      int64_t N, int64_t K, int nthreads) {
    if (fmt != FMT_FP4 && fmt != FMT_FP8 && fmt != FMT_BF16) return -2;
    if (M == 0) return 0;
    const int64_t off[2] = {0, M};
    float *xs = split_input(x, fmt, M, K);
    if (fmt == FMT_FP4 && FP4_SPLIT_ON && !xs) return -3;
    job_t j = {.a = xs ? xs : (float *)x, .q2 = w, .s2 = s, .off = off, .y = y, .S = 1, .D = N, .I = K,
               .nthreads = 1, .parts = 1, .fmt = fmt, .sfmt = sfmt, .stages = 2};
    run_job(&j, useful_threads(off, 1, M, N, K / 3 + 1, nthreads));
    free(xs);
    return 0;
}

/* out [N, K] float32 = the values of W [N, K] (one matrix; its scales as for one expert). */
static void dequant_rows(const uint8_t *w, const uint8_t *s, int fmt, int sfmt, float *out, int64_t N, int64_t K,
                         int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const wrow row = qrow(fmt, sfmt, w, s, 0, r, N, K);
        for (int64_t k = 0; k < K; k += VW) {
            const vf v = fmt == FMT_FP4 ? load_fp4(row.p, k, group_scale_fp4(row.sc, sfmt, k))
                       : fmt == FMT_FP8 ? load_fp8(row.p, k, group_scale_fp8(row.sc, sfmt, k))
                                        : load_bf16(row.p, k, 1.0f);
            memcpy(out + r * K + k, &v, sizeof v);
        }
    }
}

/* Rows split over `nthreads` threads of torch's OpenMP pool (the OpenMP build; the pthread build runs on the
   calling thread). One thread alone ran 3-5x slower in some processes while the BLAS's idle OpenMP workers spun
   beside it; sharing the work also halves the time where it did not. */
int megaserve_dequant(const uint8_t *w, const uint8_t *s, int fmt, int sfmt, float *out, int64_t N, int64_t K,
                      int nthreads) {
    if (fmt != FMT_FP4 && fmt != FMT_FP8 && fmt != FMT_BF16) return -2;
#ifdef MEGASERVE_OMP
    const int T = nthreads < 1 ? 1 : nthreads > MAXT ? MAXT : nthreads;
    if (T > 1 && N * K >= 65536) {
#pragma omp parallel num_threads(T)
        {
            const int t = omp_get_thread_num(), n = omp_get_num_threads();
            dequant_rows(w, s, fmt, sfmt, out, N, K, N * t / n, N * (t + 1) / n);
        }
        return 0;
    }
#else
    (void)nthreads;
#endif
    dequant_rows(w, s, fmt, sfmt, out, N, K, 0, N);
    return 0;
}
"""
