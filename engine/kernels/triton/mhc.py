"""The mHC gate kernel (imports triton: import this module only through `engine.kernels.triton`).

One launch computes, per token, everything `engine.model.mhc.hc_pre` derives from the mixes (the normalised
projection of the hc streams) before the collapse:

    logits = mixes * scale[group] + base           (groups: pre, post, the hc rows of comb)
    pre    = sigmoid(logits_pre) + hc_eps           [hc]
    post   = 2 * sigmoid(logits_post)               [hc]
    comb   = Sinkhorn(softmax_rows(logits_comb) + hc_eps, iters, hc_eps)      [hc, hc]

Each program takes BLOCK_T tokens; a token's hc x hc matrix lives in registers through every Sinkhorn pass
(HC_P = hc rounded up to a power of two; padded entries are held at 0, so they add nothing to any sum). The
divisions are IEEE round-to-nearest (`div_rn`), as torch's.

`mhc_post_kernel` is `hc_post`'s write-back, y_j = post_j * out + sum_i comb[i, j] * h_i, one launch over
(token, BLOCK_D columns): the hc streams of h in registers, fp32 math, one rounding to y's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mhc_gates_kernel(
    mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr,
    T, stride_mt, stride_mc, hc_eps,
    ITERS: tl.constexpr, HC: tl.constexpr, HC_P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, HC_P)
    row_ok = rows < T
    col_ok = cols < HC
    s_pre = tl.load(scale_ptr)
    s_post = tl.load(scale_ptr + 1)
    s_comb = tl.load(scale_ptr + 2)

    # pre, post: [BLOCK_T, HC_P]
    ok2 = row_ok[:, None] & col_ok[None, :]
    mix_row = mix_ptr + rows[:, None] * stride_mt
    x_pre = tl.load(mix_row + cols[None, :] * stride_mc, mask=ok2, other=0.0)
    x_post = tl.load(mix_row + (HC + cols[None, :]) * stride_mc, mask=ok2, other=0.0)
    b_pre = tl.load(base_ptr + cols, mask=col_ok, other=0.0)
    b_post = tl.load(base_ptr + HC + cols, mask=col_ok, other=0.0)
    pre = tl.sigmoid(x_pre * s_pre + b_pre[None, :]) + hc_eps
    post = tl.sigmoid(x_post * s_post + b_post[None, :]) * 2.0
    out2 = rows[:, None] * HC + cols[None, :]
    tl.store(pre_ptr + out2, pre, mask=ok2)
    tl.store(post_ptr + out2, post, mask=ok2)

    # comb: [BLOCK_T, HC_P (i), HC_P (j)]; softmax over j, then Sinkhorn
    i = cols[None, :, None]
    j = cols[None, None, :]
    in_mat = (i < HC) & (j < HC)
    ok3 = row_ok[:, None, None] & in_mat
    flat = 2 * HC + i * HC + j
    x_comb = tl.load(mix_ptr + rows[:, None, None] * stride_mt + flat * stride_mc, mask=ok3, other=0.0)
    b_comb = tl.load(base_ptr + flat, mask=in_mat, other=0.0)
    logits = tl.where(j < HC, x_comb * s_comb + b_comb, float("-inf"))  # padded rows i stay finite
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = tl.math.div_rn(e, tl.sum(e, axis=2)[:, :, None]) + hc_eps
    comb = tl.where(in_mat, comb, 0.0)
    comb = tl.math.div_rn(comb, tl.sum(comb, axis=1)[:, None, :] + hc_eps)  # columns first
    for _ in tl.static_range(ITERS - 1):  # unrolled (a config constant: one compile)
        comb = tl.math.div_rn(comb, tl.sum(comb, axis=2)[:, :, None] + hc_eps)  # rows
        comb = tl.math.div_rn(comb, tl.sum(comb, axis=1)[:, None, :] + hc_eps)  # columns
    tl.store(comb_ptr + rows[:, None, None] * (HC * HC) + i * HC + j, comb, mask=ok3)


@triton.jit
def mhc_post_kernel(
    h_ptr, out_ptr, post_ptr, comb_ptr, y_ptr,
    D, stride_ht, stride_hs, stride_hd, stride_ot, stride_od, stride_yt, stride_ys, stride_yd,
    HC: tl.constexpr, HC_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    s = tl.arange(0, HC_P)
    s_ok = s < HC
    # h_i: [HC_P (i), BLOCK_D]; comb^T: [HC_P (j), HC_P (i)]
    h = tl.load(h_ptr + t * stride_ht + s[:, None] * stride_hs + cols[None, :] * stride_hd,
                mask=s_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    o = tl.load(out_ptr + t * stride_ot + cols * stride_od, mask=col_ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * HC + s, mask=s_ok, other=0.0)
    comb_t = tl.load(comb_ptr + t * (HC * HC) + s[None, :] * HC + s[:, None], mask=s_ok[:, None] & s_ok[None, :],
                     other=0.0)
    mixed = tl.sum(comb_t[:, :, None] * h[None, :, :], axis=1)  # [HC_P (j), BLOCK_D]
    y = post[:, None] * o[None, :] + mixed
    tl.store(y_ptr + t * stride_yt + s[:, None] * stride_ys + cols[None, :] * stride_yd,
             y.to(y_ptr.dtype.element_ty), mask=s_ok[:, None] & col_ok[None, :])
