"""Image processor: a frame (H, W, 3) uint8 -> normalised patches in Qwen2-VL order.

Resize to a fixed side (live captioning: one size for every frame, 448 for Qwen) with bicubic
interpolation, scale to [0, 1], normalise with the CLIP mean/std, then patchify: the merge x merge
patches of one image token are consecutive, groups in raster order, each patch row is (C, P, P).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def patchify(pixels: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """pixels (C, H, W) float -> (H/P * W/P, C*P*P) in Qwen order."""
    C, H, W = pixels.shape
    gh, gw = H // patch, W // patch
    x = pixels.reshape(C, gh // merge, merge, patch, gw // merge, merge, patch)
    # -> (gh/m, gw/m, m, m, C, P, P)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(gh * gw, C * patch * patch)


class ImageProcessor:
    def __init__(self, image_size: int, patch: int, merge: int) -> None:
        self.image_size, self.patch, self.merge = image_size, patch, merge
        self.mean = torch.tensor(CLIP_MEAN)[:, None, None]
        self.std = torch.tensor(CLIP_STD)[:, None, None]

    @classmethod
    def for_config(cls, config) -> ImageProcessor:  # config: ModelConfig
        return cls(config.image_size, config.vision.patch, config.vision.merge)

    def to_tensor(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) float32 in [0, 1], resized to the model's side."""
        t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        if t.dim() != 3 or t.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {tuple(t.shape)}")
        x = t.permute(2, 0, 1).float() / 255.0
        if x.shape[1:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x[None], size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
            )[0]
            x = x.clamp(0.0, 1.0)
        return x

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 -> patches (N_patches, 3*P*P) float32."""
        x = (self.to_tensor(image) - self.mean) / self.std
        return patchify(x, self.patch, self.merge)
