"""Questions on imported Qwen2.5-VL checkpoints (docs/checkpoints.md): the generation config carries
Qwen's chat-format question template (and `casa convert` keeps it), and a question branch asked
after a captioned frame gives the logits of a dense forward over the same token sequence: our own
dense reference (CASA and token insertion) and, for token insertion, transformers' Qwen2.5-VL.

The checkpoint is the tiny transformers-made Qwen of tests/test_hf_import.py, written offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ATOL, assert_close
from test_ask import assert_branch_matches_dense, drain
from test_hf_import import QWEN_SPECIAL, copy_with_tensors, write_hf_checkpoint
from test_model_streaming import Recorder

from casa_live.model.checkpoint.hf import config as hfc
from casa_live.model.checkpoint.hf import import_checkpoint
from casa_live.model.checkpoint.load import load
from casa_live.model.config import CASAConfig
from casa_live.model.engine.engine import Engine, SessionSettings

pytest.importorskip("transformers")
QUESTION = "what you see in the video"  # words of the test tokenizer's vocabulary
SIZE = 112  # frames of 112 x 112 pixels: 8 x 8 patches, 4 x 4 image tokens


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("qwen-ask")
    return path, write_hf_checkpoint(path)


def test_imported_checkpoints_answer_in_the_chat_format_and_convert_keeps_it(hf_dir, tmp_path) -> None:
    from casa_live.cli.convert import main as convert

    path, _ = hf_dir
    _, tok, gen = load(path)
    assert gen.template.question == hfc.QUESTION_TEMPLATE
    assert gen.template.question.format(question="q?") == (
        "<|im_end|>\n<|im_start|>user\nq?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_end|>" in gen.stop_tokens  # the answer ends on it
    fed = tok.encode(gen.template.question.format(question=QUESTION))
    assert fed[0] == tok.token_id("<|im_end|>") and fed[-2:] == [
        tok.token_id("<|im_start|>"),
        tok.token_id("assistant"),
    ]
    out = tmp_path / "ours"
    assert convert([str(path), str(out)]) == 0
    written = json.loads((out / "generation_config.json").read_text())
    assert written["template"]["question"] == hfc.QUESTION_TEMPLATE
    assert load(out)[2] == gen  # config.json / generation_config.json round trip


def test_no_question_template_when_im_end_is_not_a_stop_token(hf_dir, tmp_path) -> None:
    path = copy_with_tensors(hf_dir[0], tmp_path / "no-im-end", lambda t: None)
    eos = [QWEN_SPECIAL.index("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    _, tok, gen, report = import_checkpoint(path)
    assert gen.template.question is None
    assert any("<|im_end|> is not among eos_token_id" in n for n in report.notes)
    engine = Engine(load(path)[0], tok, gen, max_sessions=1, max_context_tokens=256)
    with pytest.raises(ValueError, match="answers no questions"):
        engine.ask(0, QUESTION)


def frames(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def ask_after_captions(path: Path, fusion: str, images: list[np.ndarray]):
    """Caption the frames on one session (beside a second one), ask a question at the frame boundary
    and drain the answer. Returns the engine, its recorder, the branch row and the stream the branch
    forked from (CASA: before the last frame's caption; token insertion: all of it)."""
    model, tok, gen, _ = import_checkpoint(path, casa=CASAConfig(fusion=fusion), image_size=SIZE)
    engine = Engine(model, tok, gen, max_sessions=2, max_context_tokens=512)
    rec = Recorder(engine)
    settings = SessionSettings(temperature=0.0, max_new_tokens=3)
    row, other = engine.open(None, settings), engine.open("Please describe", settings)
    for image in images:
        for r in (row, other):
            engine.submit_frame(r, image)
        drain(engine)
    prefix = list(rec.tokens[row])
    assert prefix[-1] == tok.token_id("<|vision_start|>")  # the caption closed, the next frame opened
    branch, frame = engine.ask(row, QUESTION, max_new_tokens=6)
    assert frame == len(images) - 1
    events = [ev for ev in drain(engine) if ev.row == branch]
    assert events[-1].done and engine.scheduler.rows[branch] is None  # answered, the branch freed
    fed = tok.encode(gen.template.question.format(question=QUESTION))
    assert rec.tokens[branch][: len(fed)] == fed
    assert rec.tokens[row] == prefix  # the session was fed nothing
    return engine, rec, branch, rec.join_branch(row, branch, frame)


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_the_answer_matches_a_dense_forward_of_the_chat_sequence(hf_dir, fusion: str) -> None:
    engine, rec, branch, prefix = ask_after_captions(hf_dir[0], fusion, frames(1, 2))
    ours = assert_branch_matches_dense(engine, rec, branch, prefix)
    batch = rec.batch([branch])  # the check has teeth: a reference without the frames disagrees
    batch.n_frames[:] = 0
    with torch.no_grad():
        blind = engine.model.forward_dense(batch)[0, len(prefix) : len(prefix) + len(ours)]
    assert float((ours - blind).abs().max()) > 1e-2


def test_the_insertion_answer_matches_transformers(hf_dir) -> None:
    """Token insertion is plain Qwen2.5-VL: transformers' forward over the whole chat sequence, each
    frame as <|image_pad|> placeholders (its own M-RoPE positions), gives the branch's logits."""
    path, hf = hf_dir
    images = frames(2, 2)
    engine, rec, branch, prefix = ask_after_captions(path, "insertion", images)
    pad = QWEN_SPECIAL.index("<|image_pad|>")
    tokens = rec.tokens[branch]
    ids: list[int] = []
    text_at: list[int] = []  # position of each text token in the sequence with placeholders
    pixels, grids = [], []
    inserts = {at: img.shape[0] for at, img in rec.frames[branch]}
    for t, tok in enumerate(tokens):
        if t in inserts:
            ids += [pad] * inserts[t]
        text_at.append(len(ids))
        ids.append(tok)
    for image in images:
        patches, (gh, gw) = engine.processor.process(image)
        assert gh * gw // 4 == next(iter(inserts.values()))
        pixels.append(patches.view(-1, 3, 1, 196).expand(-1, 3, 2, 196).reshape(gh * gw, -1))
        grids.append([1, gh, gw])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = hf(
            input_ids=input_ids,
            pixel_values=torch.cat(pixels),
            image_grid_thw=torch.tensor(grids),
            mm_token_type_ids=(input_ids == pad).int(),
        ).logits[0]
    ours = torch.stack(rec.logits[branch])
    ref = logits[text_at[len(prefix) : len(prefix) + len(ours)]]
    assert_close(ours, ref, torch.float32, "branch vs transformers", atol=ATOL)
    # the session's own stream (prompt, frames, captions, closes) matches transformers too
    row = next(r for r in rec.tokens if r != branch and rec.tokens[r] == prefix)
    stream = torch.stack(rec.logits[row])
    assert_close(stream, logits[text_at[: len(prefix)]], torch.float32, "stream vs transformers", atol=ATOL)
