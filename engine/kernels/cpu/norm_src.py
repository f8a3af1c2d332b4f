"""C source of the RMSNorm on CPU (spliced into `moe_mlp_src.SOURCE`, the one CPU kernel library).

`megaserve_rmsnorm`: y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) (* weight), row by row, one call for all rows. The
weight is float32, bfloat16 (the checkpoint's bytes, widened exactly) or absent (the per-head query norm). The
sum of squares is accumulated in double, then the factor is rounded as the torch reference
(`engine.model.layers.RMSNorm`, five tiny ops a call at decode sizes) rounds it: a float norm, squared, over D,
plus eps, reciprocal square root; only the reference's float accumulation of the squares differs.
"""

NORM_SOURCE = r"""
/* wfmt: 0 no weight, 1 float32, 2 bfloat16 (uint16 bits). Returns -2 on a bad wfmt. */
int megaserve_rmsnorm(const float *x, const void *weight, int wfmt, float eps, float *y, int64_t R, int64_t D) {
    if (wfmt < 0 || wfmt > 2) return -2;
    const float *wf = (const float *)weight;
    const uint16_t *wb = (const uint16_t *)weight;
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) ss += (double)xr[d] * xr[d];
        /* the reference's roundings: a float norm, squared, over D, plus eps, then the reciprocal square root */
        const float norm = (float)sqrt(ss);
        const float f = 1.0f / sqrtf(norm * norm / (float)D + eps);
        if (wfmt == 0)
            for (int64_t d = 0; d < D; d++) yr[d] = xr[d] * f;
        else if (wfmt == 1)
            for (int64_t d = 0; d < D; d++) yr[d] = xr[d] * f * wf[d];
        else
            for (int64_t d = 0; d < D; d++) {
                union { uint32_t u; float f; } w = {.u = (uint32_t)wb[d] << 16};
                yr[d] = xr[d] * f * w.f;
            }
    }
    return 0;
}
"""
