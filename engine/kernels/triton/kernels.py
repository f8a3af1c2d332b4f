"""The Triton kernels themselves (imports triton: import this module only through `engine.kernels.triton`).

Layouts, argument checks and block-size choice live in the wrappers (`engine.kernels.triton.__init__`); these
functions take raw pointers and strides. Both kernels accumulate in fp32 and are generic in the activation dtype
(fp32, bf16, fp16): dequantized weight tiles are cast to the activation dtype before `tl.dot`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e8m0_to_f32(b):
    """E8M0 bytes (uint8 tensor) -> 2^(b - 127) in fp32, built as float bits (byte 0 is the subnormal 2^-127)."""
    bi = b.to(tl.int32)
    bits = tl.where(bi > 0, bi << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_to_f32(codes):
    """e2m1 nibble codes (int tensor, 0..15; bit 3 the sign) -> their values in fp32.

    Magnitude code 2e + m: 4 * value = (2 + m) << e when e > 0, else 2 * m (subnormal).
    """
    c = codes.to(tl.int32)
    e = (c >> 1) & 3
    m = c & 1
    quarters = tl.where(e > 0, (2 + m) << e, 2 * m)
    return tl.where(c >= 8, -quarters, quarters).to(tl.float32) * 0.25


@triton.jit
def fp8_block_linear_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn,
    SCALE_BLOCK: tl.constexpr, SCALE_E8M0: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * w[n, k] * s[n // SCALE_BLOCK, k // SCALE_BLOCK]; BLOCK_K divides SCALE_BLOCK.

    Each K step lies in one scale column, so the block scale is applied per output column to the step's partial
    product (exact for e4m3 weights: they convert losslessly to bf16/fp16/fp32).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] e4m3
        s_raw = tl.load(s_ptr + (offs_n // SCALE_BLOCK) * stride_sn + (k0 // SCALE_BLOCK) * stride_sk,
                        mask=mask_n, other=0)
        if SCALE_E8M0:
            s = _e8m0_to_f32(s_raw)
        else:
            s = s_raw.to(tl.float32)
        part = tl.dot(x, w.to(x.dtype), input_precision=INPUT_PRECISION)
        acc += part * s[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _load_w_tile(w_ptr, s_ptr, e, offs_n, mask_n, k0, K,
                 stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                 FP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert e's weight tile for output columns offs_n and K columns k0..k0+BLOCK_K, as fp32 [BLOCK_K, BLOCK_N].

    FP4: bytes [BLOCK_N, BLOCK_K/2] (element 2j in the low nibble of byte j), one E8M0 scale per 32 along K;
    the wrapper guarantees K % BLOCK_K == 0 there.
    """
    if FP4:
        offs_pk = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_pk[None, :] * stride_wk,
                    mask=mask_n[:, None], other=0)  # [BLOCK_N, BLOCK_K/2] uint8
        codes = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, BLOCK_K))  # low nibble first
        offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = _e8m0_to_f32(tl.load(s_ptr + e * stride_se + offs_n[:, None] * stride_sn + offs_g[None, :] * stride_sk,
                                 mask=mask_n[:, None], other=127))  # [BLOCK_N, BLOCK_K/32]
        vals = tl.reshape(_e2m1_to_f32(codes), (BLOCK_N, BLOCK_K // 32, 32)) * s[:, :, None]
        w = tl.trans(tl.reshape(vals, (BLOCK_N, BLOCK_K)))
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + e * stride_we + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(k < K)[:, None] & mask_n[None, :], other=0.0)
    return w


@triton.jit
def moe_grouped_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, w3_ptr, w3s_ptr, off_ptr, rw_ptr, y_ptr,
    T, N, K, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
    stride_ym, stride_yn, swiglu_limit,
    FP4: tl.constexpr, SWIGLU: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Grouped GEMM over rows sorted by expert; grid (cdiv(T, BLOCK_M) + E + 1, cdiv(N, BLOCK_N)), static.

    Program (t, j) reads the offsets (cumulative row ends, [E]) and finds its work: expert tiles are numbered
    expert by expert (expert e has cdiv(count_e, BLOCK_M) tiles); tile t < n_tiles belongs to the expert whose
    tile range holds t. Programs t >= n_tiles zero the rows past offsets[E-1]; the rest return at once. The
    grid bound: sum_e cdiv(count_e, BM) + cdiv(T - used, BM) < T/BM + E + 1.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    eidx = tl.arange(0, E_POW2)
    in_e = eidx < E
    ends = tl.load(off_ptr + eidx, mask=in_e, other=0).to(tl.int32)
    starts = tl.load(off_ptr + eidx - 1, mask=in_e & (eidx > 0), other=0).to(tl.int32)
    counts = tl.where(in_e, tl.maximum(ends - starts, 0), 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)  # inclusive: tiles of experts 0..e
    n_tiles = tl.sum(tiles, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_bm = tl.arange(0, BLOCK_M)
    if pid_t < n_tiles:
        e = tl.sum((cum <= pid_t).to(tl.int32), 0)  # the first expert whose inclusive tile count exceeds t
        first_tile = tl.sum(tl.where(eidx < e, tiles, 0), 0)
        row_start = tl.sum(tl.where(eidx == e, starts, 0), 0)
        row_end = tl.sum(tl.where(eidx == e, ends, 0), 0)
        rows = row_start + (pid_t - first_tile) * BLOCK_M + offs_bm
        mask_m = (rows < row_end) & (rows < T)
        e = e.to(tl.int64)  # e * stride_we passes 2^31 bytes at V4-Pro sizes
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
            w = _load_w_tile(w_ptr, ws_ptr, e, offs_n, mask_n, k0, K, stride_we, stride_wn, stride_wk,
                             stride_se, stride_sn, stride_sk, FP4, BLOCK_N, BLOCK_K)
            acc += tl.dot(x, w.to(x.dtype), input_precision=INPUT_PRECISION)
            if SWIGLU:
                w3 = _load_w_tile(w3_ptr, w3s_ptr, e, offs_n, mask_n, k0, K, stride_we, stride_wn, stride_wk,
                                  stride_se, stride_sn, stride_sk, FP4, BLOCK_N, BLOCK_K)
                acc3 += tl.dot(x, w3.to(x.dtype), input_precision=INPUT_PRECISION)
        if SWIGLU:
            g = tl.minimum(acc, swiglu_limit)
            u = tl.minimum(tl.maximum(acc3, -swiglu_limit), swiglu_limit)
            acc = g * tl.sigmoid(g) * u
        if HAS_ROW_WEIGHT:
            rw = tl.load(rw_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
            acc = acc * rw[:, None]
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        used = tl.sum(tl.where(eidx == E - 1, ends, 0), 0)
        rows = used + (pid_t - n_tiles) * BLOCK_M + offs_bm
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 zero.to(y_ptr.dtype.element_ty), mask=(rows < T)[:, None] & mask_n[None, :])


def grid_rows(t: int, e: int, block_m: int) -> int:
    """The static first grid dimension of `moe_grouped_gemm_kernel` (see its docstring)."""
    return triton.cdiv(t, block_m) + e + 1
