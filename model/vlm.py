"""CASAModel: the vision tower plus the language model, and the entry points that use both."""

from __future__ import annotations

import torch
from torch import nn

from casa_live.model.config import ModelConfig
from casa_live.model.lm import LanguageModel
from casa_live.model.reference import Interleaved, dense_forward
from casa_live.model.vision import VisionTower


class CASAModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.lm = LanguageModel(config)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, std: float = 0.02) -> CASAModel:
        """A randomly initialised model, CASA layers copied from self-attention (the paper's init)."""
        torch.manual_seed(seed)
        model = cls(config)
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                nn.init.normal_(p, std=std)
        model.lm.init_casa_from_self_attention()
        return model

    @property
    def grid(self) -> tuple[int, int]:
        """Merged image-token grid of one frame at the configured image size."""
        side = self.config.image_size // (self.config.vision.patch * self.config.vision.merge)
        return side, side

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.vision.patch
        return side, side

    def encode_images(self, patches: torch.Tensor, patch_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """patches (F, gh*gw, C*P*P) from model.processor -> image tokens (F, N, hidden)."""
        return self.vision(patches, patch_grid or self.patch_grid)

    def forward_dense(
        self,
        batch: Interleaved,
        sa_visible: torch.Tensor | None = None,
        sa_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training / reference forward: logits (B, T, V) at every text token (model/reference.py)."""
        return dense_forward(self.lm, batch, sa_visible, sa_offset)
