"""Helpers for the server tests: app/websocket drivers with timeouts, and synthetic media of the world
model (JPEG frames, container streams, encoded packets), all made locally. The random test-tiny
checkpoint they serve is the `model_dir` fixture (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import anyio
import av
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from casa_live.server import protocol as p
from casa_live.server.app import create_app
from casa_live.server.settings import Settings

FPS = 2.0
SIZE = 64  # synthetic frames: 64x64 (the test-tiny model sees 24x24)


def settings(model_dir: Path, **overrides) -> Settings:
    base = {"model_dir": model_dir, "stats_interval_seconds": 0.2, "max_sessions": 4}
    base.update(overrides)
    return Settings(**base)


@contextlib.contextmanager
def client(model_dir: Path, **overrides) -> Iterator[TestClient]:
    with TestClient(create_app(settings(model_dir, **overrides))) as c:
        yield c


# ---------------------------------------------------------------------------------------------- websocket


class WS:
    """A TestClient websocket with receive timeouts and event helpers."""

    def __init__(self, ws) -> None:  # type: ignore[no-untyped-def]
        self.ws = ws
        self.events: list[dict] = []
        self.close_code: int | None = None

    def recv(self, timeout: float = 20.0) -> dict | None:
        """The next JSON event; None once the server closed (close_code set)."""
        if self.close_code is not None:
            return None

        async def receive():  # type: ignore[no-untyped-def]
            with anyio.fail_after(timeout):
                return await self.ws._send_rx.receive()

        message = self.ws.portal.call(receive)
        if message["type"] == "websocket.close":
            self.close_code = message.get("code", 1000)
            return None
        event = json.loads(message["text"])
        self.events.append(event)
        return event

    def until(self, kind: str, timeout: float = 30.0) -> list[dict]:
        """Events up to and including the first of type `kind` (raises if the socket closes first)."""
        out = []
        while True:
            event = self.recv(timeout)
            if event is None:
                raise AssertionError(f"socket closed ({self.close_code}) before {kind!r}; got {out}")
            out.append(event)
            if event["type"] == kind:
                return out

    def drain(self, timeout: float = 30.0) -> list[dict]:
        """Every event until the server closes the socket."""
        out = []
        while (event := self.recv(timeout)) is not None:
            out.append(event)
        return out

    def send(self, event: dict) -> None:
        self.ws.send_text(json.dumps(event))

    def send_bytes(self, data: bytes) -> None:
        self.ws.send_bytes(data)

    def send_text(self, text: str) -> None:
        self.ws.send_text(text)

    def update(self, **session) -> dict:
        self.send({"type": "session.update", "session": session})
        return self.until("session.updated")[-1]

    def marker(self, marker_id: str) -> list[dict]:
        self.send({"type": "input.marker", "id": marker_id})
        return self.until("marker")


@contextlib.contextmanager
def stream(c: TestClient, path: str = p.STREAM_PATH, **kw) -> Iterator[WS]:
    with c.websocket_connect(path, **kw) as raw:
        ws = WS(raw)
        created = ws.recv()
        assert created is not None and created["type"] == "session.created", created
        yield ws


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def offline_events(c: TestClient, messages: list[bytes], **session) -> list[dict]:
    """One offline session: the settings, every message, a marker, then close; the events up to
    the close, after checking it closed cleanly (1000) with no error event."""
    with stream(c) as ws:
        ws.update(mode="offline", **session)
        for m in messages:
            ws.send_bytes(m)
        events = ws.marker("end")
        ws.send({"type": "session.close"})
        events += ws.drain()
        assert ws.close_code == 1000
    assert errors(events) == []
    return events


def errors(events: list[dict]) -> list[str]:
    return [e["code"] for e in events if e["type"] == "error"]


# ---------------------------------------------------------------------------------------------- media


def world_frames(n: int, seed: int = 3, size: int = SIZE) -> np.ndarray:
    from casa_live.model.world.scene import WorldConfig, generate_clip

    return generate_clip(seed, WorldConfig(size=size, frames=n)).frames


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def image_messages(frames: np.ndarray, fps: float = FPS) -> list[bytes]:
    return [p.pack_image(jpeg(f), round(i * 1e6 / fps)) for i, f in enumerate(frames)]


def encode_stream(frames: np.ndarray, fmt: str = "webm", codec: str = "libvpx", fps: float = FPS) -> bytes:
    """A container stream as a live recorder makes it (non-seekable output: no index at the end)."""

    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[no-untyped-def]
            self.data += b
            return len(b)

    sink = Sink()
    options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"} if fmt == "mp4" else {}
    with av.open(sink, "w", format=fmt, options=options) as out:
        st = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=_realtime(codec))
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode(None):
            out.mux(pkt)
    return bytes(sink.data)


def _realtime(codec: str) -> dict[str, str]:
    if codec == "libx264":
        return {"preset": "ultrafast", "tune": "zerolatency", "g": "10"}
    if codec.startswith("libvpx"):
        return {"deadline": "realtime", "cpu-used": "8", "g": "10"}
    return {}


def container_messages(data: bytes, chunk: int = 1500) -> list[bytes]:
    return [p.pack_container(data[i : i + chunk]) for i in range(0, len(data), chunk)]


def packet_messages(frames: np.ndarray, codec: str = "libx264", fps: float = FPS) -> list[bytes]:
    """One encoded access unit per message (H.264 Annex B from libx264, or VP8/VP9), as a camera sends."""
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    ctx.time_base = Fraction(1, 1_000_000)
    ctx.framerate = Fraction(fps).limit_denominator(1000)
    ctx.options = _realtime(codec)
    out = []
    for i, f in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(f, format="rgb24")
        frame.pts = round(i * 1e6 / fps)
        for pkt in ctx.encode(frame):
            out.append(p.pack_packet(bytes(pkt), pkt.pts))
    for pkt in ctx.encode(None):
        out.append(p.pack_packet(bytes(pkt), pkt.pts))
    return out
