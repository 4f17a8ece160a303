"""A token-insertion checkpoint served end to end: its bounded cache (sink + sliding window of whole
frames and text, model/cache.py) keeps a long stream going with no reset and no `internal` error,
with a Qwen-style processor that keeps the frames' aspect ratio."""

from __future__ import annotations

import pytest
from server_helpers import client, image_messages, of_type, offline_events, world_frames

from casa_live.model.checkpoint.toy import toy_checkpoint
from casa_live.model.config import preset

FRAMES = 50
CONTEXT = 64  # the smallest cache the server allows: a few frames of the tiny model fill it


@pytest.fixture(scope="module")
def insertion_dir(tmp_path_factory):
    cfg = preset("test-tiny")
    cfg.casa.fusion = "insertion"
    cfg.processor = "qwen"  # aspect-preserving resize within image_size^2 pixels
    return toy_checkpoint(tmp_path_factory.getbasetemp() / "insertion", cfg)


def test_insertion_model_streams_50_frames_without_errors(insertion_dir):
    frames = world_frames(FRAMES)[:, :40]  # 40x64: not square, so the frames keep their shape
    with client(insertion_dir, max_context_tokens=CONTEXT) as c:
        engine = c.app.state.ctx.engine
        events = offline_events(c, image_messages(frames), max_new_tokens=4)  # closes 1000, no error
        segments = of_type(events, "caption.segment")
        assert [s["frame"] for s in segments] == list(range(FRAMES))
        assert all(s["reason"] in ("stop", "length") for s in segments)
        stats = [*of_type(events, "stats"), events[-1]["stats"]]
        assert max(s["kv_tokens"] for s in stats) <= CONTEXT
        closed = events[-1]
        assert closed["type"] == "session.closed" and closed["stats"]["frames_captioned"] == FRAMES
        assert int(engine.state.text.evicted.max()) > 5 * CONTEXT  # the window really slid
