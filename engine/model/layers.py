"""Small building blocks shared by the model files."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.cpu import norm_kernel
from engine.kernels.select import dequantize, linear_quantized, select_norm_path
from engine.model import weight_format


class RMSNorm(nn.Module):
    """y = weight * x * rsqrt(mean(x^2) + eps), computed in float32. The weight is float32, or under native
    formats the checkpoint's bfloat16 (upcast exactly inside the product)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        if weight_format.current().bf16:
            self.weight = frozen_parameter(torch.ones(dim, dtype=torch.bfloat16))
        else:
            self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The torch ops below are the reference; few float32 CPU rows take one C call (`select_norm_path`)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if select_norm_path(x, grad) == "kernel":
            return norm_kernel().rmsnorm(x if x.is_contiguous() else x.contiguous(), self.weight, self.eps)
        xf = x.float()
        y = xf * rsqrt_mean_square(xf, self.eps)
        if grad:
            return (y * self.weight).to(x.dtype)  # autograd: mul_ would overwrite what the weight's grad needs
        return y.mul_(self.weight).to(x.dtype)


def rsqrt_mean_square(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2, -1) + eps) in float32, [..., 1]; the sum of squares comes from a norm (no squared copy).
    Out of place ([..., 1] is small), so autograd can differentiate it."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return (norm.square() / x.shape[-1] + eps).rsqrt()


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (the per-head query norm of §2.1); one C call on the `RMSNorm` conditions."""
    if select_norm_path(x, torch.is_grad_enabled() and x.requires_grad) == "kernel":
        return norm_kernel().rmsnorm(x if x.is_contiguous() else x.contiguous(), None, eps)
    return x * rsqrt_mean_square(x, eps).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in the weight's dtype, result in x's dtype."""
    return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)


class Linear(nn.Module):
    """A bias-free linear layer whose parameter is named `weight` as in the checkpoint.

    `stored`: how the checkpoint holds it, "fp8" (an FP8 block-scaled linear) or "bf16". Under native weight
    formats (engine.model.weight_format) the weight keeps that form: e4m3 `weight` [out, in] + `scale`
    [ceil(out/128), ceil(in/128)], or a bfloat16 `weight`; it is computed in `dtype` (`compute_dtype`) by
    engine.kernels.select. Otherwise `weight` is held in `dtype` (the reference).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, stored: str = "fp8") -> None:
        super().__init__()
        if stored not in ("fp8", "bf16"):
            raise ValueError(f"stored {stored!r}: must be 'fp8' or 'bf16'")
        formats = weight_format.current()
        self.compute_dtype = dtype
        self.fmt = "dense"
        if stored == "fp8" and formats.linears == "fp8":
            self.fmt = "fp8"
            self.weight = frozen_parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
            sdt = weight_format.SCALE_DTYPES[formats.linear_scale]
            self.scale = frozen_parameter(torch.empty(-(-out_features // 128), -(-in_features // 128), dtype=sdt))
        elif stored == "bf16" and formats.bf16 and dtype != torch.bfloat16:
            self.fmt = "bf16"
            self.weight = frozen_parameter(torch.empty(out_features, in_features, dtype=torch.bfloat16))
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "dense":
            return linear(x, self.weight)
        return linear_quantized(x, self.weight, getattr(self, "scale", None), self.fmt, self.compute_dtype)

    def forward_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Block-diagonal use (V4's grouped output projection): x [T, G, K], weight rows split in G groups of R
        -> [T, G, R] in `compute_dtype`, y[:, g] = x[:, g] @ W[g*R:(g+1)*R]^T."""
        t = x.shape[0]
        r = self.weight.shape[0] // groups
        if self.fmt == "dense":
            w = self.weight.view(groups, r, -1)
            return torch.einsum("tgk,grk->tgr", x.to(w.dtype), w)
        if self.fmt == "fp8" and r % 128:
            w = dequantize(self.weight, self.scale, "fp8", self.compute_dtype).view(groups, r, -1)
            return torch.einsum("tgk,grk->tgr", x.to(w.dtype), w)
        out = torch.empty(t, groups, r, dtype=self.compute_dtype, device=x.device)
        for g in range(groups):
            sc = self.scale[g * r // 128:(g + 1) * r // 128] if self.fmt == "fp8" else None
            out[:, g] = linear_quantized(x[:, g].to(self.compute_dtype), self.weight[g * r:(g + 1) * r], sc,
                                         self.fmt, self.compute_dtype)
        return out


class Embedding(nn.Embedding):
    """nn.Embedding whose rows come out in the model dtype; under native formats the table stays bfloat16."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        keep_bf16 = weight_format.current().bf16
        super().__init__(num_embeddings, embedding_dim, dtype=torch.bfloat16 if keep_bf16 else dtype)
        self.compute_dtype = dtype
        if keep_bf16:
            self.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def frozen_parameter(t: torch.Tensor) -> nn.Parameter:
    """A parameter holding quantized (or bfloat16 resident) bytes: no gradient."""
    return nn.Parameter(t, requires_grad=False)
