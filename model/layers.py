"""Building blocks shared by the vision tower and the language model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from casa_live.kernels.dispatch import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32, scale applied in the input dtype (as Qwen2RMSNorm); fused Triton
        # kernel on CUDA (kernels/dispatch.py decides)
        return rms_norm(x, self.weight, self.eps)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one pass: the residual add fused into the norm."""
        y, h = rms_norm(x, self.weight, self.eps, residual)
        return y, h


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum out, in) weight (and bias) for several linears that read the same input, so a step
    makes one matmul instead of several (the CPU decode step is bound by op count).

    The linears' parameters are re-pointed at slices of the fused storage: no memory is duplicated
    and any later in-place update (load_state_dict, an optimizer step) changes both views alike.
    """
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("fuse_linears: either all linears have a bias or none")
        bias = torch.cat([lin.bias for lin in linears]) if all(has_bias) else None
        start = 0
        for lin in linears:
            n = lin.out_features
            lin.weight.data = weight[start : start + n]
            if bias is not None:
                lin.bias.data = bias[start : start + n]
            start += n
    return weight, bias


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self._gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """Inference: gate and up projections as one matmul (see fuse_linears)."""
        self._gate_up = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None:
            gate, up = F.linear(x, *self._gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Projections(nn.Module):
    """Qwen2 attention projections: q/k/v with bias, o without. GQA: kv_heads <= heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """Inference: q, k and v projections as one matmul (see fuse_linears)."""
        self._qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, hidden) -> q (B, H, T, D), k, v (B, Hkv, T, D); one matmul once fused."""
        if self._qkv is None:
            return (self.q(x), *self.kv(x))
        B, T, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        y = F.linear(x, *self._qkv)  # (B, T, (H + 2 Hkv) D)
        q, k, v = y.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return (
            q.reshape(B, T, H, D).transpose(1, 2),
            k.reshape(B, T, Hkv, D).transpose(1, 2),
            v.reshape(B, T, Hkv, D).transpose(1, 2),
        )

    def q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, H, T, D)"""
        B, T, _ = x.shape
        return self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, hidden) -> k, v (B, Hkv, T, D)"""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, hidden)"""
        B, H, T, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
