"""C source of V4's attention core for one query per sequence on CPU (spliced into `moe_mlp_src.SOURCE`, the one
CPU kernel library; `vf`, `vload` and `hsum` come from its head).

`megaserve_attn_decode`: `engine.model.attention.Attention._core` for n = 1 (decode) in one call, which in torch
is about fifteen small ops a layer. For each sequence b and head h: the scores s_j = scale * q.k_j over the
visible keys of up to two blocks (K = V), one softmax over them with the head's sink logit in the denominator,
and o = sum_j p_j k_j. The sums run in another order than torch's bmm/softmax (rounding-level differences).

    q [B, H, d]; block i: keys [B, L_i, d], visible uint8 [B, L_i] or NULL (all visible); sink [H]; o [B, H, d]
"""

ATTN_SOURCE = r"""
static inline float dot_vf(const float *a, const float *b, int64_t d) {
    vf acc = {0};
    int64_t k = 0;
    for (; k + VW <= d; k += VW) acc += vload(a + k) * vload(b + k);
    float s = hsum(acc);
    for (; k < d; k++) s += a[k] * b[k];
    return s;
}

/* Returns -3 when out of memory. */
int megaserve_attn_decode(const float *q, const float *k0, const uint8_t *m0, int64_t L0, const float *k1,
                          const uint8_t *m1, int64_t L1, const float *sink, float scale, float *o, int64_t B,
                          int64_t H, int64_t d) {
    const int64_t L = L0 + L1;
    float *p = malloc((size_t)(L > 0 ? L : 1) * sizeof(float));
    if (!p) return -3;
    for (int64_t b = 0; b < B; b++) {
        const float *keys[2] = {k0 + b * L0 * d, k1 ? k1 + b * L1 * d : NULL};
        const uint8_t *vis[2] = {m0 ? m0 + b * L0 : NULL, m1 ? m1 + b * L1 : NULL};
        const int64_t len[2] = {L0, L1};
        for (int64_t h = 0; h < H; h++) {
            const float *qh = q + (b * H + h) * d;
            float mx = sink[h];
            int64_t at = 0;
            for (int blk = 0; blk < 2; blk++)
                for (int64_t j = 0; j < len[blk]; j++, at++) {
                    if (vis[blk] && !vis[blk][j]) { p[at] = -INFINITY; continue; }
                    p[at] = dot_vf(qh, keys[blk] + j * d, d) * scale;
                    mx = p[at] > mx ? p[at] : mx;
                }
            float sum = expf(sink[h] - mx);
            for (int64_t j = 0; j < L; j++) {
                p[j] = p[j] == -INFINITY ? 0.0f : expf(p[j] - mx);
                sum += p[j];
            }
            float *oh = o + (b * H + h) * d;
            memset(oh, 0, (size_t)d * sizeof(float));
            at = 0;
            for (int blk = 0; blk < 2; blk++)
                for (int64_t j = 0; j < len[blk]; j++, at++) {
                    if (p[at] == 0.0f) continue;
                    const float w = p[at] / sum, *kj = keys[blk] + j * d;
                    int64_t k = 0;
                    for (; k + VW <= d; k += VW) {
                        vf acc = vload(oh + k) + w * vload(kj + k);
                        memcpy(oh + k, &acc, sizeof acc);
                    }
                    for (; k < d; k++) oh[k] += w * kj[k];
                }
        }
    }
    free(p);
    return 0;
}
"""
