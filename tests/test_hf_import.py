"""Checkpoint import == transformers' Qwen2.5-VL at a tiny random configuration, strict accounting,
the Kyutai CASA layout (as assumed), and live captioning through the engine in Qwen's chat format.

transformers is a test-only dependency; the checkpoints are written by the test itself, nothing is
downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ATOL, assert_close
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from casa_live.model.checkpoint.common import CheckpointError
from casa_live.model.checkpoint.hf import config as hfc
from casa_live.model.checkpoint.hf import detect_layout, import_checkpoint
from casa_live.model.checkpoint.load import load
from casa_live.model.config import CASAConfig
from casa_live.model.engine.engine import Engine, SessionSettings
from casa_live.model.processor import QwenImageProcessor
from casa_live.model.reference import Interleaved, dense_forward

transformers = pytest.importorskip("transformers")

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]
STOP_WORD = "KeyEvent"  # a LiveCC-style stop id that is an ordinary vocabulary token
VOCAB = 160


def qwen_tokenizer() -> HFTokenizer:
    """Word-level tokenizer with Qwen's special tokens and the live-captioning prompt's words."""
    words = (hfc.SYSTEM_PROMPT + " " + hfc.USER_PROMPT + " " + hfc.CAPTION_PREFIX).split()
    names = [*QWEN_SPECIAL, "<unk>", STOP_WORD]
    names += [w for w in dict.fromkeys(words) if w not in names]
    names += ["system", "user", "assistant"]
    names += [f"w{i}" for i in range(VOCAB - len(names))]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(QWEN_SPECIAL)
    return tok


def hf_config(tie: bool = True):
    return transformers.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,  # windows of 2x2 merged tokens: several per image, some cut by the border
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            tie_word_embeddings=tie,
            bos_token_id=0,
            eos_token_id=2,
        ),
        tie_word_embeddings=tie,
        image_token_id=QWEN_SPECIAL.index("<|image_pad|>"),
        vision_start_token_id=QWEN_SPECIAL.index("<|vision_start|>"),
        vision_end_token_id=QWEN_SPECIAL.index("<|vision_end|>"),
    )


def write_hf_checkpoint(path: Path, tie: bool = True, seed: int = 0):
    """A random Qwen2.5-VL saved by transformers itself (sharded, with index), plus tokenizer,
    generation and preprocessor configs. Weights are larger than the default init so that attention
    patterns are far from uniform."""
    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(tie)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(std=0.15)
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    tok = qwen_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"), tok.token_to_id(STOP_WORD)]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0}))
    transformers.Qwen2VLImageProcessorPil().save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("qwen")
    return path, write_hf_checkpoint(path)


def copy_with_tensors(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint directory, rewriting its tensors as one model.safetensors via edit(dict)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def text_only(tokens: torch.Tensor, grid: tuple[int, int], hidden: int) -> Interleaved:
    B, T = tokens.shape
    return Interleaved(
        tokens=tokens,
        text_len=torch.full((B,), T),
        images=torch.zeros(B, 1, grid[0] * grid[1], hidden),
        n_frames=torch.zeros(B, dtype=torch.long),
        insert_at=torch.zeros(B, 1, dtype=torch.long),
        grid=grid,
    )


# ---- equivalence with transformers -------------------------------------------------------------


@pytest.mark.parametrize("size", [(56, 56), (112, 84), (84, 168), (196, 140)])
def test_vision_tower_matches_transformers(hf_dir, size: tuple[int, int]) -> None:
    path, hf = hf_dir
    model, *_ = import_checkpoint(path, image_size=56)
    gh, gw = size[0] // 14, size[1] // 14
    torch.manual_seed(1)
    patches = torch.randn(gh * gw, 3 * 14 * 14)
    # HF rows: (C, T=2, P, P), the frame tiled over both temporal slots
    hf_rows = patches.view(-1, 3, 1, 14 * 14).expand(-1, 3, 2, 14 * 14).reshape(gh * gw, -1)
    with torch.no_grad():
        ref = hf.model.visual(hf_rows, grid_thw=torch.tensor([[1, gh, gw]])).pooler_output
        ours = model.vision(patches[None], (gh, gw))[0]
    assert ours.shape == ref.shape == (gh * gw // 4, 64)
    assert_close(ours, ref, torch.float32, "vision tower", atol=ATOL)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("casa", [CASAConfig(layers=[]), CASAConfig(fusion="ca")])
def test_lm_logits_match_transformers(hf_dir, tmp_path, tie: bool, casa: CASAConfig) -> None:
    """Text-only input, CASA contribution absent (no CASA layer, or 'ca' fusion without a frame)."""
    path, hf = hf_dir
    if not tie:
        path = tmp_path / "untied"
        hf = write_hf_checkpoint(path, tie=False, seed=2)
        assert (
            "lm_head.weight" in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        )
    model, *_ = import_checkpoint(path, casa=casa, image_size=56)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = hf.model.language_model(input_ids=tokens).last_hidden_state
        ref = hf.lm_head(h)
        ours = dense_forward(model.lm, text_only(tokens, model.grid, 64))
    assert_close(ours, ref, torch.float32, "lm logits", atol=ATOL)


def test_insertion_fusion_matches_transformers_with_an_image(hf_dir) -> None:
    """`--fusion insertion` is plain Qwen2.5-VL: a non-square frame inserted as placeholder tokens,
    positions from transformers' own get_rope_index."""
    path, hf = hf_dir
    model, *_ = import_checkpoint(path, casa=CASAConfig(fusion="insertion"), image_size=56)
    g = torch.Generator().manual_seed(7)
    gh, gw = 12, 8  # patches; merged grid 6 x 4
    n = gh * gw // 4
    patches = torch.randn(gh * gw, 3 * 14 * 14, generator=g)
    start, end, pad = (QWEN_SPECIAL.index(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    before = [*torch.randint(10, VOCAB, (5,), generator=g).tolist(), start]
    after = [end, *torch.randint(10, VOCAB, (6,), generator=g).tolist()]
    ids = torch.tensor([before + [pad] * n + after])
    with torch.no_grad():
        ref = hf(
            input_ids=ids,
            pixel_values=patches.view(-1, 3, 1, 196).expand(-1, 3, 2, 196).reshape(gh * gw, -1),
            image_grid_thw=torch.tensor([[1, gh, gw]]),
            mm_token_type_ids=(ids == pad).int(),
        ).logits[0]
        ref = torch.cat([ref[: len(before)], ref[len(before) + n :]])
        batch = Interleaved(
            tokens=torch.tensor([before + after]),
            text_len=torch.tensor([len(before) + len(after)]),
            images=model.vision(patches[None], (gh, gw))[None],
            n_frames=torch.tensor([1]),
            insert_at=torch.tensor([[len(before)]]),
            grid=(gh // 2, gw // 2),
        )
        ours = dense_forward(model.lm, batch)[0]
    assert_close(ours, ref, torch.float32, "insertion logits", atol=ATOL)


@pytest.mark.parametrize(
    ("shape", "image_size", "max_pixels"),
    [
        ((73, 211), None, 28 * 28 * 1280),
        ((300, 200), None, 112 * 112),
        ((200, 200), 112, 112 * 112 + 100),
        ((360, 640), None, 448 * 448),  # a 16:9 camera at the engine's default budget (256 tokens)
        ((1080, 1920), None, 448 * 448),
    ],
)
def test_image_processor_matches_transformers(shape, image_size, max_pixels) -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    hf_proc = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    )
    out = hf_proc(images=[image], return_tensors="pt")
    _, gh, gw = out["image_grid_thw"][0].tolist()
    ref = out["pixel_values"].view(gh * gw, 3, 2, 14 * 14)[:, :, 0].reshape(gh * gw, -1)
    proc = QwenImageProcessor(14, 2, image_size=image_size, max_pixels=max_pixels)
    patches, grid = proc.process(image)
    assert grid == (gh, gw)
    assert_close(patches, ref, torch.float32, "pixel patches", atol=ATOL)


# ---- strict accounting ---------------------------------------------------------------------------


def _drop(t):
    del t["model.layers.1.mlp.down_proj.weight"]


def _rename(t):
    t["model.layers.1.mlp.down.weight"] = t.pop("model.layers.1.mlp.down_proj.weight")


def _extra(t):
    t["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(4)


def _reshape(t):
    t["visual.blocks.0.attn.qkv.bias"] = torch.zeros(7)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_drop, ["missing tensor: model.layers.1.mlp.down_proj.weight"]),
        (
            _rename,
            [
                "missing tensor: model.layers.1.mlp.down_proj.weight",
                "unexpected tensor: model.layers.1.mlp.down.weight",
            ],
        ),
        (_extra, ["unexpected tensor: model.layers.0.self_attn.rotary.inv_freq"]),
        (_reshape, ["wrong shape: visual.blocks.0.attn.qkv.bias (7,)"]),
    ],
)
def test_strict_accounting_names_checkpoint_tensors(hf_dir, tmp_path, edit, expected) -> None:
    path = copy_with_tensors(hf_dir[0], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(path)
    for line in expected:
        assert line in str(err.value)
    assert str(err.value).count("\n") == len(expected)  # nothing else reported


def _newer_names(t):
    """transformers' in-memory names (model.visual.*, model.language_model.*) and a tied lm_head."""
    for k in list(t):
        if k.startswith("visual."):
            t["model." + k] = t.pop(k)
        elif k.startswith("model."):
            t["model.language_model." + k[len("model.") :]] = t.pop(k)
    t["lm_head.weight"] = t["model.language_model.embed_tokens.weight"].clone()


def test_other_prefixes_and_tied_head(hf_dir, tmp_path) -> None:
    ref, *_ = import_checkpoint(hf_dir[0])
    path = copy_with_tensors(hf_dir[0], tmp_path / "newer", _newer_names)
    model, _, _, rep = import_checkpoint(path)
    assert rep.tensors == len(load_file(str(path / "model.safetensors")))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())

    def untie(t):
        _newer_names(t)
        t["lm_head.weight"] += 1.0

    path = copy_with_tensors(hf_dir[0], tmp_path / "untied", untie)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(path)
    assert "lm_head.weight differs from model.language_model.embed_tokens.weight" in str(err.value)


