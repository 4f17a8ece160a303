"""Rotary positions: the one place that says where every token sits.

Text positions count text tokens only; image tokens never advance them. Positions are (..., 3)
integer triples (temporal, height, width) for M-RoPE (Qwen2-VL): the head_dim/2 rotary frequencies
are split into `mrope_section` = (t, h, w) groups and group g rotates by position component g. A text
token at position p is (p, p, p), which makes M-RoPE plain RoPE for text.

Image tokens of a frame inserted before text position p sit at (p, p + row, p + col) on the merged
token grid: the temporal component is frozen at the insertion point (CASA, App. A.2) and the spatial
components are offset by p as in Qwen2.5-VL's get_rope_index, so a text query at q sees the frame at
relative distances (q - p, q - p - row, q - p - col), independent of how long the stream has run.

Because RoPE scores depend only on position differences, the streaming engine uses shifted frames of
reference that give identical scores with small, bounded numbers:
- CASA layers use window-local positions: the frame's insertion point is 0 (image at (0, row, col),
  window text at 0, 1, 2, ...).
- Self-attention uses cache-slot positions (StreamingLLM): slot i of the bounded text cache is at
  position i, so positions stay < max_context_tokens however long the stream runs.
"""

from __future__ import annotations

import torch


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim/2,) float32 rotary frequencies, computed as HF Qwen2 does."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def section_ids(mrope_section: list[int]) -> torch.Tensor:
    """(head_dim/2,) which position component (0=t, 1=h, 2=w) rotates each frequency."""
    return torch.repeat_interleave(torch.arange(len(mrope_section)), torch.tensor(mrope_section))


def text_positions(start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length, 3) positions of `length` consecutive text tokens starting at start (B,)."""
    p = start[:, None] + torch.arange(length, device=start.device)[None, :]
    return p[..., None].expand(-1, -1, 3)


def image_positions(insert_at: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh*gw, 3) positions of a frame's image tokens (raster order on the merged grid).

    insert_at: (B,) text position where the frame is inserted (0 in window-local coordinates).
    """
    gh, gw = grid
    rows = torch.arange(gh, device=insert_at.device).repeat_interleave(gw)
    cols = torch.arange(gw, device=insert_at.device).repeat(gh)
    p = insert_at[:, None]
    return torch.stack([p.expand(-1, gh * gw), p + rows[None], p + cols[None]], dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, freqs: torch.Tensor, sections: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., 3) -> cos, sin (..., head_dim) in float32 (rotate-half layout)."""
    pos = positions.to(torch.float32)
    comp = pos.index_select(-1, sections.to(pos.device))  # (..., head_dim/2)
    angles = comp * freqs.to(pos.device)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D) float32. Math in float32, result in x's dtype."""
    xf = x.float()
    c, s = cos[:, None], sin[:, None]
    return (xf * c + rotate_half(xf) * s).to(x.dtype)
