"""C source of the interleaved rotary embedding on CPU (spliced into `moe_mlp_src.SOURCE`, the one CPU kernel
library).

`megaserve_rope`: `engine.model.rope.apply_rope` in one call (about ten tiny torch ops a call at decode sizes):
x [T, rows, d] -> y, the first d - r channels copied, the pairs (2i, 2i+1) of the last r rotated by token t's
cos/sin [T, r/2]: even' = even*cos - odd*sin, odd' = odd*cos + even*sin (sin negated for the inverse). Each
product is rounded, then the sum, as the torch reference's mul + addcmul_ do (no fused multiply-add here).
"""

ROPE_SOURCE = r"""
__attribute__((optimize("fp-contract=off")))
int megaserve_rope(const float *x, const float *cos_t, const float *sin_t, float *y, int64_t T, int64_t rows,
                   int64_t d, int64_t r, int inverse) {
    if (r % 2 || r > d) return -2;
    const int64_t h = r / 2, keep = d - r;
    const float sign = inverse ? -1.0f : 1.0f;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * h, *s = sin_t + t * h;
        for (int64_t q = 0; q < rows; q++) {
            const float *xr = x + (t * rows + q) * d;
            float *yr = y + (t * rows + q) * d;
            memcpy(yr, xr, (size_t)keep * sizeof(float));
            const float *xp = xr + keep;
            float *yp = yr + keep;
            for (int64_t i = 0; i < h; i++) {
                const float e = xp[2 * i], o = xp[2 * i + 1];
                const float ec = e * c[i], oc = o * c[i];
                yp[2 * i] = fmaf(-sign * o, s[i], ec);
                yp[2 * i + 1] = fmaf(sign * e, s[i], oc);
            }
        }
    }
    return 0;
}
"""
