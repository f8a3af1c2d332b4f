"""C source of the mHC steps on CPU (spliced into `moe_mlp_src.SOURCE`, the one CPU kernel library, after its
`vf` vector type and `dots_stage2` block, which the mixes below reuse).

`megaserve_mhc_mix`: from the scaled mixes of `engine.model.mhc.hc_pre` to its three outputs, per token, in one
call: the pre and post gates (sigmoids) and the combination matrix (row softmax, then Sinkhorn: one column pass
and iters-1 row + column passes, each `x / (sum + eps)`). The torch code in `engine.model.mhc` is the reference
(one op per pass over all tokens: at decode sizes ~80 tiny ops per call, which this replaces).

    mixes [T, (2+hc)*hc] (flat(h) @ fn^T * rsqrt(mean(flat(h)^2) + eps)), base [(2+hc)*hc], scale [3]
    logits[g, j] = mixes[g*hc + j] * scale[min(g, 2)] + base[g*hc + j]      (g: 0 pre, 1 post, 2.. rows of comb)
    pre[j]  = sigmoid(logits[0, j]) + eps
    post[j] = 2 * sigmoid(logits[1, j])
    comb    = sinkhorn(softmax_j(logits[2 + i, j]) + eps)

The whole of `hc_pre`, `hc_post` and `hc_head` for a few tokens (decode), each one single-threaded call (the
model picks them up to `engine.model.mhc.MHC_FUSED_MAX_TOKENS` tokens; above, torch's GEMM is the faster one):

`megaserve_hc_pre`: the mixes (sum of squares and the (2+hc)*hc dot products of flat h, up to NR tokens against
each pair of fn rows in registers), the gates above, then y = sum_i pre[i] * h_i.
`megaserve_hc_post`: res[j] = post[j] * out + sum_i comb[i, j] * h_i.
`megaserve_hc_head`: the mixes of hc_head's fn [hc, hc*D], pre = sigmoid(mixes * scale[0] + base) + eps, then
y = sum_i pre[i] * h_i (no post, no Sinkhorn).
All return -2 when hc is outside [1, MHC_MAX] and write nothing.
"""

