"""Hugging Face Qwen2.5-VL configuration files -> our ModelConfig and GenerationConfig.

Two config.json layouts exist in the wild and both are read:
- transformers 4.x (the released Qwen/Qwen2.5-VL-* repos): text keys at the top level,
  `rope_theta`, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`, `vision_config`
  with `in_chans`;
- transformers 5.x `save_pretrained`: text keys under `text_config`, `rope_parameters`.

The generation config follows Kyutai's live-captioning procedure (docs/checkpoints.md): the whole
stream is one never-ending assistant turn of Qwen's chat format, `<|vision_start|>`/`<|vision_end|>`
around each frame (or config.json's `pre_image_tokens`/`post_image_tokens`), stop on any id of
`generation_config.json`'s `eos_token_id`, and the sampling of Kyutai's newest live-captioning
script (2 fps, 20 tokens, temperature 0.4, top-k 256, EMA repetition penalty 1.15 counting fed
tokens, stop-token bias 0.95, 4-gram blocking over 60 tokens, a cut caption closed with the model's
last stop token). Questions (Engine.ask) close that assistant turn on their side branch and open
a user turn with the question and an assistant turn for the answer (`QUESTION_TEMPLATE`), which
ends on `<|im_end|>`. Of generation_config.json's sampling fields, `top_p` is honoured (transformers'
generate applies it under that script too); the others are reported, with the reason, by
`generation_config`'s notes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from casa_live.model.checkpoint.common import CheckpointError
from casa_live.model.config import (
    CASAConfig,
    GenerationConfig,
    LMConfig,
    ModelConfig,
    PromptTemplate,
    VisionConfig,
)
from casa_live.model.tokenizer import Tokenizer

# Kyutai's newer live-captioning prompts (their live_captioner.py; docs/checkpoints.md).
SYSTEM_PROMPT = "You are an expert video commentator providing real-time factual and neutral commentary on visual content."
USER_PROMPT = "Please describe what you see in the video in real-time. Stick to the visual facts. "  # sic: trailing space
CAPTION_PREFIX = "In this video"
LIVE_IMAGE_SIZE = 448  # the LiveCC runs' frame side (256 image tokens)
EOS_BIAS = 0.95  # Kyutai's newest live-captioning script (their older one: 1.0)
# A question on a side branch (Engine.ask), fed at a frame boundary (after the caption's stop token
# and the next frame's <|vision_start|>): the never-ending assistant turn is closed, the question is
# a user turn, and the answer an assistant turn, in Qwen's chat template (its messages are
# "<|im_start|>{role}\n{content}<|im_end|>\n"; add_generation_prompt appends "<|im_start|>assistant\n").
# The answer ends on <|im_end|>, which must therefore be a stop token.
QUESTION_TEMPLATE = "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# config.json keys read when present, at the top level or under text_config (docs/checkpoints.md):
# the frame delimiters (token ids or token strings) and the blocks that carry a CASA layer.
FRAME_KEYS = ("pre_image_tokens", "post_image_tokens")
CASA_LAYER_KEYS = ("casa_layers",)
# generation_config.json keys that say nothing about sampling
_GEN_BOOKKEEPING = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "transformers_version",
    "_from_model_config",
}


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


def read_generation(path: Path) -> dict[str, Any]:
    """generation_config.json of a Hugging Face directory ({} when it has none)."""
    gen_path = path / "generation_config.json"
    return read_json(gen_path) if gen_path.exists() else {}


def stop_ids(path: Path, cfg: dict[str, Any]) -> list[int]:
    """eos_token_id of generation_config.json (int or list), else of config.json."""
    gen = read_generation(path)
    eos = gen.get("eos_token_id", _text_section(cfg).get("eos_token_id", cfg.get("eos_token_id")))
    if eos is None:
        raise CheckpointError(f"{path}: no eos_token_id in generation_config.json or config.json")
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def _key(cfg: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    for section in (cfg, _text_section(cfg)):
        for name in names:
            if section.get(name) is not None:
                return name, section[name]
    return None


def frame_token_ids(cfg: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int] | None, list[int] | None]:
    """config.json's `pre_image_tokens` / `post_image_tokens` as token ids (None where absent).
    Each is an id, a token string, or a list of either; every one must be in tokenizer.json."""
    out: list[list[int] | None] = []
    for key in FRAME_KEYS:
        found = _key(cfg, (key,))
        if found is None:
            out.append(None)
            continue
        value = found[1] if isinstance(found[1], list) else [found[1]]
        ids = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise CheckpointError(
                    f"config.json: {key} must hold token ids or token strings, got {item!r}"
                )
            i = tokenizer.tok.token_to_id(item) if isinstance(item, str) else item
            if i is None or i < 0 or tokenizer.tok.id_to_token(i) is None:
                raise CheckpointError(f"config.json: {key} names {item!r}, which is not in tokenizer.json")
            ids.append(int(i))
        out.append(ids)
    return out[0], out[1]


def casa_layers(cfg: dict[str, Any], n_layers: int) -> list[int] | None:
    """The CASA block list of config.json (`casa_layers`), None when absent."""
    found = _key(cfg, CASA_LAYER_KEYS)
    if found is None:
        return None
    name, value = found
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise CheckpointError(f"config.json: {name} must be a list of block indices, got {value!r}")
    bad = [i for i in value if not 0 <= i < n_layers]
    if bad:
        raise CheckpointError(
            f"config.json: {name} names blocks {bad}; the model has {n_layers} (0-{n_layers - 1})"
        )
    return sorted(set(value))


def sampling_fields(hf_gen: dict[str, Any], gen: GenerationConfig) -> list[str]:
    """Apply generation_config.json's sampling fields to `gen` where casa-live honours them (top_p);
    returns one note per field it does not, saying why (printed by `casa convert`, logged at load)."""
    notes = []
    for key in sorted(set(hf_gen) - _GEN_BOOKKEEPING):
        value = hf_gen[key]
        if key == "top_p":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise CheckpointError(f"generation_config.json: top_p {value!r} must be between 0 and 1")
            gen.top_p = float(value)
            if value < 1.0:
                notes.append(
                    f"generation_config.json: top_p {value} honoured when sampling (transformers' generate "
                    "applies it under Kyutai's script too); a session's top_p overrides it"
                )
        elif key in ("temperature", "top_k", "do_sample"):
            notes.append(
                f"generation_config.json: {key} {value!r} ignored: Kyutai's live-captioning script passes its "
                f"own sampling (temperature {gen.temperature}, top-k {gen.top_k}), which replaces the file's"
            )
        elif key == "repetition_penalty":
            if value != 1.0:
                notes.append(
                    f"generation_config.json: repetition_penalty {value!r} ignored: it is transformers' "
                    "multiplicative penalty over one generate call's tokens, which casa-live does not "
                    f"implement; the EMA repetition penalty ({gen.repetition_penalty}) applies instead"
                )
        elif key in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
            notes.append(
                f"generation_config.json: {key} {value!r} ignored: a frame's caption has its own "
                f"length (max_new_tokens {gen.max_new_tokens}, per session)"
            )
        else:
            notes.append(f"generation_config.json: {key} {value!r} ignored: casa-live does not implement it")
    return notes


def question_template(tokenizer: Tokenizer, stop_names: list[str]) -> tuple[str | None, list[str]]:
    """The chat-format question template (`QUESTION_TEMPLATE`) and notes: None, with a note saying
    why, when the tokenizer lacks Qwen's chat tokens or `<|im_end|>` is not a stop token (an answer
    would then run to max_new_tokens: such a checkpoint answers no questions)."""
    missing = [t for t in CHAT_TOKENS if tokenizer.tok.token_to_id(t) is None]
    if missing:
        return None, [
            f"tokenizer.json has no {', '.join(missing)}: no chat format, so the model answers no questions"
        ]
    if "<|im_end|>" not in stop_names:
        return None, [
            "generation_config.json: <|im_end|> is not among eos_token_id, so an answer in the chat "
            "format would not end: the model answers no questions"
        ]
    return QUESTION_TEMPLATE, []


def generation_config(
    tokenizer: Tokenizer,
    eos_ids: list[int],
    fps: float = 2.0,
    cfg: dict[str, Any] | None = None,
    hf_gen: dict[str, Any] | None = None,
) -> tuple[GenerationConfig, list[str]]:
    """Kyutai's live-captioning setup on Qwen's chat format, stopping on every eos id, and the notes
    on generation_config.json's fields (`hf_gen`, see `sampling_fields`).

    The engine takes stop tokens as strings; each id goes through the tokenizer's own vocabulary
    (LiveCC's extra stop ids are ordinary BPE tokens, not registered special tokens). config.json's
    frame delimiters (`pre_image_tokens`, `post_image_tokens`) replace the vision tokens when present.
    Questions get the chat-format template of `question_template` (answers end on `<|im_end|>`).
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
    template.question, notes = question_template(tokenizer, names)
    if cfg is not None:
        template.pre_image_ids, template.post_image_ids = frame_token_ids(cfg, tokenizer)
        for key, ids in zip(FRAME_KEYS, (template.pre_image_ids, template.post_image_ids)):
            if ids is not None:
                notes.append(
                    f"config.json: {key} {ids} ({tokenizer.decode(ids) or 'special tokens'}) frame each image"
                )
    gen = GenerationConfig(
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
        eos_bias=EOS_BIAS,
        penalty_counts="fed",
        truncated_close="last_stop",
    )
    return gen, notes + sampling_fields(hf_gen or {}, gen)
