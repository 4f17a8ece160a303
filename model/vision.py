"""Qwen2.5-VL-style vision tower, one frame at a time (no temporal patch merging across frames).

Input patches come in Qwen's order (model/processor.py): the 2x2 patches that merge into one image
token are consecutive, groups in raster order over the merged grid. Patch rows are C*P*P values of
one frame (588 for P=14); Qwen's Conv3d over 2 identical temporal copies is the same linear map with
its two temporal slices summed (the importer folds them).

Windowed blocks restrict attention to windows of `window_units` x `window_units` merged tokens.
When the grid divides into whole windows (every preset), tokens are reordered window by window, as
Qwen does: a windowed block is then attention over (F * windows, window tokens) with no mask, a
quarter of the work of a masked full-frame attention for 4 windows, and the merged tokens are put
back in raster order at the end. Otherwise (ragged windows) tokens stay in Qwen order and a block
mask restricts attention: the same function, since attention is permutation-equivariant given
per-token positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from casa_live.model.config import VisionConfig
from casa_live.model.layers import RMSNorm, SwiGLU


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
        """x (F, N, C); cos, signed sin (F or 1, N, 1, 1, hd) from `VisionTower.rope_tables`."""
        F_, N, C = x.shape
        qkv = self.qkv(x).view(F_, N, 3, self.heads, self.head_dim)
        # RoPE of q and k in one pass: rotate_half(t) * sin == roll(t, hd/2) * [-s, s] exactly
        qk = qkv[:, :, :2].float()  # (F, N, 2, H, hd)
        qk = (qk * cos + qk.roll(self.head_dim // 2, -1) * sin).to(x.dtype)
        qk = qk.permute(2, 0, 3, 1, 4)  # (2, F, H, N, hd)
        q, k = qk[0], qk[1]
        v = qkv[:, :, 2].transpose(1, 2)
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
        # (abs_pos, abs_pos, out_hidden) learned positions of the merged grid; zero-initialised, so
        # a tower that gains the table (fine-tuning) starts out computing what it did before
        self.pos_embed = (
            nn.Parameter(torch.zeros(cfg.abs_pos, cfg.abs_pos, cfg.out_hidden)) if cfg.abs_pos else None
        )
        rot_dim = cfg.head_dim // 2
        # (head_dim/4,) frequencies shared by the row and the column halves of the 2D rotary table
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self._cache: dict = {}  # grid -> rotary tables and window order (see _tables)

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

    def window_order(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """(N,) permutation that makes each window contiguous (Qwen order kept inside a window, so
        merge groups stay consecutive), or None when the grid has ragged windows."""
        unit = self.cfg.merge * self.cfg.window_units  # window side in patches
        if grid[0] % unit or grid[1] % unit:
            return None
        coords = patch_coords(grid, self.cfg.merge, device)
        wid = (coords[:, 0] // unit) * (grid[1] // unit) + coords[:, 1] // unit
        return torch.sort(wid, stable=True).indices

    def fuse(self) -> None:
        """Inference (the Engine calls it): each block's gate/up projections as one matmul."""
        for block in self.blocks:
            block.mlp.fuse()

    @staticmethod
    def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., N, hd) -> cos, signed sin (..., N, 1, 1, hd) for VisionAttention: the
        rotary tables repeat their first half, so [-s, s] with a roll is rotate_half."""
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos[..., None, None, :], signed[..., None, None, :]

    def _tables(self, grid: tuple[int, int], device: torch.device):  # type: ignore[no-untyped-def]
        """(cos, signed sin, window order) for a grid, computed once: they depend on the grid only.
        With a window order, the tables are permuted into it."""
        key = (grid, str(device))
        if key not in self._cache:
            with torch.no_grad():
                cos, sin = self.rotary(grid, device)
                order = self.window_order(grid, device)
                if order is not None:
                    cos, sin = cos[order], sin[order]
                self._cache[key] = (*self.rope_tables(cos, sin), order)
        return self._cache[key]

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(gh/merge * gw/merge, out_hidden) absolute positions in raster order; the table is
        resized (bilinear, corners aligned) for a grid of another shape."""
        assert self.pos_embed is not None
        mh, mw = grid[0] // self.cfg.merge, grid[1] // self.cfg.merge
        table = self.pos_embed
        if (self.cfg.abs_pos, self.cfg.abs_pos) != (mh, mw):  # python ints: a traced tower keeps them
            table = F.interpolate(
                table.permute(2, 0, 1)[None], size=(mh, mw), mode="bilinear", align_corners=True
            )[0].permute(1, 2, 0)
        return table.reshape(mh * mw, -1)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches (F, gh*gw, C*P*P) -> image tokens (F, gh*gw/merge^2, out_hidden)."""
        y = self._forward(patches, grid)
        return y if self.pos_embed is None else y + self.positions(grid).to(y.dtype)

    def _forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        cos, sin, order = self._tables(grid, x.device)
        full = set(self.cfg.fullatt_blocks)
        if order is None:
            wmask = self.window_mask(grid, x.device)
            for i, block in enumerate(self.blocks):
                x = block(x, cos, sin, None if i in full else wmask)
            return self.merger(x)
        F_, N, C = x.shape
        unit = self.cfg.merge * self.cfg.window_units
        W = unit * unit  # patches per window
        x = x[:, order]
        # windowed blocks: (F * windows, W, C), each window a batch entry with its own tables
        wcos = cos.view(N // W, W, *cos.shape[1:]).repeat(F_, 1, 1, 1, 1)  # (F * windows, W, 1, 1, hd)
        wsin = sin.view(N // W, W, *sin.shape[1:]).repeat(F_, 1, 1, 1, 1)
        for i, block in enumerate(self.blocks):
            if i in full:
                x = block(x, cos, sin, None)
            else:
                x = block(x.reshape(F_ * (N // W), W, C), wcos, wsin, None).reshape(F_, N, C)
        y = self.merger(x)  # (F, N / merge^2, out) in window order
        group = self.cfg.merge * self.cfg.merge
        raster = torch.argsort(order[::group] // group)  # window-order index of each raster token
        return y[:, raster]
