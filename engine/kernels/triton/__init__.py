"""Triton (CUDA) kernels for weights kept in checkpoint precision: FP8 block-scaled linear, grouped MoE GEMM.

Triton is imported lazily, only when a kernel runs: importing this package never needs it, and CPU paths never
call it. The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`
set before triton is first imported; the tests do that). `available(device)` says whether they can run there.
Plain-torch references with the same contracts: `engine.kernels.triton.reference`.

`fp8_block_linear(x, w_fp8, w_scale)`  (W8A16; see its docstring for the layout)
    y [..., N] = x [..., K] @ (w_fp8 [N, K] * block scales [ceil(N/128), ceil(K/128)])^T.
`moe_grouped_gemm(x_sorted, w, expert_offsets, ...)`  (W16A16 or MXFP4 W4A16; optional fused SwiGLU)
    one launch over rows sorted by expert; static grid, no host read of the offsets (CUDA-graph capturable).
`mhc_gates(mixes, base, scale, hc, hc_eps, sinkhorn_iters)`  (fp32)
    mHC's pre/post sigmoids and comb's softmax + Sinkhorn, one launch (engine.model.mhc.hc_pre's gates).
`mhc_post(h, out, post, comb)`  (fp32 / bf16 / fp16)
    mHC's write-back post_j * out + sum_i comb[i, j] * h_i, one launch (engine.model.mhc.hc_post).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["available", "fp8_block_linear", "moe_grouped_gemm", "mhc_gates", "mhc_post", "TileConfig",
           "FP8_SCALE_BLOCK", "FP4_GROUP"]

FP8_SCALE_BLOCK = 128  # FP8 weights: one scale per 128 x 128 block
FP4_GROUP = 32  # MXFP4: one E8M0 scale per 32 values along K
_E8M0 = (torch.float8_e8m0fnu, torch.uint8)


def interpreting() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET=1): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(device: torch.device | str = "cuda") -> bool:
    """Whether the kernels can run on tensors of `device`: triton importable, and CUDA there (or, for a CPU
    device, the interpreter on)."""
    dev = torch.device(device)
    if not _triton_importable():
        return False
    if dev.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()


def _kernels():
    if not _triton_importable():
        raise RuntimeError("engine.kernels.triton needs the `triton` package (pip install 'megaserve[gpu]')")
    from engine.kernels.triton import kernels

    return kernels


def _mhc_kernels():
    if not _triton_importable():
        raise RuntimeError("engine.kernels.triton needs the `triton` package (pip install 'megaserve[gpu]')")
    from engine.kernels.triton import mhc

    return mhc


def _check_device(*tensors: Tensor) -> None:
    dev = tensors[0].device
    bad = [t.device for t in tensors if t.device != dev]
    if bad:
        raise ValueError(f"all tensors must be on one device: {dev} and {bad[0]}")
    if not available(dev):
        raise RuntimeError(f"the Triton kernels cannot run on {dev} here: they need CUDA with triton installed, "
                           "or CPU tensors under TRITON_INTERPRET=1")


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings of a kernel call; None picks the default from the shapes (untuned
    heuristics: rows per tile from the rows per expert, 64 output columns, 128 along K). A tuning knob: results
    do not depend on it beyond fp32 summation order."""

    block_m: int | None = None  # 16, 32, 64, 128
    block_n: int | None = None  # 16 .. 256, a power of two
    block_k: int | None = None  # FP8: 16 .. 128 (divides the 128 scale block); MXFP4: 32 .. 256 dividing K
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for key, allowed in (("block_m", (16, 32, 64, 128)), ("block_n", (16, 32, 64, 128, 256)),
                             ("block_k", (16, 32, 64, 128, 256)), ("num_warps", (1, 2, 4, 8, 16))):
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ValueError(f"TileConfig.{key} must be one of {allowed}, got {value!r}")
        if self.num_stages < 1:
            raise ValueError(f"TileConfig.num_stages must be positive, got {self.num_stages!r}")


_DEFAULT_TILES = TileConfig()


def _pow2_block(n: int, lo: int, hi: int) -> int:
    b = lo
    while b < hi and b < n:
        b *= 2
    return b


