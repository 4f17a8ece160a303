"""Memory bounds and log hygiene against a real `casa serve` process (its RSS read from /proc, TCP
backpressure between it and the client), at debug log level.

For each input kind a client sends far more than the server may hold: the byte cap holds (a typed
error where the input is refused) and the server's RSS stays within `MARGIN` of where it started.
What a session may hold: the websocket layer's queue (`WS_MAX_QUEUE` messages of at most the transport
limit, 4 x max_message_bytes), the ingest's input (`max_buffered_bytes`), one decode.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from server_helpers import encode_stream, jpeg, packet_messages, world_frames

from casa_live.server import protocol as p

ROOT = Path(__file__).resolve().parents[1]
KEY = "limits-key-9f3a1c"
COOKIE = "sid=cookie-secret-77"
MIB = 1 << 20
MESSAGE = 1 * MIB  # --max-message-bytes
BUFFERED = 4 * MIB  # --max-buffered-bytes
UPLOAD = 8 * MIB  # --max-upload-bytes
SENT = 96  # messages of MESSAGE bytes per attack: 96 MiB, far above what the server may hold
MARGIN = 32 * MIB  # RSS growth allowed during an attack (measured: 5-13 MiB on a 2-core CPU box)
AUTH = {"Authorization": f"Bearer {KEY}"}
if not Path("/proc/self/status").exists():
    pytest.skip("needs /proc to read RSS", allow_module_level=True)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextmanager
def peak_rss(pid: int):
    """Samples the process's RSS every 5 ms; yields a dict with 'base' and, on exit, 'peak'."""
    out = {"base": rss(pid), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss(pid))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["growth"] = out["peak"] - out["base"]
        print(f"RSS base {out['base'] / MIB:.1f} MiB, peak {out['peak'] / MIB:.1f} MiB, "
              f"growth {out['growth'] / MIB:.1f} MiB (margin {MARGIN / MIB:.0f} MiB)")  # fmt: skip


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("limits") / "serve.log"
    env = {**os.environ, "CASA_AUTH_KEYS": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "casa_live.cli.main", "serve", "--model-dir", str(model_dir), "--port", str(port),
           "--log-level", "debug", "--max-sessions", "2", "--max-message-bytes", str(MESSAGE),
           "--max-buffered-bytes", str(BUFFERED), "--max-upload-bytes", str(UPLOAD),
           "--max-input-rate", "10000", "--max-concurrent-uploads", "1"]  # fmt: skip
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
        yield {"url": url, "ws": f"ws://127.0.0.1:{port}{p.STREAM_PATH}", "log": log, "pid": proc.pid}
    finally:
        proc.terminate()
        proc.wait(30)


