"""Checkpoint tensors -> our parameter names, with strict accounting under the checkpoint's names.

Every parameter of our model gets exactly one source: a checkpoint tensor (renamed, and for the
patch embedding folded), or, for separate CASA layers of a plain Qwen2.5-VL checkpoint, a copy of
the block's self-attention (the paper's initialisation). Anything else is an error that lists every
missing, unexpected or wrongly shaped tensor by the name it has (or should have) in the checkpoint.

Name layouts accepted (all seen in the wild or assumed, see docs/checkpoints.md):
- vision tower: `visual.*` (Qwen2.5-VL as released and as transformers 5 saves it),
  `model.visual.*` (transformers' in-memory naming), `model.image_prefix.visual.*` or
  `image_prefix.visual.*` (Kyutai CASA: the module path is known, the state-dict root is not);
- language model: `model.*` or `model.language_model.*`; `lm_head.weight` unless embeddings are tied;
- Kyutai CASA layers: extra tensors under a block, `<lm>layers.N.<anything>.<module>.<weight|bias>`,
  classified by module-name suffix (q/k/v/o projections, norm). Unclassifiable names are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from casa_live.model.checkpoint.common import CheckpointError

INDEX = "model.safetensors.index.json"
VISION_PREFIXES = ("model.image_prefix.visual.", "image_prefix.visual.", "model.visual.", "visual.")
LM_PREFIXES = ("model.language_model.", "model.")
QWEN_BLOCK = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}
# module-name suffix -> CASA slot (checked in order: "o_proj" must not be read as a "proj")
SLOT_SUFFIXES = (
    ("q_proj", "q"),
    ("k_proj", "k"),
    ("v_proj", "v"),
    ("o_proj", "o"),
    ("out_proj", "o"),
    ("layernorm", "norm"),
    ("norm", "norm"),
)
SLOT_NAMES = {"q": "q", "wq": "q", "k": "k", "wk": "k", "v": "v", "wv": "v", "o": "o", "wo": "o"}
OUR_CASA = {
    ("q", "weight"): "casa.proj.q_proj.weight",
    ("q", "bias"): "casa.proj.q_proj.bias",
    ("k", "weight"): "casa.proj.k_proj.weight",
    ("k", "bias"): "casa.proj.k_proj.bias",
    ("v", "weight"): "casa.proj.v_proj.weight",
    ("v", "bias"): "casa.proj.v_proj.bias",
    ("o", "weight"): "casa.proj.o_proj.weight",
    ("norm", "weight"): "casa.norm.weight",
}


# ---- reading ------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors."""
    index = path / INDEX
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {', '.join(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    return files


def tensor_names(path: Path) -> list[str]:
    """Tensor names without loading any data (safetensors headers)."""
    names: list[str] = []
    for f in weight_files(path):
        with safe_open(str(f), "pt") as h:
            names += list(h.keys())
    return names


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard; the index's weight_map must agree with the shards' contents."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in weight_files(path):
        for k, v in load_file(str(f)).items():
            if k in tensors:
                raise CheckpointError(f"tensor {k} is in both {origin[k]} and {f.name}")
            tensors[k], origin[k] = v, f.name
    index = path / INDEX
    if index.exists():
        listed = json.loads(index.read_text())["weight_map"]
        wrong = sorted(k for k, shard in listed.items() if origin.get(k) != shard)
        if wrong:
            raise CheckpointError(
                f"{index} does not match the shards for: " + ", ".join(f"{k} ({listed[k]})" for k in wrong)
            )
    return tensors


# ---- the plan -------------------------------------------------------------------------------------


def fold_patch_embed(w: torch.Tensor) -> torch.Tensor:
    """Conv3d weight (hidden, C, T, P, P) -> Linear weight (hidden, C*P*P) over one frame.

    Qwen feeds a still frame as T identical temporal copies, so the conv is the sum of its T slices.
    """
    return w.float().sum(2).reshape(w.shape[0], -1)


@dataclass
class Source:
    name: str  # checkpoint tensor name
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Plan:
    """Where each of our parameters comes from."""

    sources: dict[str, Source] = field(default_factory=dict)  # our name -> checkpoint tensor
    from_self_attention: set[str] = field(default_factory=set)  # our CASA names, copied at init
    consumed_extra: set[str] = field(default_factory=set)  # checkpoint names checked, not loaded
    problems: list[str] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)  # checkpoint names already in `problems`
    notes: list[str] = field(default_factory=list)


def prefixes(names: list[str]) -> tuple[str, str]:
    """(vision prefix, LM prefix) used by this checkpoint."""
    vp = next((p for p in VISION_PREFIXES if any(n.startswith(p) for n in names)), None)
    if vp is None:
        raise CheckpointError(
            "no vision tower tensors: expected names starting with one of " + ", ".join(VISION_PREFIXES)
        )
    lm_names = [n for n in names if not n.startswith(vp)]
    lp = next((p for p in LM_PREFIXES if any(n.startswith(p + "layers.") for n in lm_names)), None)
    if lp is None:
        raise CheckpointError("no language-model blocks: expected model.layers.N.* tensors")
    return vp, lp


def plan_backbone(
    our: dict[str, torch.Tensor], names: set[str], vp: str, lp: str, tied: bool, casa_from_ckpt: bool
) -> Plan:
    """Vision tower + LM sources; CASA parameters are left for the caller (init or Kyutai mapping)."""
    plan = Plan()
    for ours in our:
        if ours == "vision.patch_embed.weight":
            plan.sources[ours] = Source(f"{vp}patch_embed.proj.weight", fold_patch_embed)
        elif ours.startswith("vision."):
            plan.sources[ours] = Source(vp + ours[len("vision.") :])
        elif ".casa." in ours:
            if not casa_from_ckpt:
                plan.from_self_attention.add(ours)
        elif ours == "lm.lm_head.weight":
            plan.sources[ours] = Source("lm_head.weight")
        else:
            plan.sources[ours] = Source(lp + ours[len("lm.") :])
    if tied and "lm_head.weight" in names:
        plan.consumed_extra.add("lm_head.weight")  # checked equal to the embeddings by `assemble`
    return plan


def classify(module: str) -> str | None:
    """CASA slot of a module name (`casa_q_proj` -> q, `cross_attention_layernorm` -> norm)."""
    m = module.lower()
    if m in SLOT_NAMES:
        return SLOT_NAMES[m]
    for suffix, slot in SLOT_SUFFIXES:
        if m.endswith(suffix):
            return slot
    return None


def plan_kyutai_casa(plan: Plan, names: set[str], lp: str, n_layers: int, qkv_bias: bool) -> list[int]:
    """Find the CASA tensors among a Kyutai checkpoint's block tensors; returns the CASA blocks.

    Fills plan.sources for lm.layers.N.casa.*; records every unclassifiable or conflicting name.
    A checkpoint without any CASA norm gets the block's input norm copied (a note says so).
    """
    claimed = {s.name for s in plan.sources.values()}
    block_re = re.compile(re.escape(lp) + r"layers\.(\d+)\.(.+)$")
    found: dict[int, dict[tuple[str, str], str]] = {}
    for name in sorted(names - claimed):
        m = block_re.match(name)
        if not m:
            continue
        block, rest = int(m.group(1)), m.group(2)
        if rest in QWEN_BLOCK:
            continue
        parts = rest.split(".")
        slot = classify(parts[-2]) if len(parts) >= 2 else None
        key = (slot, parts[-1]) if slot else None
        if key not in OUR_CASA:
            plan.problems.append(
                f"unmatched tensor: {name} (not a Qwen block tensor nor a CASA q/k/v/o/norm)"
            )
            plan.reported.add(name)
            continue
        if block >= n_layers:
            plan.problems.append(f"unmatched tensor: {name} (block {block} >= {n_layers} layers)")
            plan.reported.add(name)
            continue
        slots = found.setdefault(block, {})
        if key in slots:
            plan.problems.append(f"ambiguous CASA tensors in block {block}: {slots[key]} and {name}")
            plan.reported.add(name)
            continue
        slots[key] = name
    required = [("q", "weight"), ("k", "weight"), ("v", "weight"), ("o", "weight")]
    if qkv_bias:
        required += [("q", "bias"), ("k", "bias"), ("v", "bias")]
    with_norm = [b for b, s in found.items() if ("norm", "weight") in s]
    for block, slots in sorted(found.items()):
        for slot, param in required:
            if (slot, param) not in slots:
                seen = ", ".join(sorted(slots.values()))
                plan.problems.append(
                    f"missing CASA tensor: block {block} has no {slot}_proj.{param} (has {seen})"
                )
        for (slot, param), name in slots.items():
            plan.sources[f"lm.layers.{block}.{OUR_CASA[(slot, param)]}"] = Source(name)
        if not with_norm:
            plan.sources[f"lm.layers.{block}.casa.norm.weight"] = Source(
                f"{lp}layers.{block}.input_layernorm.weight"
            )
        elif block not in with_norm:
            plan.problems.append(
                f"missing CASA tensor: block {block} has no norm (other CASA blocks have one)"
            )
    if found and not with_norm:
        plan.notes.append("no CASA norm tensors: each CASA layer uses a copy of its block's input_layernorm")
    return sorted(found)


def assemble(
    plan: Plan, our: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Our state dict from the plan; CheckpointError listing every problem by checkpoint name."""
    problems = list(plan.problems)
    used = {s.name for s in plan.sources.values()} | plan.consumed_extra
    for ours, src in sorted(plan.sources.items()):
        if src.name not in tensors:
            problems.append(f"missing tensor: {src.name} (for {ours})")
    for name in sorted(set(tensors) - used - plan.reported):
        problems.append(f"unexpected tensor: {name}")
    out: dict[str, torch.Tensor] = {}
    for ours, src in plan.sources.items():
        t = tensors.get(src.name)
        if t is None:
            continue
        v = src.transform(t) if src.transform else t
        if v.shape != our[ours].shape:
            problems.append(f"wrong shape: {src.name} {tuple(t.shape)} (for {ours} {tuple(our[ours].shape)})")
            continue
        out[ours] = v
    if "lm_head.weight" in plan.consumed_extra:
        emb = next(s.name for k, s in plan.sources.items() if k == "lm.embed_tokens.weight")
        if emb in tensors and not torch.equal(tensors["lm_head.weight"], tensors[emb]):
            problems.append(f"unexpected tensor: lm_head.weight differs from {emb} but the config ties them")
    if problems:
        head = f"{source}: {len(problems)} problem(s) importing the checkpoint:"
        raise CheckpointError("\n".join([head, *(f"  {p}" for p in problems)]))
    return out
