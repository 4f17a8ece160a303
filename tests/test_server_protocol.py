"""Unit tests without a model: binary framing, event parsing and its error classification, settings,
media sniffing, resampling and image decoding limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from server_helpers import encode_stream, jpeg, png, world_frames

from casa_live.server import protocol as p
from casa_live.server.errors import (
    BadFrame,
    BadJSON,
    FrameTooLarge,
    InvalidSettings,
    UnknownType,
    UnsupportedCodec,
    from_validation_error,
    report,
)
from casa_live.server.ingest import FrameLimits, Resampler, decode_image, sniff_container, sniff_image
from casa_live.server.metrics import Metrics
from casa_live.server.settings import Settings


def test_binary_round_trip():
    for pack, kind, pts in (
        (p.pack_image, p.BinaryKind.IMAGE, 1_500_000),
        (p.pack_packet, p.BinaryKind.PACKET, -3),
    ):
        msg = p.unpack(pack(b"payload", pts))
        assert (msg.kind, msg.pts_us, msg.payload) == (kind, pts, b"payload")
    assert p.pack_image(b"x", 1)[:9] == b"\x01" + (1).to_bytes(8, "big")
    msg = p.unpack(p.pack_container(b"chunk"))
    assert (msg.kind, msg.pts_us, msg.pts, msg.payload) == (p.BinaryKind.CONTAINER, None, None, b"chunk")
    assert p.unpack(p.pack_image(b"x", 250_000)).pts == 0.25


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00", b"\x01" + bytes(8), b"\x02"])
def test_binary_too_short(data):
    with pytest.raises(p.BinaryMessageError) as err:
        p.unpack(data)
    assert not err.value.unknown_kind


def test_binary_unknown_kind():
    with pytest.raises(p.BinaryMessageError) as err:
        p.unpack(b"\x07abc")
    assert err.value.unknown_kind and "0x07" in str(err.value)


def test_events_round_trip_through_the_union():
    events = [
        p.SessionUpdate(session=p.SessionSettings(fps=1.0, prompt="hi"), input=p.InputSettings(codec="vp8")),
        p.InputMarker(id="m"),
        p.SessionClose(event_id="e"),
    ]
    for e in events:
        assert p.parse_client_event(p.dump(e)) == e
    server = [
        p.CaptionDelta(frame=1, pts=0.5, text=" a"),
        p.CaptionSegment(
            frame=1, start=0.5, end=1.0, text="a", tokens=2, reason="stop", ttft_ms=1, latency_ms=2
        ),
        p.Stats(
            frames_received=1, frames_skipped=0, frames_captioned=1, frames_dropped=0, lag_ms=0, kv_tokens=3
        ),
        p.Marker(id="m"),
        p.Error(code=p.ErrorCode.BAD_JSON, message="m", fatal=False),
        p.SessionClosed(reason="client"),
    ]
    for e in server:
        assert p.parse_server_event(p.dump(e)) == e
    assert "event_id" not in json.loads(p.dump(p.Marker(id="m")))  # None fields stay off the wire


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("{nope", BadJSON),
        ("[]", BadJSON),
        ("3", BadJSON),
        ('{"type": "x.y"}', UnknownType),
        ('{"id": "m"}', UnknownType),
        ('{"type": "input.marker"}', BadJSON),
        ('{"type": "session.update", "session": {"fps": 0}}', InvalidSettings),
        ('{"type": "session.update", "session": {"nope": 1}}', InvalidSettings),
        ('{"type": "session.update", "input": {"codec": 5}}', InvalidSettings),
    ],
)
def test_parse_errors_are_classified(text, kind):
    with pytest.raises(ValidationError) as err:
        p.parse_client_event(text)
    try:
        raw = json.loads(text)
    except ValueError:
        raw = None
    assert isinstance(from_validation_error(err.value, raw=raw), kind)


def test_invalid_settings_keep_the_event_id():
    text = '{"type": "session.update", "event_id": "u1", "session": {"top_k": -1}}'
    with pytest.raises(ValidationError) as err:
        p.parse_client_event(text)
    exc = from_validation_error(err.value, raw=json.loads(text))
    assert exc.event_id == "u1" and "top_k" in exc.message


def test_report_maps_and_counts():
    m = Metrics()
    event, code = report(BadFrame("x"), m)
    assert (event.code, event.fatal, code) == (p.ErrorCode.BAD_FRAME, False, None)
    event, code = report(RuntimeError("secret detail"), m)
    assert (event.code, event.fatal, code) == (p.ErrorCode.INTERNAL, True, 1011)
    assert "secret" not in event.message
    text = m.render().decode()
    assert (
        'casa_errors_total{code="bad_frame"} 1.0' in text and 'casa_errors_total{code="internal"} 1.0' in text
    )


def test_every_design_metric_is_exposed():
    text = Metrics().render().decode()
    names = [
        "sessions_active",
        "sessions_total",
        "sessions_rejected_total",
        "frames_received_total",
        "frames_dropped_total",
        "frames_captioned_total",
        "errors_total",
        "generated_tokens_total",
        "frame_decode_seconds",
        "vision_encode_seconds",
        "prefill_seconds",
        "time_to_first_token_seconds",
        "frame_latency_seconds",
        "inter_token_seconds",
        "step_seconds",
        "batch_size",
        "kv_cache_tokens",
        "stream_lag_seconds",
    ]
    for name in names:
        assert f"# HELP casa_{name} " in text, name
    assert "_created" not in text
    assert 'casa_frame_latency_seconds_bucket{le="0.5"}' in text


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CASA_AUTH_KEYS", "a, b")
    monkeypatch.setenv("CASA_ALLOWED_ORIGINS", "https://X.example/,http://y")
    monkeypatch.setenv("CASA_PORT", "9000")
    s = Settings()
    assert [k.get_secret_value() for k in s.auth_keys] == ["a", "b"]
    assert "a" not in repr(s.auth_keys)
    assert s.allowed_origins == ["https://x.example", "http://y"]
    assert s.port == 9000 and s.limits().max_fps == s.max_fps
    assert s.transport_max_bytes == 4 * s.max_message_bytes


def test_sniffers():
    frame = world_frames(1)[0]
    assert sniff_image(jpeg(frame)) == "jpeg" and sniff_image(png(frame)) == "png"
    assert sniff_image(b"GIF89a...") == "gif" and sniff_image(b"hello") is None
    frames = world_frames(2)
    assert sniff_container(encode_stream(frames, "webm", "libvpx")) == "matroska"
    assert sniff_container(encode_stream(frames, "ivf", "libvpx")) == "ivf"
    assert sniff_container(encode_stream(frames, "mp4", "libx264")) == "mp4"
    assert sniff_container(encode_stream(frames, "mpegts", "libx264")) == "mpegts"
    data = encode_stream(frames, "webm", "libvpx")
    assert sniff_container(data[len(data) // 2 :]) is None  # a late join has no header


def test_resampler():
    r = Resampler(2.0)
    kept = [t / 10 for t in range(30) if r.keep(t / 10)]  # 10 fps in -> 2 fps out
    assert kept == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    r = Resampler(2.0)
    assert [r.keep(t) for t in (0.0, 0.5, 100.0, 100.1, 100.5)] == [
        True,
        True,
        True,
        False,
        True,
    ]  # a jump re-anchors
    r = Resampler(2.0)
    assert r.keep(0.0)
    r.undo()  # the frame failed to decode: the next one takes its slot
    assert r.keep(0.0)


def test_decode_image_limits():
    limits = FrameLimits(size=24, max_width=100, max_height=100)
    out = decode_image(jpeg(world_frames(1)[0]), limits)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8 and out.flags.writeable
    with pytest.raises(FrameTooLarge):
        decode_image(png(np.zeros((10, 101, 3), np.uint8)), limits)
    with pytest.raises(BadFrame):
        decode_image(jpeg(world_frames(1)[0])[:300], limits)
    with pytest.raises(BadFrame):
        decode_image(b"\x00" * 100, limits)
    with pytest.raises(UnsupportedCodec):
        decode_image(b"BM" + b"\x00" * 100, limits)
