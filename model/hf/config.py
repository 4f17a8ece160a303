"""Hugging Face Qwen2.5-VL configuration files -> our ModelConfig and GenerationConfig.

Two config.json layouts exist in the wild and both are read:
- transformers 4.x (the released Qwen/Qwen2.5-VL-* repos): text keys at the top level,
  `rope_theta`, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`, `vision_config`
  with `in_chans`;
- transformers 5.x `save_pretrained`: text keys under `text_config`, `rope_parameters`.

The generation config follows Kyutai's live-captioning procedure (docs/checkpoints.md): the whole
stream is one never-ending assistant turn of Qwen's chat format, `<|vision_start|>`/`<|vision_end|>`
around each frame, stop on any id of `generation_config.json`'s `eos_token_id`, and the sampling
defaults of the LiveCC scripts (2 fps, 20 tokens, temperature 0.4, top-k 256, repetition penalty
1.15, 4-gram blocking over 60 tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.config import CASAConfig, GenerationConfig, LMConfig, ModelConfig, PromptTemplate, VisionConfig
from model.tokenizer import Tokenizer
from model.weights import CheckpointError

# Kyutai's newer live-captioning prompts (their live_captioner.py; docs/checkpoints.md).
SYSTEM_PROMPT = "You are an expert video commentator providing real-time factual and neutral commentary on visual content."
USER_PROMPT = "Please describe what you see in the video in real-time. Stick to the visual facts. "  # sic: trailing space
CAPTION_PREFIX = "In this video"
LIVE_IMAGE_SIZE = 448  # the LiveCC runs' frame side (256 image tokens)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _need(d: dict[str, Any], key: str, where: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in d and d[k] is not None:
            return d[k]
    raise CheckpointError(f"config.json: {where} has no {key!r}; cannot build the model without it")


def _text_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text-model keys: `text_config` (transformers 5) or the top level (transformers 4)."""
    text = cfg.get("text_config")
    return text if isinstance(text, dict) and "hidden_size" in text else cfg


def _rope(text: dict[str, Any]) -> tuple[float, list[int]]:
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    section = params.get("mrope_section") or scaling.get("mrope_section")
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", "mrope"):
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported (only plain M-RoPE)")
    return float(theta), list(section) if section else []


def vision_config(cfg: dict[str, Any]) -> VisionConfig:
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise CheckpointError("config.json has no vision_config: not a Qwen2.5-VL checkpoint")
    where = "vision_config"
    temporal = v.get("temporal_patch_size", 2)
    if temporal not in (1, 2):
        raise CheckpointError(f"config.json: temporal_patch_size {temporal} is not supported (1 or 2)")
    theta = (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return VisionConfig(
        depth=_need(v, "depth", where, "num_hidden_layers"),
        hidden=_need(v, "hidden_size", where, "embed_dim"),
        heads=_need(v, "num_heads", where, "num_attention_heads"),
        mlp=_need(v, "intermediate_size", where),
        patch=_need(v, "patch_size", where, "spatial_patch_size"),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        merge=_need(v, "spatial_merge_size", where),
        window=_need(v, "window_size", where),
        fullatt_blocks=list(_need(v, "fullatt_block_indexes", where)),
        out_hidden=_need(v, "out_hidden_size", where),
        rope_theta=float(theta),
        eps=1e-6,  # Qwen2.5-VL hard-codes the vision RMSNorm eps
    )


def lm_config(cfg: dict[str, Any]) -> LMConfig:
    text = _text_section(cfg)
    where = "text_config" if text is not cfg else "the text model section"
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {text['hidden_act']!r} is not supported (silu)")
    if text.get("use_sliding_window"):
        raise CheckpointError("config.json: use_sliding_window=true is not supported")
    hidden = _need(text, "hidden_size", where)
    heads = _need(text, "num_attention_heads", where)
    theta, section = _rope(text)
    head_dim = hidden // heads  # Qwen2.5-VL's attention derives it; a head_dim key is ignored there too
    if not section:
        raise CheckpointError("config.json: no mrope_section (rope_parameters / rope_scaling)")
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return LMConfig(
        vocab=_need(text, "vocab_size", where),
        hidden=hidden,
        layers=_need(text, "num_hidden_layers", where),
        heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp=_need(text, "intermediate_size", where),
        rope_theta=theta,
        mrope_section=section,
        qkv_bias=True,
        tie_embeddings=bool(tie),
        eps=float(text.get("rms_norm_eps", 1e-6)),
    )


def model_config(
    cfg: dict[str, Any], casa: CASAConfig, image_size: int = LIVE_IMAGE_SIZE, name: str = "qwen2.5-vl"
) -> ModelConfig:
    try:
        return ModelConfig(
            vision_config(cfg), lm_config(cfg), casa, image_size=image_size, name=name, processor="qwen"
        )
    except ValueError as e:  # our configs validate themselves (e.g. out_hidden == hidden)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"config.json describes a model casa-live cannot build: {e}") from None


def stop_ids(path: Path, cfg: dict[str, Any]) -> list[int]:
    """eos_token_id of generation_config.json (int or list), else of config.json."""
    gen_path = path / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}
    eos = gen.get("eos_token_id", _text_section(cfg).get("eos_token_id", cfg.get("eos_token_id")))
    if eos is None:
        raise CheckpointError(f"{path}: no eos_token_id in generation_config.json or config.json")
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def generation_config(tokenizer: Tokenizer, eos_ids: list[int], fps: float = 2.0) -> GenerationConfig:
    """Kyutai's live-captioning setup on Qwen's chat format, stopping on every eos id.

    The engine takes stop tokens as strings; each id goes through the tokenizer's own vocabulary
    (LiveCC's extra stop ids are ordinary BPE tokens, not registered special tokens).
    """
    names = []
    for i in eos_ids:
        name = tokenizer.tok.id_to_token(i)
        if name is None or tokenizer.tok.token_to_id(name) != i:
            raise CheckpointError(f"stop token id {i} is not in tokenizer.json's vocabulary")
        names.append(name)
    template = PromptTemplate(
        prefix=(
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ),
        pre_image="<|vision_start|>",
        post_image="<|vision_end|>",
        caption_prefix=CAPTION_PREFIX,
        default_prompt=USER_PROMPT,
    )
    return GenerationConfig(
        stop_tokens=names,
        template=template,
        max_new_tokens=20,
        temperature=0.4,
        top_k=256,
        repetition_penalty=1.15,
        repetition_decay=0.99,
        repetition_clamp=5.0,
        no_repeat_ngram=4,
        ngram_window=60,
        fps=fps,
    )
