"""C source of the mHC mixing step on CPU (spliced into `moe_mlp_src.SOURCE`, the one CPU kernel library).

`megaserve_mhc_mix`: from the scaled mixes of `engine.model.mhc.hc_pre` to its three outputs, per token, in one
call: the pre and post gates (sigmoids) and the combination matrix (row softmax, then Sinkhorn: one column pass
and iters-1 row + column passes, each `x / (sum + eps)`). The torch code in `engine.model.mhc` is the reference
(one op per pass over all tokens: at decode sizes ~80 tiny ops per call, which this replaces).

    mixes [T, (2+hc)*hc] (flat(h) @ fn^T * rsqrt(mean(flat(h)^2) + eps)), base [(2+hc)*hc], scale [3]
    logits[g, j] = mixes[g*hc + j] * scale[min(g, 2)] + base[g*hc + j]      (g: 0 pre, 1 post, 2.. rows of comb)
    pre[j]  = sigmoid(logits[0, j]) + eps
    post[j] = 2 * sigmoid(logits[1, j])
    comb    = sinkhorn(softmax_j(logits[2 + i, j]) + eps)
"""

MHC_SOURCE = r"""
#define MHC_MAX 16

/* Returns -2 when hc is outside [1, MHC_MAX]. */
int megaserve_mhc_mix(const float *mixes, const float *base, const float *scale, int64_t T, int hc, int iters,
                      float eps, float *pre, float *post, float *comb) {
    if (hc < 1 || hc > MHC_MAX) return -2;
    const int64_t width = (int64_t)(2 + hc) * hc;
    for (int64_t t = 0; t < T; t++) {
        const float *m = mixes + t * width;
        for (int j = 0; j < hc; j++) {
            pre[t * hc + j] = 1.0f / (1.0f + expf(-(m[j] * scale[0] + base[j]))) + eps;
            post[t * hc + j] = 2.0f / (1.0f + expf(-(m[hc + j] * scale[1] + base[hc + j])));
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
        float *out = comb + t * hc * hc;
        for (int i = 0; i < hc; i++)
            for (int j = 0; j < hc; j++) out[i * hc + j] = c[i][j];
    }
    return 0;
}
"""
