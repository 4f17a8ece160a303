"""What an imported checkpoint's metadata decides (docs/checkpoints.md): Kyutai's live-captioning
defaults, generation_config.json's sampling fields (top_p honoured, the rest reported with a reason),
config.json's frame delimiters and CASA block list."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from casa_live.model.checkpoint.common import CheckpointError
from casa_live.model.checkpoint.hf import config as hfc
from casa_live.model.checkpoint.hf import import_checkpoint
from casa_live.model.checkpoint.load import load
from casa_live.model.config import CASAConfig
from casa_live.model.engine.engine import Engine, SessionSettings
from tests.test_hf_import import CASA_BLOCKS, copy_with_tensors, kyutai_tensors, write_hf_checkpoint

pytest.importorskip("transformers")
# Qwen/Qwen2.5-VL-3B-Instruct's generation_config.json sampling fields, with the test tokenizer's eos ids
QWEN_GEN = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen")
    write_hf_checkpoint(path)
    return path


def edit_json(path: Path, name: str, **changes) -> None:
    d = json.loads((path / name).read_text())
    d.update(changes)
    (path / name).write_text(json.dumps(d))


def test_imported_checkpoints_get_kyutais_defaults(hf_dir) -> None:
    _, _, gen, _ = import_checkpoint(hf_dir)
    assert (gen.eos_bias, gen.penalty_counts, gen.truncated_close) == (0.95, "fed", "last_stop")
    assert (gen.temperature, gen.top_k, gen.repetition_penalty, gen.no_repeat_ngram) == (0.4, 256, 1.15, 4)
    assert gen.top_p == 1.0  # the test checkpoint's generation_config.json has no top_p


def test_generation_config_fields_are_honoured_or_reported(hf_dir, tmp_path, caplog) -> None:
    path = copy_with_tensors(hf_dir, tmp_path / "qwen-gen", lambda t: None)
    edit_json(path, "generation_config.json", **QWEN_GEN, no_repeat_ngram_size=3, max_new_tokens=128)
    _, _, gen, report = import_checkpoint(path)
    assert gen.top_p == 0.001  # honoured, as transformers' generate would under Kyutai's script
    assert gen.temperature == 0.4 and gen.top_k == 256 and gen.repetition_penalty == 1.15
    notes = "\n".join(report.notes)
    for key in (
        "top_p 0.001 honoured",
        "temperature 0.1 ignored",
        "top_k 1 ignored",
        "do_sample True ignored",
    ):
        assert key in notes, key
    assert "repetition_penalty 1.05 ignored" in notes and "EMA" in notes
    assert "no_repeat_ngram_size 3 ignored" in notes and "max_new_tokens 128 ignored" in notes
    assert "pad_token_id" not in notes and "eos_token_id" not in notes  # bookkeeping is not reported
    with caplog.at_level(logging.INFO, logger="casa_live.model.checkpoint.hf"):
        load(path)  # what `casa serve --model DIR` does: the same notes reach the log
    assert "top_k 1 ignored" in caplog.text and "repetition_penalty 1.05 ignored" in caplog.text
    # the honoured top_p reaches the sampler; a session overrides it
    engine = Engine(*load(path), max_sessions=2, max_context_tokens=256)
    a, b = engine.open(), engine.open(None, SessionSettings(top_p=0.9, eos_bias=1.0))
    assert (engine.sampler.params[a].top_p, engine.sampler.params[a].eos_bias) == (0.001, 0.95)
    assert (engine.sampler.params[b].top_p, engine.sampler.params[b].eos_bias) == (0.9, 1.0)
    edit_json(path, "generation_config.json", top_p=1.5)
    with pytest.raises(CheckpointError, match="top_p"):
        import_checkpoint(path)


def test_frame_delimiters_from_config_json(hf_dir, tmp_path) -> None:
    path = copy_with_tensors(hf_dir, tmp_path / "frames", lambda t: None)
    edit_json(path, "config.json", pre_image_tokens=["<|im_start|>", "w3"], post_image_tokens=5)
    engine = Engine.from_checkpoint(path, max_sessions=1, max_context_tokens=256)
    tok = engine.tokenizer
    assert engine.template.pre == [tok.token_id("<|im_start|>"), tok.token_id("w3")]
    assert engine.template.post == [5]
    prompt = engine.prompt_ids(None)
    assert prompt[-2:] == engine.template.pre
    row = engine.open(None, SessionSettings(max_new_tokens=2, temperature=0.0))
    frame = np.zeros((56, 56, 3), np.uint8)
    list(engine.caption(row, frame))
    kv = engine.kv_tokens(row)
    ev = list(engine.caption(row, frame))
    # close (1 stop + 2 pre) + post (1) + the fed caption tokens (the last one closes the next frame)
    assert engine.kv_tokens(row) == kv + 3 + 1 + len(ev) - 1
    for bad in (
        {"post_image_tokens": ["no-such-token"]},
        {"pre_image_tokens": [10**6]},
        {"pre_image_tokens": [1.5]},
        {"pre_image_tokens": -1},
    ):
        edit_json(path, "config.json", **{"pre_image_tokens": None, "post_image_tokens": None, **bad})
        with pytest.raises(CheckpointError, match="image_tokens"):
            import_checkpoint(path)


def test_casa_block_list_from_config_json(hf_dir, tmp_path) -> None:
    qwen = copy_with_tensors(hf_dir, tmp_path / "qwen-layers", lambda t: None)
    edit_json(qwen, "config.json", casa_layers=[2, 0])
    model, *_ = import_checkpoint(qwen)
    assert model.lm.casa_ids == [0, 2]
    model, *_ = import_checkpoint(qwen, casa=CASAConfig(layers=[1]))  # an explicit choice wins
    assert model.lm.casa_ids == [1]

    kyutai = copy_with_tensors(hf_dir, tmp_path / "kyutai", kyutai_tensors)
    edit_json(kyutai, "config.json", casa_layers=CASA_BLOCKS)
    assert import_checkpoint(kyutai)[0].lm.casa_ids == CASA_BLOCKS  # agrees with the tensors
    edit_json(kyutai, "config.json", casa_layers=[1])
    with pytest.raises(CheckpointError, match="lists CASA blocks"):
        import_checkpoint(kyutai)

    def shared(t):
        for k in [k for k in t if k.startswith("visual.")]:
            t["model.image_prefix." + k] = t.pop(k)

    shared_dir = copy_with_tensors(hf_dir, tmp_path / "kyutai-shared", shared)
    edit_json(shared_dir, "config.json", casa_layers=[1])
    model, _, _, report = import_checkpoint(shared_dir)  # no flags needed: the config names the blocks
    assert model.lm.casa_ids == [1] and model.lm.layers[1].casa.shared and report.shared
    for bad in ([7], "all", [True]):
        edit_json(qwen, "config.json", casa_layers=bad)
        with pytest.raises(CheckpointError, match="casa_layers"):
            import_checkpoint(qwen)


def test_the_bundled_format_keeps_todays_behaviour() -> None:
    """casa-live's own generation config (the bundled model's) is unchanged by the new fields."""
    from casa_live.model.checkpoint.assets import default_model_dir
    from casa_live.model.config import GenerationConfig

    gen = GenerationConfig.load(default_model_dir() / "generation_config.json")
    assert (gen.eos_bias, gen.top_p, gen.penalty_counts, gen.truncated_close) == (
        1.0,
        1.0,
        "emitted",
        "cut_word",
    )
    assert hfc.EOS_BIAS == 0.95
