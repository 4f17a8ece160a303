"""A real `casa serve` process on 127.0.0.1 driven by the `websockets` client library: the wire as a
deployed server speaks it (handshake, auth header, Origin check, transport size limit, close codes)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets
from server_helpers import container_messages, encode_stream, image_messages, world_frames
from websockets.exceptions import ConnectionClosed, InvalidStatus

from casa_live.server import protocol as p

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
ORIGIN = "http://good.example"
N = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "CASA_AUTH_KEYS": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "casa_live.cli.main", "serve", "--model-dir", str(model_dir), "--port", str(port),
           "--max-sessions", "2", "--max-message-bytes", "8192", "--allowed-origin", ORIGIN]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"casa serve did not come up:\n{log.read_text()}")
            time.sleep(0.3)
        yield {"url": url, "ws": f"ws://127.0.0.1:{port}{p.STREAM_PATH}", "log": log}
    finally:
        proc.terminate()
        proc.wait(30)
    assert KEY not in log.read_text()  # keys never reach the log


async def caption(uri: str, messages: list[bytes], **connect) -> list[dict]:
    async with websockets.connect(uri, max_size=None, **connect) as ws:
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created"
        await ws.send(
            json.dumps({"type": "session.update", "session": {"mode": "offline", "max_new_tokens": 4}})
        )
        for m in messages:
            await ws.send(m)
        await ws.send(json.dumps({"type": "session.close"}))
        events = [json.loads(m) async for m in ws]
        assert ws.close_code == 1000
    return events


def segments(events: list[dict]) -> list[int]:
    return [e["frame"] for e in events if e["type"] == "caption.segment"]


def test_banner_prints_the_demo_url(server):
    assert "demo page:  http://127.0.0.1:" in server["log"].read_text()


def test_images_and_webm_over_a_real_socket(server):
    frames = world_frames(N)
    auth = {"additional_headers": {"Authorization": f"Bearer {KEY}"}}
    events = asyncio.run(caption(server["ws"], image_messages(frames), **auth))
    assert segments(events) == list(range(N))
    webm = container_messages(encode_stream(frames, "webm", "libvpx"), chunk=1000)
    events = asyncio.run(caption(server["ws"] + f"?token={KEY}", webm, origin=ORIGIN))
    assert segments(events) == list(range(N))
    assert [e["type"] for e in events if e["type"] == "error"] == []


def test_wrong_key_closes_1008(server):
    async def run() -> tuple[dict, int]:
        async with websockets.connect(server["ws"] + "?token=wrong") as ws:
            event = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return event, ws.close_code

    event, code = asyncio.run(run())
    assert event["code"] == "unauthorized" and code == 1008


def test_cross_site_origin_is_refused_at_the_handshake(server):
    async def run() -> None:
        async with websockets.connect(server["ws"] + f"?token={KEY}", origin="http://evil.example"):
            pass

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(run())
    assert refused.value.response.status_code == 403


def test_messages_above_the_transport_limit_close_1009(server):
    async def run() -> tuple[list[dict], int]:
        async with websockets.connect(server["ws"] + f"?token={KEY}", max_size=None) as ws:
            await ws.recv()
            await ws.send(p.pack_image(b"\xff\xd8\xff" + b"\x00" * 10_000, 0))  # above 8192: error, alive
            event = json.loads(await ws.recv())
            await ws.send(b"\x01" + b"\x00" * 40_000)  # above the 4x transport limit: the socket closes
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return [event], ws.close_code

    events, code = asyncio.run(run())
    assert events[0]["code"] == "frame_too_large" and not events[0]["fatal"]
    assert code == 1009


def test_metrics_and_models_over_http(server):
    text = httpx.get(server["url"] + "/metrics").text
    assert "casa_frames_captioned_total" in text
    assert httpx.get(server["url"] + "/metrics", follow_redirects=False).status_code == 200
    assert httpx.get(server["url"] + "/v1/models").json()["data"][0]["id"] == "test-tiny"
