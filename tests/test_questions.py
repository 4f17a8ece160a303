"""The world's question language: every form parses, every answer follows from the frame's
objects, sampled questions cover each kind with both outcomes, and a training sequence puts the
question branch where the engine branches a row."""

from __future__ import annotations

import numpy as np
import pytest

from casa_live.model.checkpoint.toy import word_tokenizer
from casa_live.model.training.text import QA_TOKENS, generation_config, stream_layout, with_qa_tokens
from casa_live.model.world import questions as q
from casa_live.model.world.scene import COLS, ROWS, WorldConfig, generate_clip


def objects_of(seed: int, frame: int):
    return generate_clip(seed, WorldConfig(frames=frame + 1)).truth[frame].objects


def test_answers_follow_from_the_objects():
    for seed in range(40):
        objs = objects_of(seed, 5)
        assert q.count(objs).answer == q.NUMBERS[len(objs)]
        assert q.empty(objs).answer == ("yes" if not objs else "no")
        for o in objs:
            assert q.exists(objs, o.colour, o.shape).answer == "yes"
            assert q.where(objs, o.colour, o.shape).answer == o.position
            assert q.size(objs, o.colour, o.shape).answer == o.size
            assert q.colour_at(objs, ROWS[o.row], COLS[o.col]).answer == o.colour
            assert q.what_at(objs, ROWS[o.row], COLS[o.col]).answer == f"a {o.size} {o.colour} {o.shape}"
        taken = {(o.row, o.col) for o in objs}
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken]
        r, c = free[0]
        assert q.what_at(objs, ROWS[r], COLS[c]).answer == "none"
        assert q.colour_at(objs, ROWS[r], COLS[c]).answer == "none"
        names = {(o.colour, o.shape) for o in objs}
        absent = next(
            (c, s) for c in ("red", "blue", "green") for s in ("circle", "cross") if (c, s) not in names
        )
        assert q.where(objs, *absent).answer == "none" and q.size(objs, *absent).answer == "none"
        assert q.exists(objs, *absent).answer == "no"


def test_every_form_parses_back_to_its_kind_and_answer():
    rng = np.random.default_rng(0)
    seen: dict[str, set[str]] = {k: set() for k in q.KINDS}
    for seed in range(60):
        objs = objects_of(seed, int(rng.integers(0, 8)))
        for kind in q.KINDS:
            question = q.sample(objs, rng, kind)
            assert question.kind == kind and question.text == question.text.lower()
            again = q.answer(question.text, objs)
            assert again == question, (question, again)
            seen[kind].add(question.answer)
    for kind in q.YES_NO:
        assert seen[kind] == {"yes", "no"}, kind
    for kind in ("where", "size", "colour_at", "what_at"):
        assert "none" in seen[kind] and len(seen[kind]) > 1, kind
    assert seen["count"] >= {"zero", "one", "two"}


@pytest.mark.parametrize("text", ["how many objects?", "Is the scene empty?", "is there a pink circle?", ""])
def test_text_outside_the_language_is_not_parsed(text):
    assert q.parse(text) is None and q.answer(text, ()) is None


def test_a_question_branch_takes_the_place_of_the_last_frames_caption():
    tok = with_qa_tokens(word_tokenizer(200, ["the", "scene", "is", "empty", "there", "a", "red", "circle?"]))
    gen = generation_config(qa=True)
    captions = ["the scene is empty", "a red circle?"]
    plain = stream_layout(tok, gen, captions[:1], None)
    seq = stream_layout(tok, gen, captions, None, ("is there a red circle?", "no"))
    n = len(plain.tokens)
    assert seq.tokens[:n] == plain.tokens and seq.target[:n] == plain.target  # earlier captions unchanged
    pre = tok.encode(gen.template.pre_image)
    fed = tok.encode(gen.template.question.format(question="is there a red circle?"))
    answer = [*tok.encode("no"), tok.token_id(gen.stop_tokens[0])]
    # the last frame's pre_image and image, then the question instead of its caption
    assert seq.tokens[n:] == [*pre, *fed, *answer]
    assert seq.insert_at == [*plain.insert_at, n + len(pre)]  # each frame once
    assert fed[0] == tok.token_id(QA_TOKENS[0]) and fed[-1] == tok.token_id(QA_TOKENS[1])
    assert seq.answer == [False] * (n + len(pre) + len(fed)) + [True] * len(answer)
    # a one-frame clip: the question right after the prompt and the frame
    first = stream_layout(tok, gen, captions[:1], None, ("is there a red circle?", "no"))
    prompt_end = plain.insert_at[0]
    assert first.insert_at == [prompt_end] and first.tokens[prompt_end:] == [*fed, *answer]
    assert [t for t, a in zip(seq.tokens, seq.answer) if a] == answer


def test_hard_negatives_are_near_misses_and_zero_draws_as_before():
    """With hard_negatives = 1, every random subject of an `exists` question shares its colour or
    its shape with a present object; with 0, the draws are those of a call without the option."""
    near = total = 0
    for seed in range(80):
        objs = objects_of(seed, 5)
        if not objs:
            continue
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert q.sample(objs, a, "exists") == q.sample(objs, b, "exists", hard_negatives=0.0)
        question = q.sample(objs, np.random.default_rng([seed, 1]), "exists", hard_negatives=1.0)
        parsed = q.parse(question.text)
        assert parsed is not None
        colour, shape = parsed[1]["colour"], parsed[1]["shape"]
        total += 1
        if question.answer == "no":
            near += 1
            assert any(o.colour == colour or o.shape == shape for o in objs), question
        assert q.answer(question.text, objs) == question
    assert near > total // 4  # about half are negatives (the other half name a present object)
