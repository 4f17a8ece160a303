"""Questions on side branches (Engine.ask): the branch's logits equal a dense reference forward of
the session's stream followed by the question and the answer, and the session's own captions are
token-for-token the same with and without questions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ATOL, assert_close
from test_model_streaming import Recorder, make_engine

from casa_live.model.engine.engine import CapacityError, Engine, SessionSettings


def frames(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30, 41, 3), dtype=np.uint8) for _ in range(n)]


def assert_branch_matches_dense(
    engine: Engine, rec: Recorder, branch: int, prefix: list[int]
) -> torch.Tensor:
    """The branch's recorded logits equal a dense forward of one sequence: the session's stream
    (`prefix`, already joined to what the branch fed in `rec.tokens[branch]`, with the session's
    frames) then the question and the answer. Returns the branch's logits (n, V)."""
    with torch.no_grad():
        dense = engine.model.forward_dense(rec.batch([branch]))
    ours = torch.stack(rec.logits[branch])
    ref = dense[0, len(prefix) : len(prefix) + len(ours)]
    assert_close(ours, ref, torch.float32, "branch vs dense", atol=ATOL)
    return ours


def drain(engine: Engine) -> list:
    out = []
    while engine.has_work():
        out += engine.step()
    return out


def caption_all(engine: Engine, rows: list[int], images: list[np.ndarray], ask: bool) -> tuple[dict, dict]:
    """Caption every frame on every row; with `ask`, a question is asked on each row at each frame
    boundary and answered while the next frame is captioned. Returns captions and answers per row."""
    captions: dict[int, list[int | None]] = {r: [] for r in rows}
    answers: list[list[int | None]] = []
    open_answers: dict[int, list[int | None]] = {}  # branch row -> its answer so far

    def take(events) -> None:
        for ev in events:
            if ev.row in captions:
                captions[ev.row].append(ev.token)
            else:
                open_answers[ev.row].append(ev.token)
                if ev.done:
                    answers.append(open_answers.pop(ev.row))

    for image in images:
        for r in rows:
            if ask and engine.can_ask(r):
                b, _ = engine.ask(r, "what is the red circle", max_new_tokens=4)
                open_answers[b] = []
            engine.submit_frame(r, image)
        while any(engine.busy(r) for r in rows):
            take(engine.step())
        take(drain(engine))
    return captions, answers


def test_captions_are_identical_with_and_without_questions():
    images = frames(0, 5)
    plain, asking = make_engine(max_sessions=2), make_engine(max_sessions=2)
    results = []
    for engine, ask in ((plain, False), (asking, True)):
        rows = [engine.open(p, SessionSettings(max_new_tokens=4)) for p in ("red circle", "blue square")]
        drain(engine)
        results.append(caption_all(engine, rows, images, ask))
    assert results[0][0] == results[1][0]  # every caption token of both sessions
    assert len(results[1][1]) >= 4 and all(results[1][1])  # questions were answered meanwhile
    assert asking.scheduler.free_branch_row() is not None  # every branch row freed again


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_the_branch_matches_a_dense_forward_of_the_stream_then_the_question(fusion):
    engine = make_engine(fusion, max_sessions=2, max_context_tokens=512)
    rec = Recorder(engine)
    row = engine.open("red circle", SessionSettings(max_new_tokens=3))
    other = engine.open("blue square", SessionSettings(max_new_tokens=2))
    drain(engine)
    for image in frames(1, 2):
        for r in (row, other):
            engine.submit_frame(r, image)
        drain(engine)
    stream = list(rec.tokens[row])
    branch, frame = engine.ask(row, "what is the red circle", max_new_tokens=5)
    assert frame == 1
    events = drain(engine)
    assert [ev.done for ev in events if ev.row == branch][-1]
    assert rec.tokens[row] == stream  # the session row was fed nothing
    # the reference: one sequence, the stream the branch forked from (CASA: before the frame's
    # caption) and then everything the branch fed
    fed = list(rec.tokens[branch])
    prefix = rec.join_branch(row, branch, frame)
    assert len(prefix) < len(stream) if fusion == "casa" else prefix == stream
    ours = assert_branch_matches_dense(engine, rec, branch, prefix)
    if fusion == "casa":  # the check has teeth: a reference with the frame's caption disagrees
        rec.tokens[branch] = stream + fed
        with torch.no_grad():
            after = engine.model.forward_dense(rec.batch([branch]))[0, len(stream) : len(stream) + len(ours)]
        assert float((ours - after).abs().max()) > 1e-3


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_a_question_waits_for_a_frame_and_a_free_branch_row(fusion):
    """CASA: a question may start as soon as a frame has started, while its caption is still being
    generated (the branch forks where the frame started); token insertion: at a frame boundary."""
    engine = make_engine(fusion, max_sessions=1, branch_rows=1)
    row = engine.open("red circle", SessionSettings(max_new_tokens=3, min_new_tokens=3))
    drain(engine)
    assert not engine.can_ask(row)  # no frame yet
    with pytest.raises(ValueError, match="no frame has started"):
        engine.ask(row, "red")
    engine.submit_frame(row, frames(2, 1)[0])
    engine.step()
    assert engine.busy(row)  # captioning
    assert engine.can_ask(row) == (fusion == "casa")
    drain(engine)
    assert engine.can_ask(row)
    branch, frame = engine.ask(row, "red", max_new_tokens=50)
    assert frame == 0
    assert not engine.can_ask(row)  # the only branch row is taken
    with pytest.raises(CapacityError):
        engine.ask(row, "red")
    engine.close(branch)  # a cancelled answer: the row is free, the session untouched
    assert engine.can_ask(row)
    # the branch holds the stream up to its fork: the whole row (insertion) or less (CASA)
    assert (engine.kv_tokens(branch) == engine.kv_tokens(row)) == (fusion == "insertion")


def test_a_question_asked_mid_caption_is_answered_beside_it():
    """A question asked while its frame's caption is generated is decoded in the same steps, and
    its answer equals the one asked after the caption closed (both fork at the frame's start)."""
    answers = []
    for early in (True, False):
        engine = make_engine(max_sessions=1, max_context_tokens=512)
        row = engine.open("red circle", SessionSettings(max_new_tokens=16, min_new_tokens=16))
        drain(engine)
        engine.submit_frame(row, frames(6, 1)[0])
        engine.step()
        engine.step()
        if not early:
            drain(engine)
        assert engine.busy(row) == early
        branch, frame = engine.ask(row, "what is the red circle", max_new_tokens=4)
        events = drain(engine)
        answer = [ev.token for ev in events if ev.row == branch]
        if early:  # the answer's tokens came while the caption was still going
            rows = [ev.row for ev in events]
            assert rows.index(branch) < max(i for i, r in enumerate(rows) if r == row)
        answers.append((frame, answer))
    assert answers[0] == answers[1] and answers[0][1]
