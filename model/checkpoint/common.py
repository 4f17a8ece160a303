"""What our checkpoint format (format.py) and the foreign importers (hf/) share: the error type and
the file names of a checkpoint directory. Both import this module, never each other; load.py is
the one entry that picks between them. Nothing here imports torch.
"""

from __future__ import annotations

CONFIG, WEIGHTS, TOKENIZER, GENERATION = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""