MHC_SOURCE = r"""
#define MHC_MAX 16
#define MHC_MIX_MAX ((2 + MHC_MAX) * MHC_MAX)

/* One token's gates: m [(2+hc)*hc] scaled mixes -> pre [hc], post [hc], comb [hc, hc]. Inlined into
   `mhc_gates` for hc = 4 (V4's) as a constant, so the Sinkhorn loops unroll and vectorise. */
static inline __attribute__((always_inline)) void mhc_gates_hc(const float *m, const float *base,
                                                              const float *scale, const int hc, int iters,
                                                              float eps, float *pre, float *post, float *comb) {
    for (int j = 0; j < hc; j++) {
        pre[j] = 1.0f / (1.0f + expf(-(m[j] * scale[0] + base[j]))) + eps;
        post[j] = 2.0f / (1.0f + expf(-(m[hc + j] * scale[1] + base[hc + j])));
    }
    float c[MHC_MAX][MHC_MAX];
    for (int i = 0; i < hc; i++) {
        const float *mi = m + (2 + i) * hc, *bi = base + (2 + i) * hc;
        float mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j < hc; j++) {
            c[i][j] = mi[j] * scale[2] + bi[j];
            mx = c[i][j] > mx ? c[i][j] : mx;
        }
        for (int j = 0; j < hc; j++) {
            c[i][j] = expf(c[i][j] - mx);
            sum += c[i][j];
        }
        for (int j = 0; j < hc; j++) c[i][j] = c[i][j] / sum + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) /* rows */
            for (int i = 0; i < hc; i++) {
                float s = 0.0f;
                for (int j = 0; j < hc; j++) s += c[i][j];
                s += eps;
                for (int j = 0; j < hc; j++) c[i][j] /= s;
            }
        for (int j = 0; j < hc; j++) { /* columns */
            float s = 0.0f;
            for (int i = 0; i < hc; i++) s += c[i][j];
            s += eps;
            for (int i = 0; i < hc; i++) c[i][j] /= s;
        }
    }
    for (int i = 0; i < hc; i++)
        for (int j = 0; j < hc; j++) comb[i * hc + j] = c[i][j];
}

static void mhc_gates(const float *m, const float *base, const float *scale, int hc, int iters, float eps,
                      float *pre, float *post, float *comb) {
    if (hc == 4)
        mhc_gates_hc(m, base, scale, 4, iters, eps, pre, post, comb);
    else
        mhc_gates_hc(m, base, scale, hc, iters, eps, pre, post, comb);
}

/* Returns -2 when hc is outside [1, MHC_MAX]. */
int megaserve_mhc_mix(const float *mixes, const float *base, const float *scale, int64_t T, int hc, int iters,
                      float eps, float *pre, float *post, float *comb) {
    if (hc < 1 || hc > MHC_MAX) return -2;
    const int64_t width = (int64_t)(2 + hc) * hc;
    for (int64_t t = 0; t < T; t++)
        mhc_gates(mixes + t * width, base, scale, hc, iters, eps, pre + t * hc, post + t * hc, comb + t * hc * hc);
    return 0;
}

/* out[r][a] = dot(w + a * K, x + r * K) for a < nw, r < nr: all nw * nr sums in registers, each w and x vector
   loaded once per step. Instantiated below with compile-time (nw, nr). */
static inline __attribute__((always_inline)) void mhc_block(const float *w, const int nw, const float *x,
                                                           const int nr, const int64_t K,
                                                           float (*out)[MHC_MIX_MAX]) {
    vf acc[8][4];
    for (int a = 0; a < nw; a++)
        for (int r = 0; r < nr; r++) acc[a][r] = (vf){0};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv[4];
        for (int r = 0; r < nr; r++) {
            xv[r] = vload(x + r * K + k);
            PIN(xv[r]); /* one load per vector, not one folded into every FMA (see PIN) */
        }
        for (int a = 0; a < nw; a++) {
            vf wv = vload(w + a * K + k);
            PIN(wv);
            for (int r = 0; r < nr; r++) acc[a][r] += wv * xv[r];
        }
    }
    for (int a = 0; a < nw; a++)
        for (int r = 0; r < nr; r++) {
            float s = hsum(acc[a][r]);
            for (int64_t kk = k; kk < K; kk++) s += w[a * K + kk] * x[r * K + kk];
            out[r][a] = s;
        }
}

/* Tokens per block: blocks of fn rows x tokens are 8 x 1, 4 x nr or 1 x nr (the last rows), at most 16
   accumulators, which AVX-512's 32 registers hold; with 16 registers (AVX2/SSE), at most 4 x 2. */
#if VW == 16
#define MHC_NR 4
#else
#define MHC_NR 2
#endif

/* The scaled mixes of nr <= MHC_NR tokens x [nr, K]: mixes[r][m] = rsqrt(sum_k x[r,k]^2 / K + eps) *
   dot(fn[m], x[r]) for m < n_mix (fn [n_mix, K]). */
static void mhc_mixes(const float *x, const float *fn, int n_mix, int nr, int64_t K, float eps,
                      float (*mixes)[MHC_MIX_MAX]) {
    int m = 0;
#define MHC_ROWS(NW)                                                                                            \
    for (; m + NW <= n_mix; m += NW) switch (nr) {                                                           \
        case 1: mhc_block(fn + m * K, NW, x, 1, K, (float (*)[MHC_MIX_MAX])(mixes[0] + m)); break;            \
        case 2: mhc_block(fn + m * K, NW, x, 2, K, (float (*)[MHC_MIX_MAX])(mixes[0] + m)); break;            \
        MHC_ROWS34(NW)                                                                                       \
        }
#if MHC_NR == 4
#define MHC_ROWS34(NW)                                                                                       \
        case 3: mhc_block(fn + m * K, NW, x, 3, K, (float (*)[MHC_MIX_MAX])(mixes[0] + m)); break;            \
        case 4: mhc_block(fn + m * K, NW, x, 4, K, (float (*)[MHC_MIX_MAX])(mixes[0] + m)); break;
#else
#define MHC_ROWS34(NW)
#endif
    if (nr == 1) MHC_ROWS(8) /* one token: 8 rows at once, so 8 independent sums hide the FMA latency */
    MHC_ROWS(4)
    MHC_ROWS(1)
#undef MHC_ROWS
#undef MHC_ROWS34
    for (int r = 0; r < nr; r++) {
        const float *xr = x + r * K;
        vf acc = (vf){0};
        int64_t k = 0;
        for (; k + VW <= K; k += VW) {
            vf v = vload(xr + k);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; k < K; k++) ss += xr[k] * xr[k];
        const float rs = 1.0f / sqrtf(ss / (float)K + eps);
        for (int i = 0; i < n_mix; i++) mixes[r][i] *= rs;
    }
}

/* y [D] = sum_i pre[i] * h[i, :] for one token's h [hc, D]. */
static void mhc_collapse(const float *h, const float *pre, int hc, int64_t D, float *y) {
    for (int64_t d = 0; d < D; d++) y[d] = pre[0] * h[d];
    for (int i = 1; i < hc; i++) {
        const float p = pre[i], *hi = h + i * D;
        for (int64_t d = 0; d < D; d++) y[d] += p * hi[d];
    }
}

/* hc_pre: h [T, hc, D], fn [(2+hc)*hc, hc*D], base [(2+hc)*hc], scale [3] -> y [T, D], post [T, hc],
   comb [T, hc, hc]. Returns -2 when hc is outside [1, MHC_MAX]. */
int megaserve_hc_pre(const float *h, const float *fn, const float *base, const float *scale, int64_t T, int hc,
                     int64_t D, int iters, float hc_eps, float norm_eps, float *y, float *post, float *comb) {
    if (hc < 1 || hc > MHC_MAX) return -2;
    const int n_mix = (2 + hc) * hc;
    const int64_t K = hc * D;
    float mixes[MHC_NR][MHC_MIX_MAX];
    for (int64_t t0 = 0; t0 < T; t0 += MHC_NR) {
        const int nr = T - t0 < MHC_NR ? (int)(T - t0) : MHC_NR;
        mhc_mixes(h + t0 * K, fn, n_mix, nr, K, norm_eps, mixes);
        for (int r = 0; r < nr; r++) {
            const int64_t t = t0 + r;
            float pre[MHC_MAX];
            mhc_gates(mixes[r], base, scale, hc, iters, hc_eps, pre, post + t * hc, comb + t * hc * hc);
            mhc_collapse(h + t * K, pre, hc, D, y + t * D);
        }
    }
    return 0;
}

/* hc_post: res [T, hc, D] with res[t, j] = post[t, j] * out[t] + sum_i comb[t, i, j] * h[t, i] (h [T, hc, D],
   out [T, D], post [T, hc], comb [T, hc, hc]). Returns -2 when hc is outside [1, MHC_MAX]. */
int megaserve_hc_post(const float *h, const float *out, const float *post, const float *comb, int64_t T, int hc,
                      int64_t D, float *res) {
    if (hc < 1 || hc > MHC_MAX) return -2;
    for (int64_t t = 0; t < T; t++) {
        const float *ht = h + t * hc * D, *ot = out + t * D, *ct = comb + t * hc * hc;
        for (int j = 0; j < hc; j++) {
            float *rj = res + (t * hc + j) * D;
            const float p = post[t * hc + j];
            for (int64_t d = 0; d < D; d++) rj[d] = p * ot[d];
            for (int i = 0; i < hc; i++) {
                const float c = ct[i * hc + j], *hi = ht + i * D;
                for (int64_t d = 0; d < D; d++) rj[d] += c * hi[d];
            }
        }
    }
    return 0;
}

/* hc_head: h [T, hc, D], fn [hc, hc*D], base [hc], scale [1] -> y [T, D] with
   y = sum_i (sigmoid(mixes[i] * scale[0] + base[i]) + hc_eps) * h_i. Returns -2 when hc is outside [1, MHC_MAX]. */
int megaserve_hc_head(const float *h, const float *fn, const float *base, const float *scale, int64_t T, int hc,
                      int64_t D, float hc_eps, float norm_eps, float *y) {
    if (hc < 1 || hc > MHC_MAX) return -2;
    const int64_t K = hc * D;
    float mixes[MHC_NR][MHC_MIX_MAX];
    for (int64_t t0 = 0; t0 < T; t0 += MHC_NR) {
        const int nr = T - t0 < MHC_NR ? (int)(T - t0) : MHC_NR;
        mhc_mixes(h + t0 * K, fn, hc, nr, K, norm_eps, mixes);
        for (int r = 0; r < nr; r++) {
            float pre[MHC_MAX];
            for (int i = 0; i < hc; i++)
                pre[i] = 1.0f / (1.0f + expf(-(mixes[r][i] * scale[0] + base[i]))) + hc_eps;
            mhc_collapse(h + (t0 + r) * K, pre, hc, D, y + (t0 + r) * D);
        }
    }
    return 0;
}
"""