def test_load_checkpoint_and_convert_roundtrip(hf_dir, tmp_path) -> None:
    """`--model DIR` on an HF directory imports it; `casa convert` writes our format, same weights."""
    from casa_live.cli.convert import main as convert

    path, _ = hf_dir
    assert detect_layout(path) == "qwen2.5-vl"
    model, _, gen = load(path)
    assert gen.stop_tokens == ["<|im_end|>", "<|endoftext|>", STOP_WORD]
    assert gen.temperature == 0.4 and gen.top_k == 256 and gen.max_new_tokens == 20
    out = tmp_path / "ours"
    assert convert([str(path), str(out), "--casa-layers", "0,2"]) == 0
    assert detect_layout(out) == "casa"
    ours, _, gen2 = load(out)
    assert ours.lm.casa_ids == [0, 2] and gen2 == gen
    for k, v in ours.state_dict().items():
        if ".casa." not in k:
            assert torch.equal(v, model.state_dict()[k]), k
    b0 = ours.lm.layers[0]
    assert torch.equal(b0.casa.proj.q_proj.weight, b0.self_attn.q_proj.weight)  # CASA init = SA copy


# ---- Kyutai CASA layout (assumed) ----------------------------------------------------------------

CASA_BLOCKS = [0, 2]


def kyutai_tensors(t: dict[str, torch.Tensor], norm: bool = True, root: str = "model.") -> None:
    """Rename to the assumed Kyutai layout and add CASA tensors to blocks 0 and 2."""
    for k in [k for k in t if k.startswith("visual.")]:
        t[root + "image_prefix." + k] = t.pop(k)
    g = torch.Generator().manual_seed(5)
    for b in CASA_BLOCKS:
        pre = f"model.layers.{b}."
        for proj in ("q", "k", "v"):
            w, bias = t[pre + f"self_attn.{proj}_proj.weight"], t[pre + f"self_attn.{proj}_proj.bias"]
            t[pre + f"casa_attn.{proj}_proj.weight"] = torch.randn(w.shape, generator=g)
            t[pre + f"casa_attn.{proj}_proj.bias"] = torch.randn(bias.shape, generator=g)
        t[pre + "casa_attn.o_proj.weight"] = torch.randn(
            t[pre + "self_attn.o_proj.weight"].shape, generator=g
        )
        if norm:
            t[pre + "casa_norm.weight"] = torch.rand(64, generator=g) + 0.5


