"""The one way to load a checkpoint directory, whatever its layout (what `--model DIR` uses):

    model, tokenizer, gen = load(path, device, dtype)

Our own format (format.py) is loaded as it is; a Qwen2.5-VL or Kyutai CASA directory is imported
(hf/: every block gets CASA layers, separate weights, 448-px frames; `hf.import_checkpoint` takes
the other choices). format.py and hf/ do not know each other: the layout is decided here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from casa_live.model.checkpoint.common import CONFIG
from casa_live.model.checkpoint.format import load_casa_checkpoint
from casa_live.model.checkpoint.hf import detect_layout, import_checkpoint
from casa_live.model.config import GenerationConfig
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CASAModel, Tokenizer, GenerationConfig]:
    """Load a checkpoint directory of any supported layout (ours, Qwen2.5-VL, Kyutai CASA).

    A directory without config.json is taken for ours, so the error names the missing file."""
    path = Path(path)
    layout = detect_layout(path) if (path / CONFIG).exists() else "casa"
    if layout == "casa":
        return load_casa_checkpoint(path, device, dtype)
    model, tokenizer, gen, _ = import_checkpoint(path, layout=layout, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, gen
