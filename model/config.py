"""Model and generation configuration: small composed dataclasses with a JSON round-trip.

`ModelConfig` = `VisionConfig` + `LMConfig` + `CASAConfig`; `GenerationConfig` (stop tokens, prompt
template, sampling defaults) travels beside it in `generation_config.json`. Server settings are a
separate object (server/settings.py). Named presets live in `PRESETS`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Fusion = Literal["casa", "ca", "insertion"]


@dataclass
class VisionConfig:
    """Qwen2.5-VL-style ViT: patch embed, 2D RoPE, windowed + full-attention blocks, 2x2 merger."""

    depth: int = 4
    hidden: int = 128
    heads: int = 4
    mlp: int = 384
    patch: int = 14
    in_channels: int = 3
    merge: int = 2  # spatial merge: merge x merge patches -> one image token
    window: int = 112  # window side in pixels for the windowed-attention blocks
    fullatt_blocks: list[int] = field(default_factory=lambda: [3])
    out_hidden: int = 256  # merger output == the LM hidden size
    rope_theta: float = 10000.0
    eps: float = 1e-6
    # side of a learned table of absolute positions added to the image tokens (merged grid, resized
    # when a frame's grid differs); 0: none, as Qwen. RoPE alone leaves a token on a plain
    # background without its place in the frame (docs/training.md, "Absolute positions").
    abs_pos: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patch_dim(self) -> int:
        # one frame, no temporal patching: C * P * P (588 for Qwen's 14-px patches)
        return self.in_channels * self.patch * self.patch

    @property
    def window_units(self) -> int:
        # window side counted in merged tokens (Qwen: 112 / 14 / 2 = 4)
        return max(1, self.window // self.patch // self.merge)


@dataclass
class LMConfig:
    """Qwen2-style decoder: RMSNorm, RoPE/M-RoPE, GQA, SwiGLU, qkv bias."""

    vocab: int = 512
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    mlp: int = 768
    rope_theta: float = 10000.0
    # M-RoPE sections over head_dim/2 frequencies: (temporal, height, width). For text all three
    # positions are equal, which is plain RoPE.
    mrope_section: list[int] = field(default_factory=lambda: [8, 12, 12])
    qkv_bias: bool = True
    tie_embeddings: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


@dataclass
class CASAConfig:
    """Which blocks get a fusion layer and how it attends.

    fusion: "casa" = CA^{t+v} (image tokens + causal window text as keys, RoPE);
            "ca" = plain cross-attention (image tokens only, no RoPE);
            "insertion" = no fusion layers, image tokens inserted into the text stream (baseline).
    layers: block indices with a CASA layer; None = every block.
    shared: reuse the block's self-attention q/k/v/o projections (the paper's CA^share variant).
    """

    fusion: Fusion = "casa"
    layers: list[int] | None = None
    shared: bool = False

    def layer_ids(self, n_layers: int) -> list[int]:
        if self.fusion == "insertion":
            return []
        return list(range(n_layers)) if self.layers is None else sorted(self.layers)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    casa: CASAConfig = field(default_factory=CASAConfig)
    image_size: int = 112  # frames are resized to image_size x image_size before patchify
    name: str = "casa"
    # frame preprocessing: "casa" (torch bicubic, model/processor.ImageProcessor) or "qwen"
    # (PIL antialiased resize as transformers' Qwen2-VL processor, for imported checkpoints)
    processor: str = "casa"

    def __post_init__(self) -> None:
        if self.vision.out_hidden != self.lm.hidden:
            raise ValueError("vision.out_hidden must equal lm.hidden (image tokens feed the LM's k/v)")
        unit = self.vision.patch * self.vision.merge
        if self.image_size % unit:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch*merge = {unit}")

    @property
    def image_tokens(self) -> int:
        side = self.image_size // (self.vision.patch * self.vision.merge)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(
            vision=VisionConfig(**d.get("vision", {})),
            lm=LMConfig(**d.get("lm", {})),
            casa=CASAConfig(**d.get("casa", {})),
            image_size=d.get("image_size", 112),
            name=d.get("name", "casa"),
            processor=d.get("processor", "casa"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class PromptTemplate:
    """Kyutai's live-captioning layout: the stream is one never-ending assistant turn.

    Frame 0: prefix.format(prompt=...) + pre_image, [frame], post_image + caption_prefix.
    Frame t>0: pre_image, [frame], post_image.
    """

    prefix: str = "{prompt}"
    pre_image: str = "<|vision_start|>"
    post_image: str = "<|vision_end|>"
    caption_prefix: str = ""
    default_prompt: str = "Describe what you see."
    # the frame delimiters as token ids, when a checkpoint names them so (they win over the strings)
    pre_image_ids: list[int] | None = None
    post_image_ids: list[int] | None = None
    # A question on a side branch of the stream, fed after a frame's caption is closed; the answer
    # is generated after it and ends with a stop token. None: the model answers no questions.
    question: str | None = None  # e.g. "<|question|>{question}<|answer|>"
    # What the model's answers begin with, taken off the answer's text (and put before "yes" and
    # "no" when a watch looks up their token ids). The bundled model answers " bottom right", so
    # that an answer's words are the very tokens its captions use ("Ġbottom"); encoded bare,
    # "bottom" is the pieces "b ot tom", whose first piece also begins "blue" and "big".
    answer_prefix: str = ""


# The text KV cache bound of a checkpoint whose generation config names none.
DEFAULT_CONTEXT_TOKENS = 1024


@dataclass
class GenerationConfig:
    stop_tokens: list[str] = field(default_factory=lambda: ["<|frame_end|>"])
    template: PromptTemplate = field(default_factory=PromptTemplate)
    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    repetition_decay: float = 0.99
    repetition_clamp: float = 5.0
    no_repeat_ngram: int = 0
    ngram_window: int = 60
    fps: float = 2.0
    top_p: float = 1.0  # 1 = no nucleus filter
    eos_bias: float = 1.0  # stop-token logit bias (model/engine/sampling.py); 1 = none
    # What the EMA penalty and the n-gram history count: "emitted" tokens (casa-live's models) or
    # every "fed" token as Kyutai's scripts do (imported checkpoints); model/engine/sampling.py says how.
    penalty_counts: Literal["emitted", "fed"] = "emitted"
    # What closes a caption cut short by max_new_tokens or the deadline: the model's most recent
    # "last_stop" token (Kyutai's procedure, imported checkpoints) or the "cut_word" then the first
    # stop token (what casa-live's own models were trained and benchmarked with).
    truncated_close: Literal["last_stop", "cut_word"] = "cut_word"
    # The text context the checkpoint is meant to stream with: the default bound of the text KV
    # cache (`max_context_tokens`). None: the engine's default (DEFAULT_CONTEXT_TOKENS). A model
    # trained on short clips has never seen positions far past its training length, and a longer
    # bound costs attention reads every step without buying quality (docs/engine.md).
    context_tokens: int | None = None
    # The model's captions narrate what changed since its previous caption (casa-live's world
    # models): after a gap in a live stream (frames not captioned: shed past capacity, replaced
    # while the row was busy) those changes are no longer one event a frame, so the server gives
    # the session a fresh row and the caption restates the scene, as a stream's first caption does
    # (server/overload.py). False (imported checkpoints): the row keeps its history across gaps.
    restate_after_gap: bool = False

    def __post_init__(self) -> None:
        if self.penalty_counts not in ("emitted", "fed"):
            raise ValueError(f"penalty_counts is {self.penalty_counts!r}; it must be 'emitted' or 'fed'")
        if self.truncated_close not in ("last_stop", "cut_word"):
            raise ValueError(
                f"truncated_close is {self.truncated_close!r}; it must be 'last_stop' or 'cut_word'"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        d = dict(d)
        tmpl = PromptTemplate(**d.pop("template", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(template=tmpl, **{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GenerationConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _test_tiny() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            depth=2,
            hidden=32,
            heads=2,
            mlp=48,
            patch=4,
            merge=2,
            window=16,
            fullatt_blocks=[1],
            out_hidden=64,
        ),
        lm=LMConfig(
            vocab=96, hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, mlp=96, mrope_section=[2, 3, 3]
        ),
        casa=CASAConfig(layers=[0, 2]),
        image_size=24,
        name="test-tiny",
    )


def _default() -> ModelConfig:
    return ModelConfig(
        # Vision width 64: the tower is the largest training cost (256 patches per frame, every
        # frame of every clip), and flat-coloured shapes need no more (docs/training.md: the CPU budget).
        vision=VisionConfig(
            depth=4,
            hidden=64,
            heads=2,
            mlp=192,
            patch=8,
            merge=2,
            window=64,
            fullatt_blocks=[1, 3],
            out_hidden=192,
        ),
        # The LM runs ~20 times per frame, the vision tower once: keep the LM lean so one decode
        # step stays a few ms on 2 CPU cores (per-step weights ~8 MB); spend the rest on vision.
        lm=LMConfig(
            vocab=512,
            hidden=192,
            layers=4,
            heads=3,
            # one K/V head per query head: copying an object's shape from the caption history
            # ("the green ..." -> "triangle") needs its own key space next to the image lookups
            kv_heads=3,
            head_dim=64,
            mlp=576,
            # M-RoPE gives the frame's columns the LOWEST frequencies, so theta trades image
            # resolution against text reach. theta 1e4 (with sections [8, 12, 12]) turns a whole
            # 8-token row by < 0.03 rad: left/centre/right are invisible to CASA attention (the ViT
            # has no absolute positions). theta 100 resolves columns but every text frequency
            # turns >= 0.0115 rad per token, so no head can match "green" 100-300 tokens back by
            # content: copying the shape of a leaving object from the history stayed near chance.
            # theta 1000 with sections [2, 6, 24] keeps column steps of 0.06-0.18 rad on the top
            # width frequencies and leaves six frequency pairs under 0.004 rad per token.
            rope_theta=1000.0,
            mrope_section=[2, 6, 24],
        ),
        casa=CASAConfig(),
        image_size=128,
        name="default",
    )


def _mid() -> ModelConfig:
    # The benchmark shape: hidden 512, 8 layers, 256 image tokens per frame (a mid-size model whose
    # per-step cost the benchmarks and kernels are measured at).
    return ModelConfig(
        vision=VisionConfig(
            depth=4,
            hidden=256,
            heads=4,
            mlp=768,
            patch=14,
            merge=2,
            window=112,
            fullatt_blocks=[3],
            out_hidden=512,
        ),
        lm=LMConfig(
            vocab=4096,
            hidden=512,
            layers=8,
            heads=8,
            kv_heads=2,
            head_dim=64,
            mlp=1536,
            mrope_section=[8, 12, 12],
        ),
        casa=CASAConfig(),
        image_size=448,
        name="mid",
    )


def _qwen25_vl_3b() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            depth=32,
            hidden=1280,
            heads=16,
            mlp=3420,
            patch=14,
            merge=2,
            window=112,
            fullatt_blocks=[7, 15, 23, 31],
            out_hidden=2048,
        ),
        lm=LMConfig(
            vocab=151936,
            hidden=2048,
            layers=36,
            heads=16,
            kv_heads=2,
            head_dim=128,
            mlp=11008,
            rope_theta=1e6,
            mrope_section=[16, 24, 24],
            qkv_bias=True,
            tie_embeddings=True,
        ),
        casa=CASAConfig(),
        image_size=448,
        name="qwen2.5-vl-3b",
    )


PRESETS = {
    "test-tiny": _test_tiny,
    "default": _default,
    "mid": _mid,
    "qwen2.5-vl-3b": _qwen25_vl_3b,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