@pytest.mark.parametrize("root", ["model.", ""])
def test_kyutai_layout_imports_casa_tensors(hf_dir, tmp_path, root: str) -> None:
    path = copy_with_tensors(hf_dir[0], tmp_path / "kyutai", lambda t: kyutai_tensors(t, root=root))
    assert detect_layout(path) == "kyutai-casa"
    model, _, _, rep = import_checkpoint(path)
    assert rep.casa_blocks == CASA_BLOCKS and rep.tensors == len(load_file(str(path / "model.safetensors")))
    t = load_file(str(path / "model.safetensors"))
    for b in CASA_BLOCKS:
        casa = model.lm.layers[b].casa
        assert torch.equal(casa.proj.k_proj.bias, t[f"model.layers.{b}.casa_attn.k_proj.bias"])
        assert torch.equal(casa.proj.o_proj.weight, t[f"model.layers.{b}.casa_attn.o_proj.weight"])
        assert torch.equal(casa.norm.weight, t[f"model.layers.{b}.casa_norm.weight"])
    assert model.lm.layers[1].casa is None
    assert torch.equal(
        model.vision.blocks[1].attn.qkv.weight, t[f"{root}image_prefix.visual.blocks.1.attn.qkv.weight"]
    )


def test_kyutai_without_casa_norm_uses_block_norm(hf_dir, tmp_path) -> None:
    path = copy_with_tensors(hf_dir[0], tmp_path / "kyutai", lambda t: kyutai_tensors(t, norm=False))
    model, _, _, rep = import_checkpoint(path)
    assert any("input_layernorm" in n for n in rep.notes)
    b = model.lm.layers[2]
    assert torch.equal(b.casa.norm.weight, b.input_layernorm.weight)


