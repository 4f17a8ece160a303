"""`casa eval`'s questions (model/training/evaluate.py): asked on side branches at frame boundaries
while the clips stream, scored per kind against the ground truth of the frame each answer saw, and
reported as "answers no questions" for a model without a question template. A random-weight toy
model answers: what is checked is the bookkeeping, not the answers' content."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch

from casa_live.model.checkpoint.toy import toy_checkpoint, toy_generation_config, toy_model, word_tokenizer
from casa_live.model.engine.engine import Engine
from casa_live.model.training.evaluate import Answer, QuestionScores, evaluate, question_plan
from casa_live.model.world import questions as qa
from casa_live.model.world.scene import WorldConfig, generate_clip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only contends with whatever else the machine runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_engine(question: bool = True, **kw) -> Engine:
    model = toy_model("test-tiny", seed=3)
    gen = toy_generation_config(max_new_tokens=4)
    if not question:
        gen.template = dataclasses.replace(gen.template, question=None)
    return Engine(model, word_tokenizer(model.config.lm.vocab), gen, max_context_tokens=512, **kw)


def test_the_plan_draws_every_kind_equally_often_from_the_frames_objects() -> None:
    clips = [generate_clip(s, WorldConfig(frames=6, size=24)) for s in range(9)]
    plan = question_plan(clips, 2)
    assert plan == question_plan(clips, 2)  # seeded: the same questions every run
    kinds = Counter(q.kind for asks in plan for q in asks.values())
    assert kinds == Counter({k: 2 for k in qa.KINDS})
    for clip, asks in zip(clips, plan):
        assert len(asks) == 2 and all(0 <= f < 6 for f in asks)
        for f, q in asks.items():
            assert qa.answer(q.text, clip.truth[f].objects) == q
    assert all(len(asks) == 6 for asks in question_plan(clips[:1], 10))  # at most one per frame


def test_questions_are_answered_at_their_frame_boundaries_without_touching_the_captions() -> None:
    seeds = range(5)
    plain = evaluate(toy_engine(max_sessions=3), seeds, frames=5)
    asked = evaluate(toy_engine(max_sessions=3, branch_rows=1), seeds, frames=5, questions=3)
    assert plain.answers_questions is None and "questions" not in plain.metrics
    assert asked.answers_questions is True
    assert [c[1] for c in asked.clips] == [c[1] for c in plain.clips]  # every caption the same
    clips = [generate_clip(s, WorldConfig(frames=5, size=24)) for s in seeds]
    plan = question_plan(clips, 3)
    assert len(asked.answers) == 15 and asked.metrics["questions"] == 15
    for a in asked.answers:  # asked right after the planned frame's caption: the answer saw it
        q = plan[a.seed][a.frame]
        assert (a.kind, a.question, a.truth) == (q.kind, q.text, q.answer)
        assert a.reason in ("stop", "length") and a.answer == a.answer.strip()
    table = asked.question_table()
    assert [row[0] for row in table] == [*qa.KINDS, "all"]
    assert sum(row[1] for row in table[:-1]) == table[-1][1] == 15
    right = sum(a.correct for a in asked.answers)
    assert table[-1][2] == pytest.approx(right / 15)


def test_scores_are_exact_matches_per_kind() -> None:
    scores = QuestionScores()
    for answer, truth in (("yes", "yes"), (" yes", "yes"), ("two", "two")):
        kind = "count" if truth == "two" else "empty"
        scores.add(Answer(0, 0, kind, "q", answer, truth))
    m = scores.summary()
    assert m["questions"] == 3 and m["question_accuracy"] == pytest.approx(2 / 3)
    assert m["question_accuracy_empty"] == 0.5 and m["question_accuracy_count"] == 1.0
    assert m["questions_where"] == 0


def test_cli_prints_the_table_or_that_the_model_answers_no_questions(tmp_path, capsys) -> None:
    from casa_live.cli.main import main

    path = toy_checkpoint(tmp_path / "toy")
    args = ["eval", "--model", str(path), "--clips", "2", "--frames", "3", "--threads", "1", "--show", "1"]
    assert main([*args, "--questions", "2"]) == 0
    out = capsys.readouterr().out
    assert "questions: 4 (2 per clip, at frame boundaries)" in out
    for kind in qa.KINDS[:4]:
        assert f"  {kind:<12}      1 " in out
    assert f"  {'all':<12}      4 " in out
    gen = json.loads((path / "generation_config.json").read_text())
    gen["template"]["question"] = None
    (path / "generation_config.json").write_text(json.dumps(gen))
    assert main([*args, "--questions", "2"]) == 0
    assert "the model answers no questions" in capsys.readouterr().out