async def attack(server, setup: list, messages, **session) -> list[dict]:
    """One session: settings, `setup` messages, then every message of `messages`, then a marker; the
    events up to the marker (the session must survive)."""
    async with websockets.connect(server["ws"], additional_headers=AUTH, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        events: list[dict] = []

        async def read() -> None:
            async for m in ws:
                events.append(json.loads(m))
                if events[-1]["type"] == "marker":
                    return

        reader = asyncio.create_task(read())
        await ws.send(json.dumps({"type": "session.update", "session": {"max_new_tokens": 1, **session}}))
        for m in setup:
            await ws.send(m)
        for m in messages:
            await ws.send(m)
        await ws.send(json.dumps({"type": "input.marker", "id": "end"}))
        await asyncio.wait_for(reader, 120)
    return events


def errors(events: list[dict]) -> list[str]:
    return [e["code"] for e in events if e["type"] == "error"]


def _huge_moov() -> bytes:
    """A fragmented MP4 whose moov declares 1 GiB."""
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + bytes(12)
    return ftyp + (1 << 30).to_bytes(4, "big") + b"moov"


def _huge_ivf_frame() -> bytes:
    """An IVF stream whose second frame header declares 1 GiB (FFmpeg buffers a packet whole)."""
    data = encode_stream(world_frames(2), "ivf", "libvpx")
    first = 32 + 12 + int.from_bytes(data[32:36], "little")
    return data[:first] + (1 << 30).to_bytes(4, "little") + bytes(8)


@pytest.mark.parametrize(("start", "warm", "message"), [
    (_huge_moov, ("mp4", "libx264"), "init segment"),
    (_huge_ivf_frame, ("ivf", "libvpx"), "gave no frame"),
])  # fmt: skip
def test_container_buffering_is_capped(server, start, warm, message):
    """A container stream that declares a 1 GiB box or packet, followed by 96 MiB of chunks."""
    stream = encode_stream(world_frames(2), *warm)
    asyncio.run(attack(server, [], [p.pack_container(stream)]))  # the demuxer's own allocations, first
    filler = p.pack_container(b"\x00" * (MESSAGE - 1))
    with peak_rss(server["pid"]) as mem:
        events = asyncio.run(attack(server, [p.pack_container(start())], [filler] * SENT))
    assert "frame_too_large" in errors(events) and set(errors(events)) <= {"frame_too_large", "bad_frame"}
    assert message in next(e["message"] for e in events if e.get("code") == "frame_too_large")
    assert mem["growth"] < MARGIN


def test_image_flood_is_bounded(server):
    """96 images of 1 MiB each (a real JPEG padded to the message limit), as fast as TCP takes them."""
    image = jpeg(world_frames(1, size=256)[0])
    padded = image + b"\x00" * (MESSAGE - 9 - len(image))
    messages = [p.pack_image(padded, i * 500_000) for i in range(SENT)]
    asyncio.run(attack(server, [], messages[:2]))
    with peak_rss(server["pid"]) as mem:
        events = asyncio.run(attack(server, [], messages))
    assert set(errors(events)) <= {"frame_too_large"}  # the padding makes none too large: expect none
    assert errors(events) == []
    assert mem["growth"] < MARGIN


def test_packet_flood_is_bounded(server):
    """96 packets of 1 MiB of garbage after a valid H.264 start: bad_frame, bounded."""
    valid = packet_messages(world_frames(2), "libx264")
    garbage = np.random.default_rng(0).bytes(MESSAGE - 9)
    messages = [p.pack_packet(garbage, (10 + i) * 500_000) for i in range(SENT)]
    codec = json.dumps({"type": "session.update", "input": {"codec": "h264"}})
    asyncio.run(attack(server, [codec, *valid], []))
    with peak_rss(server["pid"]) as mem:
        events = asyncio.run(attack(server, [codec, *valid], messages))
    assert errors(events) and set(errors(events)) == {"bad_frame"}
    assert mem["growth"] < MARGIN


def test_upload_body_is_capped(server):
    url = server["url"] + "/v1/captions"
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:  # declares 1 GiB, sends 10 bytes
        raw.sendall(
            f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n".encode()
            + b"x" * 10
        )
        answer = b""
        while b"frame_too_large" not in answer and (part := raw.recv(65536)):  # answered at once
            answer += part
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and '"frame_too_large"' in answer, answer

    def body():  # no Content-Length: streamed (chunked), 64 MiB
        block = b"\x00" * MIB
        for _ in range(64):
            yield block

    with peak_rss(server["pid"]) as mem:
        streamed = httpx.post(url, headers=AUTH, content=body(), timeout=60)
    assert streamed.status_code == 413 and "limited to" in streamed.json()["error"]["message"]
    assert mem["growth"] < UPLOAD + MARGIN // 2


def test_authorization_and_cookies_never_reach_the_log_at_debug(server):
    async def run() -> None:
        headers = {**AUTH, "Cookie": COOKIE}
        async with websockets.connect(server["ws"], additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with websockets.connect(server["ws"] + f"?token={KEY}") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"

    asyncio.run(run())
    httpx.get(server["url"] + "/v1/models", headers={**AUTH, "Cookie": COOKIE})
    time.sleep(0.3)
    text = server["log"].read_text()
    assert "DEBUG" in text and "< authorization: ***" in text.lower()  # logged, and redacted
    assert KEY not in text and "cookie-secret" not in text
