"""Configs, checkpoints, sampling, the vision tower's window mask, and `casa caption` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAME_MATH_ATOL, assert_close
from safetensors.torch import load_file, save_file

from casa_live.model.checkpoint.common import CheckpointError
from casa_live.model.checkpoint.format import save_checkpoint
from casa_live.model.checkpoint.load import load
from casa_live.model.checkpoint.toy import toy_checkpoint, toy_generation_config, toy_model, word_tokenizer
from casa_live.model.config import PRESETS, GenerationConfig, ModelConfig, preset
from casa_live.model.engine.engine import CapacityError, Engine
from casa_live.model.engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, ngram_banned

ROOT = Path(__file__).resolve().parent.parent

CAPTION = [sys.executable, "-m", "casa_live.cli", "caption"]  # `casa caption` as a user runs it


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name: str, tmp_path: Path) -> None:
    cfg = preset(name)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    gen = toy_generation_config(max_new_tokens=7)
    gen.save(tmp_path / "g.json")
    assert GenerationConfig.load(tmp_path / "g.json") == gen


def test_qwen_preset_shape() -> None:
    cfg = preset("qwen2.5-vl-3b")
    assert (cfg.lm.hidden, cfg.lm.layers, cfg.lm.heads, cfg.lm.kv_heads, cfg.lm.head_dim) == (
        2048,
        36,
        16,
        2,
        128,
    )
    assert cfg.vision.fullatt_blocks == [7, 15, 23, 31] and cfg.vision.patch_dim == 588
    assert cfg.image_tokens == 256  # 448x448 frames -> 256 tokens
    assert cfg.casa.layer_ids(cfg.lm.layers) == list(range(36))


def test_default_preset_size() -> None:
    # the default preset is meant to have about 3-10M parameters; the trained one sits at the small end (a lean LM for the
    # per-step CPU budget, a narrow vision tower for the training budget)
    n = sum(p.numel() for p in toy_model("default").parameters())
    assert 2.5e6 <= n <= 10e6, n


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path = toy_checkpoint(tmp_path / "ckpt")
    model, tok, gen = load(path)
    again = tmp_path / "again"
    save_checkpoint(again, model, tok, gen)
    a, b = load_file(str(path / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((path / "config.json").read_text()) == json.loads((again / "config.json").read_text())
    assert tok.encode("a red circle") == word_tokenizer(model.config.lm.vocab).encode("a red circle")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = toy_checkpoint(tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["lm.layers.1.mlp.down_proj.weight"]
    tensors["lm.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load(path)
    assert "missing tensor: lm.layers.1.mlp.down_proj.weight" in str(e.value)
    assert "unexpected tensor: lm.extra.weight" in str(e.value)


def test_repetition_penalty_ema_and_stop_exemption() -> None:
    s = Sampler(1, 6, stop_ids=[5])
    s.reset(0, SamplingParams(repetition_penalty=2.0, decay=0.5, clamp=1.5))
    for t in (2, 2, 2, 5):
        s.observe(0, t)
    # token 2: ((1*0.5+1)*0.5+1) = 1.75 -> clamp 1.5, then *0.5 at the stop token = 0.75
    assert s.counts[0, 2] == pytest.approx(0.75)
    assert s.counts[0, 5] == pytest.approx(1.0)
    logits = torch.tensor([[1.0, -1.0, 3.0, -3.0, 0.5, 4.0]])
    out = apply_repetition_penalty(logits, s.counts[[0]], torch.tensor([2.0]), [5])
    assert out[0, 2] == pytest.approx(3.0 / 2.0**0.75)  # positive logit divided
    assert out[0, 5] == 4.0  # the stop token is exempt
    s.counts[0, 3] = 1.0
    out = apply_repetition_penalty(logits, s.counts[[0]], torch.tensor([2.0]), [5])
    assert out[0, 3] == pytest.approx(-6.0)  # negative logit multiplied


def test_ngram_blocking_across_frames() -> None:
    history = [7, 8, 9, 1, 7, 8]  # "7 8 9" seen; "7 8" again -> 9 banned
    assert ngram_banned(history, 3, 60) == [9]
    assert ngram_banned(history, 3, 3) == []  # outside the window
    s = Sampler(1, 10, stop_ids=[0])
    s.reset(0, SamplingParams(no_repeat_ngram=3))
    for t in history:
        s.observe(0, t)
    logits = torch.zeros(1, 10)
    logits[0, 9] = 10.0
    assert s.sample([0], logits) == [int(logits[0, :9].argmax())]


def test_temperature_zero_is_deterministic_and_sampling_is_seeded() -> None:
    s = Sampler(2, 50, stop_ids=[])
    logits = torch.randn(2, 50)
    s.reset(0, SamplingParams(temperature=0.0))
    s.reset(1, SamplingParams(temperature=0.0))
    assert s.sample([0, 1], logits) == [int(logits[0].argmax()), int(logits[1].argmax())]
    draws = []
    for _ in range(2):
        s.reset(0, SamplingParams(temperature=1.0, top_k=5, seed=7))
        draws.append([s.sample([0], logits[:1])[0] for _ in range(20)])
    assert draws[0] == draws[1]
    assert set(draws[0]) <= set(torch.topk(logits[0], 5).indices.tolist())
    assert len(set(draws[0])) > 1


def test_engine_capacity_and_row_recycling() -> None:
    model = toy_model()
    engine = Engine(model, word_tokenizer(model.config.lm.vocab), toy_generation_config(), max_sessions=2)
    a, b = engine.open(), engine.open()
    with pytest.raises(CapacityError):
        engine.open()
    img = np.zeros((24, 24, 3), np.uint8)
    first = [ev.token for ev in engine.caption(a, img)]
    engine.close(a)
    c = engine.open()
    assert c == a
    assert [ev.token for ev in engine.caption(c, img)] == first  # recycled row starts clean
    assert engine.kv_tokens(b) == len(engine.prompt_ids(None))  # b only ever got its prompt


def test_casa_memory_is_flat_and_stop_token_is_fed_back() -> None:
    model = toy_model()
    tok = word_tokenizer(model.config.lm.vocab)
    engine = Engine(
        model, tok, toy_generation_config(max_new_tokens=3), max_sessions=1, max_context_tokens=64
    )
    row = engine.open()
    fed: list[int] = []
    engine.observers.append(lambda res: fed.extend(res.fed.get(row, [])))
    nbytes = engine.state.nbytes()
    rng = np.random.default_rng(0)
    for _ in range(30):
        list(engine.caption(row, rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)))
    assert engine.state.nbytes() == nbytes
    assert engine.kv_tokens(row) <= 64 and engine.state.text.evicted[row] > 0
    stop = tok.token_id("<|frame_end|>")
    # every caption ends with its stop token (or the cut word and a stop token) fed back, then the
    # next frame's pre-image token
    after = [fed[i + 1] for i, t in enumerate(fed[:-1]) if t == stop]
    assert len(after) >= 29 and set(after) == {tok.token_id("<|vision_start|>")}


def test_casa_caption_cli(tmp_path: Path) -> None:
    from casa_live.model.world.video import write_video

    ckpt = toy_checkpoint(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(8)]
    clip = write_video(tmp_path / "clip.webm", frames, fps=4.0)
    out = subprocess.run(
        [*CAPTION, str(clip), "--model", str(ckpt), "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line[:9] for line in lines] == ["[00:00.0]", "[00:00.5]", "[00:01.0]", "[00:01.5]"]
    assert any(len(line) > 10 for line in lines)  # random weights: some frames may stop at once
    bad = subprocess.run(
        [*CAPTION, str(clip), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2 and "config.json is missing" in bad.stderr


def test_fused_projections_match_and_share_storage() -> None:
    """Engine fuses q/k/v and gate/up into single matmuls; results must not change, and the
    parameters must stay views of the fused weights (a later load_state_dict updates both)."""
    from casa_live.model.layers import Projections, SwiGLU

    torch.manual_seed(0)
    proj, mlp = Projections(32, 4, 2, 8), SwiGLU(32, 48)
    x = torch.randn(2, 5, 32)
    q0, (k0, v0), m0 = proj.q(x), proj.kv(x), mlp(x)
    proj.fuse()
    mlp.fuse()
    q1, k1, v1 = proj.qkv(x)
    assert_close(
        [q1, k1, v1, mlp(x)], [q0, k0, v0, m0], torch.float32, "fused q/k/v, gate/up", atol=SAME_MATH_ATOL
    )
    new = {k: torch.randn_like(v) for k, v in proj.state_dict().items()}
    proj.load_state_dict(new)  # copies into the views: the fused weight follows
    q2, _, v2 = proj.qkv(x)
    torch.testing.assert_close(
        q2,
        torch.nn.functional.linear(x, new["q_proj.weight"], new["q_proj.bias"])
        .view(2, 5, 4, 8)
        .transpose(1, 2),
    )
    torch.testing.assert_close(
        v2,
        torch.nn.functional.linear(x, new["v_proj.weight"], new["v_proj.bias"])
        .view(2, 5, 2, 8)
        .transpose(1, 2),
    )