def fp8_block_linear(x: Tensor, w_fp8: Tensor, w_scale: Tensor, *, out_dtype: torch.dtype | None = None,
                     input_precision: str | None = None, tiles: TileConfig = _DEFAULT_TILES) -> Tensor:
    """y = x @ dequant(w_fp8, w_scale)^T: FP8 e4m3 weight with 128x128 block scales, dequantized in registers.

    Layout contract:
      x        [..., K] float32 / bfloat16 / float16, any strides (leading dims flattened to M rows).
      w_fp8    [N, K] torch.float8_e4m3fn (or its uint8 bytes), any strides (the checkpoint's [out, in]).
      w_scale  [ceil(N/128), ceil(K/128)], float32 (any float) or E8M0 (torch.float8_e8m0fnu or its uint8 bytes,
               byte b = 2^(b-127)); scale[i, j] covers rows 128i..128i+127 and columns 128j..128j+127.
      returns  [..., N] in `out_dtype` (default x's dtype), contiguous; fp32 accumulation.
    `input_precision` goes to `tl.dot` ("ieee" for exact fp32 under the interpreter; None: Triton's default).
    `tiles`: tile sizes (None fields: defaults from the shapes).
    """
    if x.dim() < 1 or w_fp8.dim() != 2:
        raise ValueError(f"fp8_block_linear: x must be [..., K] and w_fp8 [N, K], got {tuple(x.shape)} and "
                         f"{tuple(w_fp8.shape)}")
    if w_fp8.dtype == torch.uint8:
        w_fp8 = w_fp8.view(torch.float8_e4m3fn)
    if w_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_block_linear: w_fp8 must be float8_e4m3fn (or uint8 bytes), got {w_fp8.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_block_linear: x must be float32, bfloat16 or float16, got {x.dtype}")
    n, k = w_fp8.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_block_linear: x has K={x.shape[-1]}, w_fp8 [N, K] has K={k}")
    blk = FP8_SCALE_BLOCK
    want = (-(-n // blk), -(-k // blk))
    if tuple(w_scale.shape) != want:
        raise ValueError(f"fp8_block_linear: w_scale must be {list(want)} for a [{n}, {k}] weight "
                         f"(128x128 blocks), got {list(w_scale.shape)}")
    e8m0 = w_scale.dtype in _E8M0
    if e8m0:
        w_scale = w_scale.view(torch.uint8)
    elif not w_scale.is_floating_point():
        raise ValueError(f"fp8_block_linear: w_scale must be float or E8M0, got {w_scale.dtype}")
    _check_device(x, w_fp8, w_scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*lead, n)
    if k == 0:
        return y.zero_().view(*lead, n)
    kern = _kernels()
    block_m = tiles.block_m or _pow2_block(m, 16, 64)
    block_n = tiles.block_n or (64 if m <= 64 else 128)
    block_k = tiles.block_k or (128 if k >= 128 else _pow2_block(k, 32, 128))
    if blk % block_k:
        raise ValueError(f"fp8_block_linear: block_k={block_k} must divide the {blk}-wide scale block")
    grid = (-(-m // block_m), -(-n // block_n))
    kern.fp8_block_linear_kernel[grid](
        x2, w_fp8, w_scale, y, m, n, k,
        x2.stride(0), x2.stride(1), w_fp8.stride(0), w_fp8.stride(1), w_scale.stride(0), w_scale.stride(1),
        y.stride(0), y.stride(1),
        SCALE_BLOCK=blk, SCALE_E8M0=e8m0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        INPUT_PRECISION=input_precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y.view(*lead, n)


def moe_grouped_gemm(x_sorted: Tensor, w: Tensor, expert_offsets: Tensor, *, w_scale: Tensor | None = None,
                     w3: Tensor | None = None, w3_scale: Tensor | None = None, swiglu_limit: float | None = None,
                     row_weight: Tensor | None = None, out_dtype: torch.dtype | None = None,
                     input_precision: str | None = None, tiles: TileConfig = _DEFAULT_TILES,
                     out: Tensor | None = None) -> Tensor:
    """One grouped GEMM over rows sorted by expert: y[r] = x_sorted[r] @ W_e^T for the expert e owning row r.

    Layout contract:
      x_sorted        [T, K] float32 / bfloat16 / float16, any strides: the rows of expert 0, then expert 1, ...
      expert_offsets  [E] int32 (int64 accepted): cumulative row ends, as `torch._grouped_mm`'s `offs`; expert e
                      owns rows offsets[e-1]:offsets[e] (offsets[-1] := 0). Non-decreasing, offsets[E-1] <= T
                      (not checked: that would read them on the host). Rows at or past offsets[E-1] (padding of
                      a fixed capacity) get zeros.
      w               [E, N, K] float32 / bfloat16 / float16 (the checkpoint's [out, in] per expert), any strides;
                      or MXFP4: packed e2m1 bytes [E, N, K/2] uint8 (int8 accepted), element 2j in the low nibble
                      of byte j, stride 1 along the last dim, with `w_scale`.
      w_scale         MXFP4 only: E8M0 scales [E, N, K/32] (torch.float8_e8m0fnu or uint8 bytes, 2^(b-127)), one
                      per 32 values along K. K % 32 == 0.
      w3, w3_scale    optional second weight of the SwiGLU pair (then w is w1): same shape, dtype and strides as
                      w / w_scale. y = silu(min(g, limit)) * clamp(u, -limit, limit), g = x w1^T, u = x w3^T,
                      limit = `swiglu_limit` (None: no clamp).
      row_weight      optional [T] float: multiplies each output row (the routing weight, applied after SwiGLU).
      out             optional [T, N] float tensor, any strides, written in place and returned (a static buffer
                      for CUDA graphs); else a new contiguous [T, N] in `out_dtype` (default x's dtype).
    fp32 accumulation. Grid: (cdiv(T, BLOCK_M) + E + 1, cdiv(N, BLOCK_N)), fixed by the shapes alone, so a call
    is CUDA-graph capturable; each program finds its expert from the offsets in the kernel. `tiles`: tile sizes
    (None fields: defaults; rows per tile from the mean rows per expert, as the grid is fixed by T and E).
    """
    if x_sorted.dim() != 2 or w.dim() != 3 or expert_offsets.dim() != 1:
        raise ValueError(f"moe_grouped_gemm: x_sorted must be [T, K], w [E, N, K or K/2], expert_offsets [E]; got "
                         f"{tuple(x_sorted.shape)}, {tuple(w.shape)}, {tuple(expert_offsets.shape)}")
    if x_sorted.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"moe_grouped_gemm: x_sorted must be float32, bfloat16 or float16, got {x_sorted.dtype}")
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_grouped_gemm: expert_offsets must be int32 (or int64), got {expert_offsets.dtype}")
    t, k = x_sorted.shape
    e, n = w.shape[0], w.shape[1]
    if expert_offsets.shape[0] != e:
        raise ValueError(f"moe_grouped_gemm: expert_offsets has {expert_offsets.shape[0]} entries for {e} experts")
    fp4 = w_scale is not None
    if fp4:
        w, w_scale = _check_fp4("w", w, w_scale, e, n, k)
    elif not w.is_floating_point() or w.dtype.itemsize < 2:
        raise ValueError(f"moe_grouped_gemm: w must be float32/bfloat16/float16 [E, N, K], or packed MXFP4 with "
                         f"w_scale; got {w.dtype} without a scale")
    elif w.shape[2] != k:
        raise ValueError(f"moe_grouped_gemm: x_sorted has K={k}, w {tuple(w.shape)} has K={w.shape[2]}")
    if w3 is not None:
        if (w3_scale is None) != (not fp4):
            raise ValueError("moe_grouped_gemm: w3 must come in the format of w (with w3_scale exactly when w_scale)")
        if fp4:
            w3, w3_scale = _check_fp4("w3", w3, w3_scale, e, n, k)
        if w3.shape != w.shape or w3.dtype != w.dtype or w3.stride() != w.stride():
            raise ValueError(f"moe_grouped_gemm: w3 must match w in shape, dtype and strides: {tuple(w3.shape)} "
                             f"{w3.dtype} {w3.stride()} vs {tuple(w.shape)} {w.dtype} {w.stride()}")
        if fp4 and w3_scale.stride() != w_scale.stride():
            raise ValueError("moe_grouped_gemm: w3_scale must have the strides of w_scale")
    elif w3_scale is not None or swiglu_limit is not None:
        raise ValueError("moe_grouped_gemm: w3_scale and swiglu_limit need w3 (the SwiGLU pair)")
    if row_weight is not None and tuple(row_weight.shape) != (t,):
        raise ValueError(f"moe_grouped_gemm: row_weight must be [{t}], got {tuple(row_weight.shape)}")
    tensors = [x_sorted, w, expert_offsets] + [a for a in (w_scale, w3, w3_scale, row_weight) if a is not None]
    if out is not None:
        if tuple(out.shape) != (t, n) or not out.is_floating_point():
            raise ValueError(f"moe_grouped_gemm: out must be a float [{t}, {n}] tensor, got {out.dtype} "
                             f"{list(out.shape)}")
        tensors.append(out)
    _check_device(*tensors)
    y = out if out is not None else torch.empty(t, n, dtype=out_dtype or x_sorted.dtype, device=x_sorted.device)
    if t == 0 or n == 0:
        return y
    block_m = tiles.block_m or _pow2_block(-(-t // max(e, 1)), 16, 64)
    block_n = tiles.block_n or 64
    if fp4:
        block_k = tiles.block_k or next(b for b in (128, 64, 32) if k % b == 0)
        if block_k < FP4_GROUP or k % block_k:
            raise ValueError(f"moe_grouped_gemm: MXFP4 block_k={block_k} must be at least {FP4_GROUP} and divide "
                             f"K={k}")
    else:
        block_k = tiles.block_k or (128 if k >= 128 else _pow2_block(k, 16, 128))
    kern = _kernels()
    scale = w_scale if fp4 else w  # unused pointers when not FP4 / no SwiGLU: any tensor of the device
    grid = (kern.grid_rows(t, e, block_m), -(-n // block_n))
    kern.moe_grouped_gemm_kernel[grid](
        x_sorted, w, scale, w if w3 is None else w3, scale if w3_scale is None else w3_scale, expert_offsets,
        x_sorted if row_weight is None else row_weight, y,
        t, n, k, e,
        x_sorted.stride(0), x_sorted.stride(1), w.stride(0), w.stride(1), w.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2), y.stride(0), y.stride(1),
        float("inf") if swiglu_limit is None else float(swiglu_limit),
        FP4=fp4, SWIGLU=w3 is not None, HAS_ROW_WEIGHT=row_weight is not None,
        E_POW2=max(16, 1 << (e - 1).bit_length()), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        INPUT_PRECISION=input_precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y


def _check_fp4(name: str, w: Tensor, scale: Tensor | None, e: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    if w.dtype == torch.int8:
        w = w.view(torch.uint8)
    if w.dtype != torch.uint8:
        raise ValueError(f"moe_grouped_gemm: MXFP4 {name} must be packed uint8 (or int8) bytes, got {w.dtype}")
    if k % FP4_GROUP:
        raise ValueError(f"moe_grouped_gemm: MXFP4 needs K % {FP4_GROUP} == 0, got K={k}")
    if tuple(w.shape) != (e, n, k // 2) or w.stride(2) != 1:
        raise ValueError(f"moe_grouped_gemm: MXFP4 {name} must be [E, N, K/2] = {[e, n, k // 2]} with stride 1 "
                         f"along K, got {list(w.shape)} strides {w.stride()}")
    if scale is None or scale.dtype not in _E8M0:
        raise ValueError(f"moe_grouped_gemm: MXFP4 {name} needs E8M0 scales (float8_e8m0fnu or uint8), got "
                         f"{None if scale is None else scale.dtype}")
    if tuple(scale.shape) != (e, n, k // FP4_GROUP):
        raise ValueError(f"moe_grouped_gemm: {name} scale must be [E, N, K/32] = {[e, n, k // FP4_GROUP]}, got "
                         f"{list(scale.shape)}")
    return w, scale.view(torch.uint8)


def mhc_gates(mixes: Tensor, base: Tensor, scale: Tensor, hc: int, hc_eps: float, sinkhorn_iters: int,
              *, block_t: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """mHC's gates from its mixes, in one launch: the contract of `engine.model.mhc.mhc_gates` (the reference).

      mixes   [T, (2+hc)*hc] float32, any strides: columns pre (hc), post (hc), then comb's hc rows of hc.
      base    [(2+hc)*hc] (any shape of that many elements), scale [3]: float (read as float32).
      returns pre [T, hc] (sigmoid + hc_eps), post [T, hc] (2 * sigmoid), comb [T, hc, hc] (row softmax
              + hc_eps, then `sinkhorn_iters` Sinkhorn passes: columns first); float32, contiguous.
    Grid: cdiv(T, block_t) programs (fixed by T: CUDA-graph capturable); `block_t` tokens each (a power of two;
    None: 4 to 64, from T).
    """
    if mixes.dim() != 2 or mixes.shape[1] != (2 + hc) * hc or mixes.dtype != torch.float32:
        raise ValueError(f"mhc_gates: mixes must be float32 [T, (2+hc)*hc] = [T, {(2 + hc) * hc}], got "
                         f"{mixes.dtype} {list(mixes.shape)}")
    if base.numel() != (2 + hc) * hc or scale.numel() != 3:
        raise ValueError(f"mhc_gates: base must have {(2 + hc) * hc} elements and scale 3, got {base.numel()} and "
                         f"{scale.numel()}")
    if sinkhorn_iters < 1:
        raise ValueError(f"mhc_gates: sinkhorn_iters must be at least 1, got {sinkhorn_iters}")
    if block_t is not None and (block_t < 1 or block_t & (block_t - 1)):
        raise ValueError(f"mhc_gates: block_t must be a power of two, got {block_t}")
    base = base.reshape(-1).float().contiguous()
    scale = scale.reshape(-1).float().contiguous()
    _check_device(mixes, base, scale)
    t = mixes.shape[0]
    pre = torch.empty(t, hc, dtype=torch.float32, device=mixes.device)
    post = torch.empty(t, hc, dtype=torch.float32, device=mixes.device)
    comb = torch.empty(t, hc, hc, dtype=torch.float32, device=mixes.device)
    if t == 0:
        return pre, post, comb
    block = block_t or _pow2_block(t, 4, 64)
    hc_p = 1 << (hc - 1).bit_length()
    _mhc_kernels().mhc_gates_kernel[(-(-t // block),)](
        mixes, base, scale, pre, post, comb, t, mixes.stride(0), mixes.stride(1), float(hc_eps),
        ITERS=int(sinkhorn_iters), HC=hc, HC_P=hc_p, BLOCK_T=block, num_warps=4 if block * hc_p * hc_p >= 1024 else 1,
    )
    return pre, post, comb


def mhc_post(h: Tensor, out: Tensor, post: Tensor, comb: Tensor, *, block_d: int | None = None) -> Tensor:
    """mHC's write-back in one launch: the contract of `engine.model.mhc.hc_post` (the reference) when `out` has
    h's dtype.

      h     [T, hc, D] float32 / bfloat16 / float16, any strides;  out [T, D] of h's dtype, any strides.
      post  [T, hc], comb [T, hc, hc]: float32 (made contiguous).
      returns y [T, hc, D] in h's dtype, contiguous: y_j = post_j * out + sum_i comb[i, j] * h_i, fp32 math.
    Grid: (T, cdiv(D, block_d)) (fixed by the shapes: CUDA-graph capturable); `block_d` a power of two (None:
    up to 256, from D).
    """
    if h.dim() != 3 or h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"mhc_post: h must be float32/bfloat16/float16 [T, hc, D], got {h.dtype} {list(h.shape)}")
    t, hc, d = h.shape
    if tuple(out.shape) != (t, d) or out.dtype != h.dtype:
        raise ValueError(f"mhc_post: out must be [T, D] = {[t, d]} in h's dtype {h.dtype}, got {out.dtype} "
                         f"{list(out.shape)}")
    if tuple(post.shape) != (t, hc) or tuple(comb.shape) != (t, hc, hc) or post.dtype != torch.float32 \
            or comb.dtype != torch.float32:
        raise ValueError(f"mhc_post: post and comb must be float32 [T, hc] = {[t, hc]} and [T, hc, hc], got "
                         f"{post.dtype} {list(post.shape)} and {comb.dtype} {list(comb.shape)}")
    if block_d is not None and (block_d < 1 or block_d & (block_d - 1)):
        raise ValueError(f"mhc_post: block_d must be a power of two, got {block_d}")
    post, comb = post.contiguous(), comb.contiguous()
    _check_device(h, out, post, comb)
    y = torch.empty(t, hc, d, dtype=h.dtype, device=h.device)
    if t == 0 or d == 0:
        return y
    block = block_d or _pow2_block(d, 16, 256)
    _mhc_kernels().mhc_post_kernel[(t, -(-d // block))](
        h, out, post, comb, y, d, h.stride(0), h.stride(1), h.stride(2), out.stride(0), out.stride(1),
        y.stride(0), y.stride(1), y.stride(2), HC=hc, HC_P=1 << (hc - 1).bit_length(), BLOCK_D=block,
        num_warps=4 if block >= 256 else 2,
    )
    return y
