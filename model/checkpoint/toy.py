"""Random-weight models and word-level tokenizers for tests and benchmarks (never for serving).

Everything is made locally and deterministically: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from casa_live.model.checkpoint.format import save_checkpoint
from casa_live.model.config import GenerationConfig, ModelConfig, PromptTemplate, preset
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel

SPECIAL = ["<|pad|>", "<|unk|>", "<|vision_start|>", "<|vision_end|>", "<|frame_end|>", "<|im_end|>"]
WORDS = [
    "a",
    "an",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "small",
    "big",
    "left",
    "right",
    "centre",
    "top",
    "middle",
    "bottom",
    "appears",
    "moves",
    "leaves",
    "stays",
    "at",
    "in",
    "of",
    "and",
    "is",
    "are",
    "nothing",
    "there",
    "scene",
    "empty",
    "video",
    "shows",
    "describe",
    "what",
    "you",
    "see",
    "now",
    "yes",  # the answers a watch weighs (model/engine/scheduler.py answer_ids)
    "no",
]


def word_tokenizer(vocab: int, words: list[str] | None = None) -> Tokenizer:
    """A word-level tokenizer with the special tokens first, padded with filler words to `vocab`."""
    words = list(words or WORDS)
    names = SPECIAL + [w for w in words if w not in SPECIAL]
    names += [f"w{i}" for i in range(vocab - len(names))]
    if len(names) > vocab:
        raise ValueError(f"{len(names)} tokens do not fit a vocabulary of {vocab}")
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(SPECIAL)
    return Tokenizer(tok)


def toy_generation_config(**overrides) -> GenerationConfig:
    gen = GenerationConfig(
        stop_tokens=["<|frame_end|>", "<|im_end|>"],
        template=PromptTemplate(
            prefix="{prompt}",
            caption_prefix="video shows",
            default_prompt="describe what you see",
            question="<|im_end|> {question} <|vision_end|>",  # any form: the weights are random
        ),
    )
    for k, v in overrides.items():
        setattr(gen, k, v)
    return gen


def toy_model(config: ModelConfig | str = "test-tiny", seed: int = 0, **casa) -> CASAModel:
    cfg = preset(config) if isinstance(config, str) else config
    for k, v in casa.items():
        setattr(cfg.casa, k, v)
    return CASAModel.random(cfg, seed=seed)


def toy_checkpoint(path: str | Path, config: ModelConfig | str = "test-tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint directory (our format) and return its path."""
    model = toy_model(config, seed)
    save_checkpoint(path, model, word_tokenizer(model.config.lm.vocab), toy_generation_config())
    return Path(path)
