"""The bundled model through the server: captions of a held-out synthetic clip match the ground truth,
and equal what the engine produces directly (the server adds and loses nothing on the way)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import client, container_messages, encode_stream, of_type, png, stream

from casa_live.server import protocol as p

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
pytestmark = pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").exists(),
    reason="the bundled model (checkpoints/default) is not built yet",
)
SEEDS = (17, 29)  # held-out: below casa_live.model.world.scene.TRAIN_SEED_BASE
FRAMES = 12
# Mean token F1 against the ground truth over the clips' frames. An intermediate checkpoint of the default
# model scored 0.59-0.85 per 40 frames in the soak benchmark; the bundled one is trained longer. Exact equality with
# the engine's own captions is the strict check; this one says the captions are about the clip.
MIN_F1 = 0.6


@pytest.fixture(scope="module")
def app():
    with client(BUNDLED, max_sessions=4) as c:
        yield c


@pytest.fixture(scope="module")
def clips(app):
    from casa_live.model.world.scene import WorldConfig, generate_clip

    size = app.app.state.ctx.engine.image_size
    return [generate_clip(seed, WorldConfig(frames=FRAMES, size=size)) for seed in SEEDS]


def caption(app, messages: list[bytes], n: int) -> list[str]:
    with stream(app) as ws:
        ws.update(mode="offline")
        for m in messages:
            ws.send_bytes(m)
        ws.send({"type": "session.close"})
        events = ws.drain()
    assert [e for e in events if e["type"] == "error"] == []
    segments = of_type(events, "caption.segment")
    assert [s["frame"] for s in segments] == list(range(n))
    return [s["text"] for s in segments]


def token_f1(a: str, b: str) -> float:
    x, y = a.split(), b.split()
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    if not x or not y or not common:
        return float(x == y)
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


def mean_f1(pairs) -> float:  # type: ignore[no-untyped-def]
    scores = [token_f1(a, b) for a, b in pairs]
    return sum(scores) / len(scores)


def test_image_frames_match_the_engine_and_the_ground_truth(app, clips):
    from casa_live.model.engine.engine import Engine
    from casa_live.model.training.evaluate import caption_clips

    fps = clips[0].config.fps
    served = [
        caption(
            app, [p.pack_image(png(f), round(i * 1e6 / fps)) for i, f in enumerate(c.frames)], len(c.frames)
        )
        for c in clips
    ]
    engine = Engine.from_checkpoint(BUNDLED, max_sessions=len(clips))
    direct = caption_clips(engine, clips)
    assert served == [[t.strip() for t in texts] for texts in direct]
    f1 = mean_f1((s, t) for c, texts in zip(clips, served) for s, t in zip(texts, c.captions))
    assert f1 >= MIN_F1, list(zip(served[0], clips[0].captions))


def test_webm_stream_matches_the_ground_truth(app, clips):
    clip = clips[0]
    data = encode_stream(clip.frames, "webm", "libvpx", fps=clip.config.fps)
    served = caption(app, container_messages(data, chunk=2000), len(clip.frames))
    assert mean_f1(zip(served, clip.captions)) >= MIN_F1 - 0.1, list(
        zip(served, clip.captions)
    )  # VP8 is lossy
