"""Watch scoring (Engine.set_watches): on each frame (CASA: any time after it starts; token
insertion: after its caption), every watch's question is fed on a branch of the row in one
tree-masked forward. Each score equals P(yes) / (P(yes) + P(no)) from a
dense reference forward of the session's stream followed by that question, the row is left as it
was (captions token-for-token the same with and without watches), and the packing shares the
questions' common prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ask import drain, frames
from test_model_streaming import Recorder, make_engine

from casa_live.model.engine import scheduler
from casa_live.model.engine.engine import Engine, ScoreEvent, SessionSettings, TokenEvent
from casa_live.model.engine.runner import pack_tree

QUESTIONS = ["is there a red circle", "is there a blue square", "is the scene empty"]


def dense_score(engine: Engine, rec: Recorder, tokens: list[int], frames_: list, question: str) -> float:
    """P(yes) / (P(yes) + P(no)) at the question's last token, from one dense forward of the
    stream a branch forks from followed by the question (as a question branch would feed it)."""
    fed = engine.tokenizer.encode(engine.gen.template.question.format(question=question))
    key = -1
    rec.tokens[key], rec.frames[key] = tokens + fed, frames_
    try:
        with torch.no_grad():
            logits = engine.model.forward_dense(rec.batch([key]))[0, len(tokens) + len(fed) - 1].double()
    finally:
        del rec.tokens[key], rec.frames[key]
    yes, no = engine.template.yes, engine.template.no
    return float(torch.sigmoid(logits[yes].logsumexp(0) - logits[no].logsumexp(0)))


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_scores_match_a_dense_forward_of_the_stream_then_each_question(fusion):
    engine = make_engine(fusion, max_sessions=2, max_context_tokens=512)
    rec = Recorder(engine)
    row = engine.open("red circle", SessionSettings(max_new_tokens=3))
    other = engine.open("blue square", SessionSettings(max_new_tokens=2))
    engine.set_watches(row, QUESTIONS)
    engine.set_watches(other, QUESTIONS[:1])
    drain(engine)
    events = []
    for image in frames(3, 3):
        for r in (row, other):
            # submitted while the last frame's watches are not scored yet: scoring goes first
            engine.submit_frame(r, image)
        events += drain(engine)
    scored = [ev for ev in events if isinstance(ev, ScoreEvent)]
    assert [(ev.row, ev.frame) for ev in scored if ev.row == row] == [(row, 0), (row, 1), (row, 2)]
    assert len(scored) == 6
    for ev in scored:  # each against the stream a branch of its frame forks from
        questions = QUESTIONS if ev.row == row else QUESTIONS[:1]
        tokens, frames_ = rec.fork(ev.row, ev.frame)
        want = [dense_score(engine, rec, tokens, frames_, q) for q in questions]
        np.testing.assert_allclose(ev.scores, want, rtol=0, atol=2e-5)
    assert all(0.0 < s < 1.0 for ev in scored for s in ev.scores)


def test_a_casa_row_is_scored_mid_caption_as_at_its_frames_start(monkeypatch):
    """Scores taken while the frame's caption is being generated see the text before the caption
    and the frame's image only: they equal the scores taken as the frame starts."""
    monkeypatch.setattr(scheduler, "SCORE_WAIT_S", 1e9)  # the test says when the wait is over
    got = []
    for wait in (0, 3):
        engine = make_engine(max_sessions=1, max_context_tokens=512)
        row = engine.open("red circle", SessionSettings(max_new_tokens=12, min_new_tokens=12))
        drain(engine)
        engine.set_watches(row, QUESTIONS)
        engine.submit_frame(row, frames(7, 1)[0])
        events = []
        for _ in range(1 + wait):  # the frame starts, then `wait` caption tokens
            events += engine.step()
        assert not any(isinstance(ev, ScoreEvent) for ev in events)  # waiting to batch
        engine.scheduler.row(row).score_since = -2e9  # it has waited long enough
        events = engine.step()
        assert engine.busy(row)  # mid-caption
        got.append([ev.scores for ev in events if isinstance(ev, ScoreEvent)])
    assert len(got[0]) == 1
    np.testing.assert_allclose(got[0], got[1], rtol=0, atol=1e-5)


def caption_stream(watches: list[str] | None, images: list[np.ndarray], **kw) -> tuple[dict, list]:
    engine = make_engine(max_sessions=2, **kw)
    rows = [engine.open(p, SessionSettings(max_new_tokens=5)) for p in ("red circle", "blue square")]
    if watches:
        engine.set_watches(rows[0], watches)
    captions: dict[int, list[int | None]] = {r: [] for r in rows}
    scores = []
    for image in images:
        for r in rows:
            engine.submit_frame(r, image)
        while any(engine.busy(r) for r in rows) or engine.has_work():
            for ev in engine.step():
                if isinstance(ev, TokenEvent):
                    captions[ev.row].append(ev.token)
                else:
                    scores.append(ev)
    return captions, scores


@pytest.mark.parametrize("context", [512, 40])  # 40: the text cache is full and evicts all along
def test_captions_are_identical_with_and_without_watches(context):
    images = frames(4, 6)
    plain, _ = caption_stream(None, images, max_context_tokens=context)
    watched, scores = caption_stream(QUESTIONS, images, max_context_tokens=context)
    assert watched == plain
    assert [ev.frame for ev in scores] == list(range(len(images)))


def test_pack_tree_shares_every_common_prefix_once():
    p = pack_tree([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6, 7], [1, 8, 9]])
    assert p.ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 1 2 once for three, 1 2 3 once for two, 1 for all
    assert p.depth.tolist() == [0, 1, 2, 3, 2, 3, 4, 1, 2]
    assert p.last == [3, 4, 6, 8]
    # token 7 (the third question's last) sees its own path (1 2 3 6), not the others' tokens
    assert p.tree[6].tolist() == [True, True, True, False, False, True, True, False, False]
    assert p.tree[8].tolist() == [True, False, False, False, False, False, False, True, True]
    # one question, or one that is another's prefix: every question keeps a last token of its own
    assert pack_tree([[1, 2]]).last == [1]
    q = pack_tree([[1, 2], [1, 2, 3]])
    assert q.ids == [1, 2, 2, 3] and q.last == [1, 3]


def test_set_watches_checks_what_it_is_given():
    engine = make_engine(max_sessions=1, watch_tokens=13)
    row = engine.open("red circle")
    with pytest.raises(ValueError, match="at most 8"):
        engine.set_watches(row, ["is there a red circle"] * 9)
    # 7 + 7 + 6 tokens, 14 packed (`<|question|>is` once, ` there a` once for two)
    with pytest.raises(ValueError, match="14 tokens together; at most 13 fit"):
        engine.set_watches(row, ["is there a red circle", "is there a blue square", "is the scene empty"])
    engine.set_watches(row, ["is there a red circle"])
    engine.set_watches(row, [])  # cleared: no more scoring
    engine.submit_frame(row, frames(5, 1)[0])
    assert not any(isinstance(ev, ScoreEvent) for ev in drain(engine))


def test_a_model_without_a_question_template_scores_no_watches():
    engine = make_engine(max_sessions=1)
    engine.gen.template.question = None
    bare = Engine(engine.model, engine.tokenizer, engine.gen, max_sessions=1)
    row = bare.open("red circle")
    with pytest.raises(ValueError, match="cannot score watches"):
        bare.set_watches(row, ["is there a red circle"])
