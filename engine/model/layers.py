"""Small building blocks shared by the model files."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * x * rsqrt(mean(x^2) + eps), computed in float32 (the weight is kept in float32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * rsqrt_mean_square(xf, self.eps)
        if torch.is_grad_enabled() and (y.requires_grad or self.weight.requires_grad):
            return (y * self.weight).to(x.dtype)  # autograd: mul_ would overwrite what the weight's grad needs
        return y.mul_(self.weight).to(x.dtype)


def rsqrt_mean_square(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2, -1) + eps) in float32, [..., 1]; the sum of squares comes from a norm (no squared copy).
    Out of place ([..., 1] is small), so autograd can differentiate it."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return (norm.square() / x.shape[-1] + eps).rsqrt()


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (the per-head query norm of §2.1)."""
    return x * rsqrt_mean_square(x, eps).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in the weight's dtype, result in x's dtype."""
    return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)


class Linear(nn.Module):
    """A bias-free linear layer whose parameter is named `weight` as in the checkpoint."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
