"""The small layers every family shares: RMSNorm and the gated MLP (the dense MLP, a shared expert,
and the per-expert computation's reference).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoltrain.config import ModelConfig


class RMSNorm(nn.Module):
    """plus_one (Gemma): the scale is (1 + w) with w starting at 0, applied in float32 before the cast
    back (Llama casts first, then multiplies by w): each as its transformers class does it."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as transformers does), then cast back: matters under bf16 autocast.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act = silu (SwiGLU) or tanh-approximated GeLU (Gemma's GeGLU)."""

    def __init__(self, config: ModelConfig, width: int | None = None):
        super().__init__()
        width = width or config.intermediate_size
        self.act = F.silu if config.mlp_activation == "silu" else functools.partial(F.gelu, approximate="tanh")
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


__all__ = ["RMSNorm", "MLP"]