def _kyutai_bad(t):
    kyutai_tensors(t)
    t["model.layers.0.casa_attn.gate"] = torch.zeros(1)  # unknown parameter: refuse, never guess
    t["model.layers.2.casa_attn.scale.weight"] = torch.zeros(1)
    del t["model.layers.2.casa_attn.k_proj.bias"]
    t["model.image_prefix.proj.weight"] = torch.zeros(2, 2)


def test_kyutai_refuses_unmatched_and_missing(hf_dir, tmp_path) -> None:
    path = copy_with_tensors(hf_dir[0], tmp_path / "kyutai-bad", _kyutai_bad)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(path)
    msg = str(err.value)
    assert "unmatched tensor: model.layers.0.casa_attn.gate" in msg
    assert "unmatched tensor: model.layers.2.casa_attn.scale.weight" in msg
    assert "missing CASA tensor: block 2 has no k_proj.bias" in msg
    assert "unexpected tensor: model.image_prefix.proj.weight" in msg


def test_kyutai_shared_needs_explicit_layers(hf_dir, tmp_path) -> None:
    def edit(t):
        for k in [k for k in t if k.startswith("visual.")]:
            t["model.image_prefix." + k] = t.pop(k)

    path = copy_with_tensors(hf_dir[0], tmp_path / "kyutai-shared", edit)
    with pytest.raises(CheckpointError, match="-Shared"):
        import_checkpoint(path)
    model, *_ = import_checkpoint(path, casa=CASAConfig(layers=[1], shared=True))
    assert model.lm.casa_ids == [1] and model.lm.layers[1].casa.shared


# ---- live captioning in Qwen's chat format ---------------------------------------------------------


def test_engine_streams_qwen_chat_format(hf_dir, tmp_path) -> None:
    """Frame 0: system + user + assistant prefix, frame, caption prefix; later frames only the
    vision tokens; generation stops on any eos id of generation_config.json (here also a plain
    vocabulary token) and the emitted stop token goes back into the text cache."""
    path, _ = hf_dir
    engine = Engine.from_checkpoint(path, max_sessions=2, max_context_tokens=256)
    tok = engine.tokenizer
    assert engine.template.stop == [
        tok.token_id("<|im_end|>"),
        tok.token_id("<|endoftext|>"),
        tok.token_id(STOP_WORD),
    ]
    frame = np.random.default_rng(6).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    settings = SessionSettings(temperature=0.0, max_new_tokens=3)

    row = engine.open(None, settings)
    prompt = engine.prompt_ids(None)
    assert tok.decode(prompt[:4]) == "system You are" and prompt[0] == tok.token_id("<|im_start|>")
    assert prompt[-1] == tok.token_id("<|vision_start|>")
    events = list(engine.caption(row, frame))
    assert events[-1].done and events[-1].reason == "length" and len(events) == 3
    first = events[0].token
    n_prefix = len(tok.encode(hfc.CAPTION_PREFIX))
    kv0 = len(prompt) + 1 + n_prefix + 2  # prompt, <|vision_end|>, prefix, 2 fed tokens (3rd: next frame)
    assert engine.kv_tokens(row) == kv0

    # a stop id that the model emits first: the caption ends at once with reason "stop"
    gen = engine.gen
    gen.stop_tokens = [*gen.stop_tokens, tok.tok.id_to_token(first)]
    engine2 = Engine(engine.model, tok, gen, max_sessions=1, max_context_tokens=256)
    r = engine2.open(None, settings)
    ev = list(engine2.caption(r, frame))
    assert [e.reason for e in ev] == ["stop"] and ev[0].token is None
    kv1 = engine2.kv_tokens(r)
    assert kv1 == len(prompt) + 1 + n_prefix  # the stop token is fed with the next frame
    ev = list(engine2.caption(r, frame))
    # stop + <|vision_start|>, then only <|vision_end|> (no caption prefix), then the fed caption tokens
    assert engine2.kv_tokens(r) == kv1 + 2 + 1 + len(ev) - 1


def test_transformers4_config_of_the_3b_release() -> None:
    """The config.json layout of Qwen/Qwen2.5-VL-3B-Instruct (transformers 4.x) maps onto our preset."""
    from casa_live.model.config import preset

    cfg = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }
    ours = hfc.model_config(cfg, CASAConfig())
    ref = preset("qwen2.5-vl-3b")
    assert ours.lm == ref.lm and ours.vision == ref.vision and ours.image_tokens == 256
