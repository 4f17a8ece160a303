"""Image processor: a frame (H, W, 3) uint8 -> normalised patches in Qwen2-VL order.

Two processors, one interface (`target_size`, `max_tokens`, `process`, `__call__`):
- `ImageProcessor` (the bundled model): a square image_size x image_size input, torch bicubic;
- `QwenImageProcessor` (imported Qwen-family checkpoints): transformers' Qwen2-VL preprocessing,
  by default aspect-preserving (`smart_resize` to multiples of patch*merge within a pixel budget).
Both scale to [0, 1], normalise with the CLIP mean/std, then patchify: the merge x merge patches of
one image token are consecutive, groups in raster order, each patch row is (C, P, P).

The server decodes and the processor resizes (docs/operations.md, "Frame preprocessing"): a
processor whose `resize_uint8` is True resizes the uint8 image itself (`resize`), and the server's
ingest thread calls exactly that, so the frame the engine receives is already at the processor's
size and `process` does not resize it again; the square bundled model keeps the server's fast
scaler (its processor sees frames at its size and resizes nothing).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
    resize_uint8 = False  # it resizes in float (torch bicubic); the server scales frames to its side

    def __init__(self, image_size: int, patch: int, merge: int) -> None:
        self.image_size, self.patch, self.merge = image_size, patch, merge
        self.mean = torch.tensor(CLIP_MEAN)[:, None, None]
        self.std = torch.tensor(CLIP_STD)[:, None, None]

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    @property
    def max_tokens(self) -> int:
        """Image tokens of the largest frame it produces (sizes the CASA image buffer)."""
        return (self.image_size // (self.patch * self.merge)) ** 2

    def process(self, image: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 -> patches and the patch grid (image_size / P, image_size / P)."""
        side = self.image_size // self.patch
        return self(image), (side, side)

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


# ---- Qwen2.5-VL preprocessing (imported checkpoints) ----------------------------------------------


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, aspect ratio kept as closely as
    possible, total pixels within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class QwenImageProcessor:
    """Qwen2.5-VL preprocessing of one frame, as transformers' Qwen2VLImageProcessorPil does it.

    PIL bicubic resize of the uint8 image (PIL antialiases when shrinking, unlike torch's bicubic),
    either to a fixed image_size x image_size or, with image_size=None (what the engine uses), to
    smart_resize's aspect-preserving size within [min_pixels, max_pixels]; then /255, CLIP
    mean/std, patchify. Rows are one frame's C*P*P values: HF's rows are the same values tiled over
    its 2 temporal slots.

    One deviation, for extreme aspect ratios only: where smart_resize's one-unit minimum side would
    push a frame past max_pixels (HF then exceeds its own budget), the long side is shortened to
    fit, so `max_tokens` bounds every frame and the engine's preallocated image buffer holds it.
    """

    resize_uint8 = True

    def __init__(
        self,
        patch: int = 14,
        merge: int = 2,
        image_size: int | None = 448,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
    ) -> None:
        unit = patch * merge
        if image_size is not None and image_size % unit:
            raise ValueError(f"image_size {image_size} must be a multiple of patch*merge = {unit}")
        self.patch, self.merge, self.image_size = patch, merge, image_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mean = torch.tensor(CLIP_MEAN)[:, None, None]
        self.std = torch.tensor(CLIP_STD)[:, None, None]

    @classmethod
    def for_config(
        cls, config, image_size: int | None = -1, max_pixels: int | None = None
    ) -> QwenImageProcessor:  # config: ModelConfig
        """image_size -1: the config's fixed side; None: dynamic (smart_resize) within max_pixels
        (default: the config's image_size squared, e.g. 448^2 = 256 tokens at most), at least 2x2
        image tokens (Qwen's 56 x 56 for 28-pixel units)."""
        side = config.image_size if image_size == -1 else image_size
        unit = config.vision.patch * config.vision.merge
        budget = config.image_size**2 if max_pixels is None else max_pixels
        if budget < 4 * unit * unit:
            raise ValueError(f"max_pixels {budget} is under 2x2 image tokens ({4 * unit * unit} pixels)")
        return cls(config.vision.patch, config.vision.merge, side, 4 * unit * unit, budget)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size, self.image_size
        unit = self.patch * self.merge
        h, w = smart_resize(height, width, unit, self.min_pixels, self.max_pixels)
        if h * w > self.max_pixels:  # a one-unit side forced the other past the budget (see above)
            if h >= w:
                h = max(unit, self.max_pixels // w // unit * unit)
            else:
                w = max(unit, self.max_pixels // h // unit * unit)
        return h, w

    @property
    def max_tokens(self) -> int:
        """Image tokens of the largest frame it produces (sizes the CASA image buffer)."""
        unit = self.patch * self.merge
        if self.image_size is not None:
            return (self.image_size // unit) ** 2
        return self.max_pixels // (unit * unit)

    def resize(self, image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 RGB (or a PIL image) -> (h, w, 3) uint8 at target_size: the resize that
        `process` applies, for the server's ingest thread (a frame at its size is not resized again)."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(_uint8_hwc(image))
        pil = pil.convert("RGB")
        h, w = self.target_size(pil.height, pil.width)
        if (pil.height, pil.width) != (h, w):
            pil = pil.resize((w, h), Image.Resampling.BICUBIC)
        return np.asarray(pil, dtype=np.uint8)

    def process(self, image: np.ndarray | torch.Tensor | Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> patches (gh*gw, 3*P*P) float32 and the patch grid (gh, gw).

        The vision tower takes (patches[None], grid); its output grid is (gh/merge, gw/merge).
        """
        a = self.resize(image)
        h, w = a.shape[:2]
        x = torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0
        x = (x - self.mean) / self.std
        return patchify(x, self.patch, self.merge), (h // self.patch, w // self.patch)

    def __call__(self, image: np.ndarray | torch.Tensor | Image.Image) -> torch.Tensor:
        return self.process(image)[0]


def _uint8_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    a = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {a.dtype} {a.shape}")
    return a
