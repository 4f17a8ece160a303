"""Every protocol error code has a trigger and is answered as specified: a typed `error` event, the
session surviving where the error is not fatal, the right close code where it is. Also: auth, the
Origin allowlist, timeouts, and isolation between sessions (garbage, worker failures)."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from PIL import Image
from server_helpers import (
    client,
    container_messages,
    encode_stream,
    errors,
    image_messages,
    jpeg,
    of_type,
    packet_messages,
    png,
    stream,
    world_frames,
)
from starlette.websockets import WebSocketDisconnect

from casa_live.server import protocol as p

TOKENS = 4  # short captions keep this file fast


@pytest.fixture(scope="module")
def app(model_dir):
    with client(model_dir, max_message_bytes=64 << 10) as c:
        yield c


@pytest.fixture(scope="module")
def frames():
    return world_frames(4)


def still_alive(ws, frame: np.ndarray, pts_us: int = 0) -> dict:
    """The session still captions: send one frame and wait for its segment."""
    ws.send_bytes(p.pack_image(jpeg(frame), pts_us))
    return ws.until("caption.segment")[-1]


def expect_error(ws, code: str, fatal: bool = False) -> dict:
    event = ws.until("error")[-1]
    assert event["code"] == code, event
    assert event["fatal"] is fatal
    assert event["message"]
    return event


@pytest.fixture
def ws(app):
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=TOKENS)
        yield ws


# ---- bad media -----------------------------------------------------------------------------------


def test_garbage_image_bytes(ws, frames):
    ws.send_bytes(p.pack_image(np.random.default_rng(0).bytes(3000), 0))
    assert "not an image" in expect_error(ws, "bad_frame")["message"]
    still_alive(ws, frames[0])


def test_truncated_jpeg(ws, frames):
    data = jpeg(frames[0])
    ws.send_bytes(p.pack_image(data[: len(data) // 2], 0))
    assert "JPEG" in expect_error(ws, "bad_frame")["message"]
    still_alive(ws, frames[1], 500_000)


def test_header_too_short(ws, frames):
    ws.send_bytes(bytes([p.BinaryKind.IMAGE, 0, 0]))
    expect_error(ws, "bad_frame")
    still_alive(ws, frames[0])


def test_unknown_binary_kind(ws, frames):
    ws.send_bytes(b"\x09" + b"x" * 20)
    assert "0x09" in expect_error(ws, "unknown_type")["message"]
    still_alive(ws, frames[0])


def test_unsupported_image_format(ws, frames):
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="GIF")
    ws.send_bytes(p.pack_image(buf.getvalue(), 0))
    assert "gif" in expect_error(ws, "unsupported_codec")["message"]
    still_alive(ws, frames[0])


def test_unsupported_packet_codec(ws, frames):
    ws.send({"type": "session.update", "input": {"codec": "hevc"}, "event_id": "e1"})
    event = expect_error(ws, "unsupported_codec")
    assert event["event_id"] == "e1" and "h264" in event["message"]
    still_alive(ws, frames[0])


def test_packets_without_codec_then_garbage_packet(ws, frames):
    ws.send_bytes(p.pack_packet(b"\x00\x00\x00\x01garbage", 0))
    assert "codec" in expect_error(ws, "bad_frame")["message"]
    ws.send({"type": "session.update", "input": {"codec": "h264"}})
    ws.until("session.updated")
    ws.send_bytes(p.pack_packet(np.random.default_rng(1).bytes(2000), 0))
    expect_error(ws, "bad_frame")
    for m in packet_messages(frames, "libx264"):  # a real stream afterwards decodes
        ws.send_bytes(m)
    assert len(of_type(ws.marker("m"), "caption.segment")) == len(frames)


def test_oversize_message(ws, frames):
    ws.send_bytes(p.pack_image(b"\xff\xd8\xff" + b"\x00" * (70 << 10), 0))
    assert "limit" in expect_error(ws, "frame_too_large")["message"]
    still_alive(ws, frames[0])


def test_huge_dimensions(ws, frames):
    ws.send_bytes(p.pack_image(png(np.zeros((8, 5000, 3), np.uint8)), 0))
    assert "5000x8" in expect_error(ws, "frame_too_large")["message"]
    still_alive(ws, frames[0])


def test_late_join_to_a_container_stream(ws, frames):
    data = encode_stream(world_frames(8), "webm", "libvpx")
    msgs = container_messages(data[len(data) // 2 :], chunk=1000)
    for m in msgs:
        ws.send_bytes(m)
    assert "late" in expect_error(ws, "bad_frame")["message"]
    for m in container_messages(encode_stream(frames, "webm", "libvpx")):  # a proper stream then works
        ws.send_bytes(m)
    events = ws.marker("m")
    assert errors(events) == [] and len(of_type(events, "caption.segment")) == len(frames)


def test_truncated_container(ws, frames):
    data = encode_stream(frames, "webm", "libvpx")
    ws.send_bytes(p.pack_container(data[:60]))  # a header cut short, then the client ends the stream
    ws.send({"type": "session.close"})
    events = ws.drain()
    assert errors(events) == ["bad_frame"] and ws.close_code == 1000
    assert events[-1]["type"] == "session.closed"


def test_truncated_container_then_a_new_stream(ws, frames):
    data = encode_stream(frames, "webm", "libvpx")
    ws.send_bytes(p.pack_container(data[:60]))
    for m in container_messages(data):  # the recorder restarts: a new header ends the broken stream
        ws.send_bytes(m)
    events = ws.marker("m")
    assert errors(events) == ["bad_frame"]
    assert len(of_type(events, "caption.segment")) == len(frames)


@pytest.mark.parametrize(("fmt", "codec"), [("webm", "libvpx"), ("mp4", "libx264")])
def test_garbage_mid_container_is_reported(ws, fmt, codec):
    data = bytearray(encode_stream(world_frames(40), fmt, codec))
    mid = len(data) // 2
    data[mid : mid + 3000] = np.random.default_rng(2).bytes(3000)
    ws.update(mode="live")  # 40 frames: drop what the tiny model cannot keep up with
    for m in container_messages(bytes(data), chunk=4000):
        ws.send_bytes(m)
    ws.send({"type": "session.close"})  # the end of the stream releases what the demuxer holds back
    events = ws.drain()
    assert "bad_frame" in errors(events)
    assert "corrupt" in next(e for e in events if e["type"] == "error")["message"]


# ---- bad control messages ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"session.update"'])
def test_bad_json(ws, frames, text):
    ws.send_text(text)
    expect_error(ws, "bad_json")
    still_alive(ws, frames[0])


@pytest.mark.parametrize("event", [{"type": "conversation.item.create"}, {"session": {"fps": 1}}])
def test_unknown_type(ws, frames, event):
    ws.send(event)
    expect_error(ws, "unknown_type")
    still_alive(ws, frames[0])


@pytest.mark.parametrize(
    "session",
    [
        {"fps": -1},
        {"fps": 100},
        {"fsp": 2},
        {"temperature": "hot"},
        {"mode": "turbo"},
        {"prompt": "red " * 400},
    ],
)
def test_invalid_settings_leave_settings_unchanged(ws, frames, session):
    ws.send({"type": "session.update", "session": session})
    expect_error(ws, "invalid_settings")
    after = ws.update()["settings"]
    assert after["fps"] == 2.0 and after["max_new_tokens"] == TOKENS and after["mode"] == "offline"
    assert after["prompt"] == "describe what you see"
    still_alive(ws, frames[0])


def test_malformed_marker(ws, frames):
    ws.send({"type": "input.marker"})
    expect_error(ws, "bad_json")
    still_alive(ws, frames[0])


# ---- limits, admission, auth ---------------------------------------------------------------------


def test_rate_limited(model_dir, frames):
    with client(model_dir, max_input_rate=5) as c, stream(c) as ws:
        ws.update(max_new_tokens=TOKENS)
        for m in image_messages(world_frames(20), fps=10):
            ws.send_bytes(m)
        assert "per second" in expect_error(ws, "rate_limited")["message"]
        time.sleep(1.0)
        still_alive(ws, frames[0], 10_000_000)
        metrics = c.get("/metrics").text
    assert 'casa_frames_dropped_total{reason="rate_limited"} 0.0' not in metrics


def test_capacity(model_dir, frames):
    with client(model_dir, max_sessions=1) as c:
        with stream(c) as first, c.websocket_connect(p.STREAM_PATH) as raw:
            event = raw.receive_json()
            assert event["type"] == "error" and event["code"] == "capacity" and event["fatal"]
            with pytest.raises(WebSocketDisconnect) as closed:
                raw.receive_json()
            assert closed.value.code == 1013
            first.update(max_new_tokens=TOKENS)
            still_alive(first, frames[0])  # the admitted session is unaffected
        with stream(c) as again:  # the slot was recycled on disconnect
            again.update(max_new_tokens=TOKENS)
            still_alive(again, frames[0])
        assert 'casa_sessions_rejected_total{reason="capacity"} 1.0' in c.get("/metrics").text


def test_auth(model_dir, frames, caplog):
    caplog.set_level(logging.DEBUG)
    with client(model_dir, auth_keys="k-one,s3cret-key") as c:
        for kw in ({}, {"headers": {"Authorization": "Bearer wrong"}}, {"params": {"token": "nope"}}):
            path = p.STREAM_PATH + ("?token=" + kw.pop("params")["token"] if "params" in kw else "")
            with c.websocket_connect(path, **kw) as raw:
                event = raw.receive_json()
                assert event["code"] == "unauthorized" and event["fatal"]
                with pytest.raises(WebSocketDisconnect) as closed:
                    raw.receive_json()
                assert closed.value.code == 1008
        with stream(c, headers={"Authorization": "Bearer s3cret-key"}) as ws:
            ws.update(max_new_tokens=TOKENS)
            still_alive(ws, frames[0])
        with stream(c, p.STREAM_PATH + "?token=k-one") as ws:
            ws.update(max_new_tokens=TOKENS)
            still_alive(ws, frames[0])
        assert c.post("/v1/captions", content=b"x").status_code == 401
        metrics = c.get("/metrics").text
    assert 'casa_sessions_rejected_total{reason="unauthorized"} 3.0' in metrics
    assert "s3cret-key" not in caplog.text and "k-one" not in caplog.text and "s3cret-key" not in metrics


def test_origin_allowlist(model_dir):
    with client(model_dir, allowed_origins="https://good.example") as c:
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            c.websocket_connect(p.STREAM_PATH, headers={"Origin": "https://evil.example"}),
        ):
            pass
        assert refused.value.code == 1008
        with stream(c, headers={"Origin": "https://good.example"}):
            pass
        with stream(c):  # no Origin: not a browser
            pass
        assert 'casa_sessions_rejected_total{reason="origin"} 1.0' in c.get("/metrics").text


def test_idle_timeout(model_dir):
    with client(model_dir, idle_timeout_seconds=0.5) as c, stream(c) as ws:
        events = ws.drain()
        assert ws.close_code == 1000
        assert errors(events) == ["session_timeout"] and events[-1]["type"] == "session.closed"
        assert events[-1]["reason"] == "session_timeout"
        assert 'casa_sessions_total{outcome="timeout"} 1.0' in c.get("/metrics").text


def test_max_session_duration(model_dir, frames):
    with client(model_dir, max_session_seconds=1.0) as c, stream(c) as ws:
        for i in range(8):  # keep sending: not idle
            ws.send({"type": "input.marker", "id": str(i)})
            time.sleep(0.2)
        events = ws.drain()
    assert "maximum duration" in next(e for e in events if e["type"] == "error")["message"]


# ---- isolation -----------------------------------------------------------------------------------


def test_garbage_in_one_session_leaves_the_other_unaffected(app):
    clip = world_frames(6, seed=11)
    good = image_messages(clip)

    def captions(ws) -> list[str]:
        return [s["text"] for s in of_type(ws.marker("end"), "caption.segment")]

    with stream(app) as solo:
        solo.update(mode="offline", max_new_tokens=TOKENS)
        for m in good:
            solo.send_bytes(m)
        reference = captions(solo)
    rng = np.random.default_rng(5)
    with stream(app) as a, stream(app) as b:
        a.update(mode="offline", max_new_tokens=TOKENS)
        b.update(mode="offline", max_new_tokens=TOKENS)
        for m in good:
            b.send_bytes(m)
            a.send_bytes(p.pack_image(rng.bytes(500), 0))
            a.send_bytes(bytes([p.BinaryKind.CONTAINER]) + rng.bytes(500))
            a.send_text("{garbage")
        assert captions(b) == reference
        assert errors(b.events) == []
        assert set(errors(a.marker("a"))) == {"bad_frame", "bad_json"}


def test_worker_failure_for_one_row_is_contained(app, frames):
    engine = app.app.state.ctx.engine
    original = engine.submit_frame
    with stream(app) as a, stream(app) as b:
        a.update(mode="offline", max_new_tokens=TOKENS)
        b.update(mode="offline", max_new_tokens=TOKENS)
        bad_row = engine.scheduler.rows.index(
            next(r for r in engine.scheduler.rows if r is not None)
        )  # a's row: opened first

        def failing(row, image, deadline=None):
            if row == bad_row:
                raise RuntimeError("injected failure")
            return original(row, image, deadline)

        engine.submit_frame = failing
        try:
            a.send_bytes(p.pack_image(jpeg(frames[0]), 0))
            b.send_bytes(p.pack_image(jpeg(frames[0]), 0))
            event = expect_error(a, "internal", fatal=False)
            assert "injected" not in event["message"]  # internals never reach the client
            assert b.until("caption.segment")[-1]["frame"] == 0
        finally:
            engine.submit_frame = original
        still_alive(a, frames[1], 500_000)  # the failed session goes on


def test_failed_engine_step_resets_rows_and_the_worker_survives(app, frames):
    engine = app.app.state.ctx.engine
    original = engine.step
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected step failure")
        return original()

    with stream(app) as a:
        a.update(mode="offline", max_new_tokens=TOKENS)
        engine.step = failing_once
        try:
            a.send_bytes(p.pack_image(jpeg(frames[0]), 0))
            assert "reset" in expect_error(a, "internal")["message"]
        finally:
            engine.step = original
        still_alive(a, frames[1], 500_000)
    assert app.get("/readyz").status_code == 200
