"""A failing tick names the rows that took part (the server resets exactly those), and a reset
row starts afresh: its next captions equal a new session's."""

from __future__ import annotations

import numpy as np
import pytest

from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
from casa_live.model.engine.engine import Engine, SessionSettings, StepFailed


def engine(vision_thread: bool) -> Engine:
    model = toy_model("test-tiny", seed=3)
    return Engine(
        model, word_tokenizer(model.config.lm.vocab), toy_generation_config(), max_sessions=3,
        vision_thread=vision_thread,
    )  # fmt: skip


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def drain(e: Engine) -> list:
    out = []
    for _ in range(200):
        if not e.has_work() and not (e.pipeline is not None and e.pipeline.pending):
            break
        out += e.step()
    return out


@pytest.mark.parametrize("vision_thread", [False, True])
def test_a_failed_step_names_the_rows_with_work_and_only_them(vision_thread):
    e = engine(vision_thread)
    try:
        busy, idle = e.open("red circle", SessionSettings(max_new_tokens=3)), e.open("blue square")
        drain(e)  # both prompts in
        idle_tokens = e.kv_tokens(idle)
        e.submit_frame(busy, image(0))
        if e.pipeline is not None:
            e.pipeline.wait(10.0)
        original = e.runner.run

        def boom(plan, res):
            raise RuntimeError("injected")

        e.runner.run = boom
        with pytest.raises(StepFailed) as failed:
            while True:
                e.step()
        assert failed.value.rows == [busy] and isinstance(failed.value.__cause__, RuntimeError)
        e.runner.run = original
        assert not e.row_has_work(idle) and not e.busy(idle) and e.kv_tokens(idle) == idle_tokens
        e.close(busy)  # what the server does with the rows a failure names: reset them
        row = e.open("red circle", SessionSettings(max_new_tokens=3))
        drain(e)
        assert [ev.reason for ev in e.caption(row, image(1)) if ev.done] in (["stop"], ["length"])
    finally:
        e.shutdown()


def test_a_reopened_row_captions_like_a_new_session():
    e = engine(False)
    first = e.open("red circle", SessionSettings(max_new_tokens=4))
    drain(e)
    e.submit_frame(first, image(1))
    drain(e)
    e.close(first)
    again = e.open("red circle", SessionSettings(max_new_tokens=4))
    assert again == first
    reused = [ev.token for ev in e.caption(again, image(2))]
    fresh_engine = engine(False)
    row = fresh_engine.open("red circle", SessionSettings(max_new_tokens=4))
    fresh = [ev.token for ev in fresh_engine.caption(row, image(2))]
    assert reused == fresh
    assert e.kv_tokens(again) == fresh_engine.kv_tokens(row)


def test_a_restarted_row_captions_like_a_new_session_and_keeps_its_settings_and_frame_numbers():
    """Engine.restart (the server's start over after a gap, GenerationConfig.restate_after_gap):
    the row in place, its history gone, so its next caption is a new session's first; its settings
    stay and its frame numbers go on rising. A busy row cannot restart."""
    e = engine(False)
    settings = SessionSettings(max_new_tokens=3)
    row = e.open("red circle", settings)
    drain(e)
    for k in (1, 3):
        list(e.caption(row, image(k)))
    e.submit_frame(row, image(4))
    with pytest.raises(ValueError, match="restarts between frames only"):
        e.restart(row, "red circle")
    drain(e)
    list(e.caption(row, image(5)))
    e.restart(row, "red circle")  # right after the caption's end event: its close not fed yet
    events = list(e.caption(row, image(2)))
    fresh_engine = engine(False)
    fresh_row = fresh_engine.open("red circle", settings)
    fresh = list(fresh_engine.caption(fresh_row, image(2)))
    assert [ev.token for ev in events] == [ev.token for ev in fresh]
    assert len(events) <= 4  # max_new_tokens 3 (and its stop) still applies: the settings were kept
    assert {ev.frame for ev in events} == {4}  # the row's fifth frame, though its history is gone
    assert e.kv_tokens(row) == fresh_engine.kv_tokens(fresh_row)
