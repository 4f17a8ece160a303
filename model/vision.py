"""Qwen2.5-VL-style vision tower, one frame at a time (no temporal patch merging across frames).

Input patches come in Qwen's order (model/processor.py): the 2x2 patches that merge into one image
token are consecutive, groups in raster order over the merged grid. Patch rows are C*P*P values of
one frame (588 for P=14); Qwen's Conv3d over 2 identical temporal copies is the same linear map with
its two temporal slices summed (the importer folds them).

Windowed blocks restrict attention to windows of `window_units` x `window_units` merged tokens;
Qwen reorders tokens so each window is contiguous, we keep raster order and use a block mask, which
is the same function (attention is permutation-equivariant given per-token positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionConfig
from model.layers import RMSNorm, SwiGLU
from model.rope import rotate_half


def patch_coords(grid: tuple[int, int], merge: int, device: torch.device | None = None) -> torch.Tensor:
    """(gh*gw, 2) (row, col) of each patch in Qwen order: (block_row, block_col, in_row, in_col)."""
    gh, gw = grid
    h = torch.arange(gh, device=device)[:, None].expand(gh, gw)
    w = torch.arange(gw, device=device)[None, :].expand(gh, gw)

    def order(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(gh // merge, merge, gw // merge, merge).permute(0, 2, 1, 3).reshape(-1)

    return torch.stack([order(h), order(w)], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        F_, N, C = x.shape
        qkv = self.qkv(x).view(F_, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (F, H, N, hd)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(F_, N, C))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.group = cfg.merge * cfg.merge
        dim = cfg.hidden * self.group
        self.ln_q = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F_, N, C = x.shape
        return self.mlp(self.ln_q(x).reshape(F_, N // self.group, C * self.group))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        rot_dim = cfg.head_dim // 2
        # (head_dim/4,) frequencies shared by the row and the column halves of the 2D rotary table
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def rotary(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, head_dim): first quarter rows, second quarter cols, then repeated (rotate-half)."""
        coords = patch_coords(grid, self.cfg.merge, device).float()  # (N, 2)
        freqs = (coords[:, :, None] * self.inv_freq.to(device)[None, None, :]).reshape(coords.shape[0], -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def window_mask(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(N, N) bool: patches attend within the same window of window_units merged tokens."""
        unit = self.cfg.merge * self.cfg.window_units  # window side in patches
        coords = patch_coords(grid, self.cfg.merge, device)
        wid = (coords[:, 0] // unit) * 10_000 + coords[:, 1] // unit
        return wid[:, None] == wid[None, :]

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches (F, gh*gw, C*P*P) -> image tokens (F, gh*gw/merge^2, out_hidden)."""
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        cos, sin = self.rotary(grid, x.device)
        wmask = self.window_mask(grid, x.device)
        full = set(self.cfg.fullatt_blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if i in full else wmask)
        return self.merger(x)
