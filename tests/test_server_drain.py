"""Readiness that means "can take a session", and the graceful drain on SIGTERM, against a real
`casa serve` process (uvicorn's own signal handling included) and through the in-process app."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets
from server_helpers import client, image_messages, stream, world_frames
from test_server_uvicorn import free_port
from websockets.exceptions import ConnectionClosed

from casa_live.server import protocol as p

ROOT = Path(__file__).resolve().parents[1]
GRACE = 8.0


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def poll(fn, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_readyz_is_503_while_full_and_200_when_a_slot_frees(model_dir: Path) -> None:
    with client(model_dir, max_sessions=2) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["free"] == 2
        assert metric(c.get("/metrics").text, "casa_session_slots_free") == 2
        assert metric(c.get("/metrics").text, "casa_session_slots") == 2
        with stream(c), stream(c) as second:
            full = c.get("/readyz")
            assert full.status_code == 503, full.text
            assert full.json()["status"] == "full" and full.json()["free"] == 0
            assert c.get("/healthz").status_code == 200  # liveness is not readiness
            assert metric(c.get("/metrics").text, "casa_session_slots_free") == 0
            second.send({"type": "session.close"})
            second.drain()
            # the slot frees once the worker has closed the row
            poll(lambda: c.get("/readyz").status_code == 200, what="/readyz 200 after a session closed")
            assert c.get("/readyz").json()["free"] == 1
            assert metric(c.get("/metrics").text, "casa_session_slots_free") == 1


def test_drain_in_process_refuses_new_sessions(model_dir: Path) -> None:
    from casa_live.server.drain import drain

    with client(model_dir, max_sessions=2) as c:
        ctx = c.app.state.ctx
        with stream(c) as ws:
            ws.send_bytes(image_messages(world_frames(1))[0])
            done = c.portal.start_task_soon(drain, ctx, 10.0)  # the test thread reads while it drains
            events = ws.drain()
            kinds = [e["type"] for e in events]
            assert "session.draining" in kinds and kinds.index("session.draining") < kinds.index(
                "caption.segment"
            )
            assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "draining"
            assert ws.close_code == p.CloseCode.SERVICE_RESTART
        assert done.result(30) == 0  # the drain ends when the last session is gone, not at its deadline
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        with c.websocket_connect(p.STREAM_PATH) as raw:
            refused = json.loads(raw.receive_text())
        assert refused["code"] == "capacity" and "draining" in refused["message"]
        assert c.post("/v1/captions", content=b"x").status_code == 503
        text = c.get("/metrics").text
        assert metric(text, "casa_draining") == 1
        assert 'casa_sessions_total{outcome="drained"} 1.0' in text
        assert 'casa_sessions_rejected_total{reason="draining"} 2.0' in text


# ------------------------------------------------------------------------------------------- SIGTERM


def start_server(model_dir: Path, log: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "casa_live.cli.main",
        "serve",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        *args,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"casa serve did not come up:\n{log.read_text()}")
        time.sleep(0.2)


async def _recv_all(ws) -> list[dict]:  # type: ignore[no-untyped-def]
    events = []
    with pytest.raises(ConnectionClosed):
        while True:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
    return events


def test_sigterm_drains_sessions_then_exits(model_dir: Path, tmp_path: Path) -> None:
    proc, port = start_server(
        model_dir, tmp_path / "serve.log", "--max-sessions", "3", "--drain-seconds", str(GRACE)
    )
    url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}{p.STREAM_PATH}"
    frames = image_messages(world_frames(6))

    async def polite() -> tuple[list[dict], int, float]:
        """Two frames in flight at SIGTERM; stops sending at session.draining, as clients/stream.py does."""
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {"mode": "offline"}}))
            await ws.recv()
            await ws.send(frames[0])
            await ws.send(frames[1])
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = await _recv_all(ws)
            return events, ws.close_code, time.monotonic() - t0

    async def stubborn() -> tuple[list[dict], int]:
        """Ignores session.draining and keeps sending: the drain closes it at its deadline."""
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.recv()
            events: list[dict] = []

            async def keep_sending() -> None:
                with pytest.raises(ConnectionClosed):
                    for i in range(1000):
                        await ws.send(p.pack_image(frames[i % 6][9:], round(i * 5e5)))
                        await asyncio.sleep(0.25)

            sender = asyncio.create_task(keep_sending())
            events = await _recv_all(ws)
            await sender
            return events, ws.close_code

    async def during_drain() -> dict:
        """While the stubborn session holds the drain open: readiness, admission, liveness, metrics."""
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while (await http.get("/readyz")).status_code == 200:
                await asyncio.sleep(0.05)
            ready = await http.get("/readyz")
            async with websockets.connect(ws_url) as ws:
                refused = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                refused_code = ws.close_code
            return {
                "ready": (ready.status_code, ready.json()),
                "healthz": (await http.get("/healthz")).status_code,
                "refused": (refused, refused_code),
                "metrics": (await http.get("/metrics")).text,
            }

    async def main():  # type: ignore[no-untyped-def]
        stub = asyncio.create_task(stubborn())
        await asyncio.sleep(0.5)
        seen = asyncio.create_task(during_drain())
        return await polite(), await seen, await stub

    try:
        t_start = time.monotonic()
        (events, code, polite_s), seen, (stub_events, stub_code) = asyncio.run(main())
        rc = proc.wait(GRACE + 20)
        exited_s = time.monotonic() - t_start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = (tmp_path / "serve.log").read_text()
    kinds = [e["type"] for e in events]
    assert "session.draining" in kinds, (kinds, log)
    draining = events[kinds.index("session.draining")]
    assert 0 < draining["deadline_seconds"] <= GRACE
    # both frames in flight were captioned before the close, which is 1012 after session.closed
    assert [e["frame"] for e in events if e["type"] == "caption.segment"] == [0, 1], log
    assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "draining"
    assert code == 1012 and polite_s < GRACE / 2, (code, polite_s)
    assert stub_code == 1012 and "session.draining" in [e["type"] for e in stub_events]
    status, body = seen["ready"]
    assert status == 503 and body["status"] == "draining"
    assert seen["healthz"] == 200
    refused, refused_code = seen["refused"]
    assert refused["code"] == "capacity" and "draining" in refused["message"] and refused_code == 1013
    assert metric(seen["metrics"], "casa_draining") == 1
    assert rc == 0, log
    assert exited_s < GRACE + 10, exited_s  # within the grace period (plus start-up of this test)
    assert "drain finished" in log and "every session closed" in log
