"""Our checkpoint format: a directory with config.json, model.safetensors, tokenizer.json and
generation_config.json. Loading is strict: every tensor consumed, every parameter filled, or an
error that names each missing and unexpected tensor. This module reads our format only: load.py's
`load` is the entry for any layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from casa_live.model.checkpoint.common import CONFIG, GENERATION, TOKENIZER, WEIGHTS, CheckpointError
from casa_live.model.config import GenerationConfig, ModelConfig
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel


def save_checkpoint(path: str | Path, model: CASAModel, tokenizer: Tokenizer, gen: GenerationConfig) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / CONFIG)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save(path / TOKENIZER)
    gen.save(path / GENERATION)


def strict_load(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy tensors into the model's parameters; raise CheckpointError naming every mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shape = sorted(
        f"{k}: {tuple(tensors[k].shape)} in {source}, {tuple(expected[k].shape)} expected"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    if missing or unexpected or shape:
        lines = [f"{source} does not match the model:"]
        lines += [f"  missing tensor: {k}" for k in missing]
        lines += [f"  unexpected tensor: {k}" for k in unexpected]
        lines += [f"  wrong shape: {s}" for s in shape]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(tensors, strict=True)


def load_casa_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CASAModel, Tokenizer, GenerationConfig]:
    """A directory in our format (load.py's `load` also takes Qwen2.5-VL and Kyutai directories)."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS, TOKENIZER, GENERATION):
        if not (path / name).exists():
            raise CheckpointError(f"{path} is not a casa-live checkpoint: {name} is missing")
    config = ModelConfig.load(path / CONFIG)
    model = CASAModel(config)
    strict_load(model, load_file(str(path / WEIGHTS)), source=str(path / WEIGHTS))
    model = model.to(device=device, dtype=dtype).eval()
    return model, Tokenizer.from_file(path / TOKENIZER), GenerationConfig.load(path / GENERATION)
