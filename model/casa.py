"""The CASA layer (the paper's CA^{t+v}), parallel to a block's self-attention.

    h = x + SelfAttn(norm_sa(x)) + CASA(norm_ca(x), frame)

Queries are text tokens only. Keys/values are the latest frame's N image tokens (the CASA layer's
k/v projections applied to norm_ca(image tokens), computed once per frame) followed by the text of
the current window, causal. A window starts at a frame and ends at the next one; text before the
first frame is a window without image. Fusion "ca" drops the window text and RoPE (plain
cross-attention); a window without image then contributes zero.

Separate projections are initialised as a copy of the block's self-attention (`init_from`); the
shared variant (CA^share) reuses the block's norm and projections, so it adds no parameters and the
projections of the text tokens are computed once.
"""

from __future__ import annotations

import torch
from torch import nn

from casa_live.model.config import LMConfig
from casa_live.model.layers import Projections, RMSNorm


class CASALayer(nn.Module):
    def __init__(self, cfg: LMConfig, fusion: str, shared: bool) -> None:
        super().__init__()
        self.fusion = fusion
        self.shared = shared
        self.use_rope = fusion == "casa"
        self.text_keys = fusion == "casa"
        if not shared:
            self.norm = RMSNorm(cfg.hidden, cfg.eps)
            self.proj = Projections(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.qkv_bias)

    @torch.no_grad()
    def init_from(self, norm: RMSNorm, proj: Projections) -> None:
        """Copy the block's self-attention weights (the paper's initialisation)."""
        if self.shared:
            return
        self.norm.load_state_dict(norm.state_dict())
        self.proj.load_state_dict(proj.state_dict())

    def parts(self, block_norm: RMSNorm, block_proj: Projections) -> tuple[RMSNorm, Projections]:
        """The (norm, projections) this layer uses: its own, or the block's when shared."""
        if self.shared:
            return block_norm, block_proj
        return self.norm, self.proj
