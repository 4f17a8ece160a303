"""Import foreign checkpoint directories into our model: Qwen2.5-VL (Hugging Face) and Kyutai CASA.

    layout = detect_layout(path)            # "casa" | "qwen2.5-vl" | "kyutai-casa"
    model, tokenizer, gen, report = import_checkpoint(path)

Loading a directory of any layout (ours included) is `casa_live.model.checkpoint.load.load`.

A plain Qwen2.5-VL checkpoint gets CASA layers initialised from each block's self-attention (the
paper's starting point; every block by default, or `casa.layers`, or the shared variant). A Kyutai
CASA checkpoint brings its own CASA tensors (model/checkpoint/hf/tensors.py says how they are recognised).
Loading is strict either way; see docs/checkpoints.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from casa_live.model.checkpoint.common import CONFIG, CheckpointError
from casa_live.model.checkpoint.hf import config as hfc
from casa_live.model.checkpoint.hf import tensors as hft
from casa_live.model.config import CASAConfig, GenerationConfig
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel

LAYOUTS = ("casa", "qwen2.5-vl", "kyutai-casa")
log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    layout: str
    tensors: int  # checkpoint tensors consumed
    casa_blocks: list[int]
    shared: bool
    initialised_from_self_attention: int  # our CASA parameters copied from self-attention
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"layout: {self.layout}",
            f"checkpoint tensors consumed: {self.tensors}",
            f"CASA blocks: {self.casa_blocks or 'none'}{' (shared with self-attention)' if self.shared else ''}",
        ]
        if self.initialised_from_self_attention:
            lines.append(
                f"CASA parameters copied from self-attention: {self.initialised_from_self_attention}"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def detect_layout(path: str | Path) -> str:
    """Which kind of checkpoint directory this is, from config.json and the tensor names."""
    path = Path(path)
    cfg = hfc.read_json(path / CONFIG)
    if "lm" in cfg and "vision" in cfg:
        return "casa"
    names = hft.tensor_names(path)
    if any(n.startswith(("model.image_prefix.", "image_prefix.")) for n in names):
        return "kyutai-casa"
    if str(cfg.get("model_type", "")).startswith("qwen2_5_vl") or any(
        n.startswith(("visual.", "model.visual.")) for n in names
    ):
        return "qwen2.5-vl"
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (model_type {cfg.get('model_type')!r}); casa-live reads its own "
        "format, Qwen2.5-VL and Kyutai CASA-Qwen2.5-VL directories"
    )


def import_checkpoint(
    path: str | Path,
    casa: CASAConfig | None = None,
    image_size: int | None = None,
    layout: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[CASAModel, Tokenizer, GenerationConfig, ImportReport]:
    """Build our model (on the CPU, parameters in `dtype`) from a Qwen2.5-VL or Kyutai CASA directory.

    casa: for Qwen2.5-VL, which CASA layers to add (default: every block, separate weights); for a
    Kyutai checkpoint, only needed for the shared variant, which stores no CASA tensors.
    image_size: fixed frame side (default 448, the LiveCC runs' size).

    The model is built on the meta device and its parameters are the checkpoint's tensors (cast to
    dtype), so a 3B import needs about one copy of the weights in memory and no random init.
    """
    path = Path(path)
    layout = layout or detect_layout(path)
    if layout == "casa":
        raise CheckpointError(
            f"{path} is already a casa-live checkpoint; load it with casa_live.model.checkpoint.load.load"
        )
    cfg = hfc.read_json(path / CONFIG)
    # the small files first: fail before reading gigabytes of weights
    lm_cfg, _ = hfc.lm_config(cfg), hfc.vision_config(cfg)
    tokenizer = Tokenizer.from_file(_need_file(path, "tokenizer.json"))
    gen, notes = hfc.generation_config(
        tokenizer, hfc.stop_ids(path, cfg), cfg=cfg, hf_gen=hfc.read_generation(path)
    )
    listed = hfc.casa_layers(cfg, lm_cfg.layers)  # config.json's CASA block list, if it has one
    tensors = hft.read_tensors(path)
    names = set(tensors)
    vp, lp = hft.prefixes(sorted(names))

    if layout == "kyutai-casa":
        probe = hft.Plan()
        blocks = hft.plan_kyutai_casa(probe, names, lp, lm_cfg.layers, lm_cfg.qkv_bias)
        if blocks and listed is not None and listed != blocks:
            raise CheckpointError(
                f"{path}: config.json lists CASA blocks {listed}, but the checkpoint has CASA tensors in "
                f"blocks {blocks}"
            )
        if not blocks and listed is not None and not (casa and casa.shared and casa.layers is not None):
            casa = CASAConfig(fusion="casa", layers=listed, shared=True)  # a -Shared checkpoint
            notes.append(f"config.json: CASA blocks {listed}, no CASA tensors: the shared variant")
        if not blocks and not (casa and casa.shared):
            raise CheckpointError(
                f"{path}: no CASA tensors found under {lp}layers.N.*. A -Shared checkpoint stores none: "
                "pass the shared variant and its CASA blocks explicitly (casa convert --shared --casa-layers ...)"
            )
        casa = CASAConfig(fusion="casa", layers=blocks, shared=False) if blocks else casa
    elif casa is None and listed is not None:
        casa = CASAConfig(layers=listed)
        notes.append(f"config.json: CASA layers in blocks {listed}")
    else:
        casa = casa or CASAConfig()
    assert casa is not None
    size = image_size or hfc.LIVE_IMAGE_SIZE  # never a processor config's: LiveCC runs at 448
    config = hfc.model_config(cfg, casa, size, name=f"{layout}:{path.name}")
    with _meta_parameters():
        model = CASAModel(config)
    our = model.state_dict()  # meta tensors: names and shapes
    plan = hft.plan_backbone(
        our, names, vp, lp, config.lm.tie_embeddings, casa_from_ckpt=layout == "kyutai-casa"
    )
    if layout == "kyutai-casa" and not casa.shared:
        hft.plan_kyutai_casa(plan, names, lp, config.lm.layers, config.lm.qkv_bias)
    state = {k: v.to(dtype) for k, v in hft.assemble(plan, our, tensors, str(path)).items()}
    del tensors
    for name in plan.from_self_attention:  # filled below from the imported self-attention
        state[name] = torch.empty(our[name].shape, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)  # accounting was done by assemble
    if plan.from_self_attention:
        model.lm.init_casa_from_self_attention()
    notes += plan.notes

    used = {s.name for s in plan.sources.values()} | plan.consumed_extra
    report = ImportReport(
        layout=layout,
        tensors=len(used & names),
        casa_blocks=model.lm.casa_ids,
        shared=casa.shared,
        initialised_from_self_attention=len(plan.from_self_attention),
        notes=notes,
    )
    for note in notes:
        log.info("%s: %s", path, note)
    return model.eval(), tokenizer, gen, report


@contextmanager
def _meta_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no memory and no random init
    for weights that the checkpoint is about to replace. Buffers (rotary tables) are built normally.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _need_file(path: Path, name: str) -> Path:
    if not (path / name).exists():
        raise CheckpointError(f"{path} has no {name}")
    return path / name
