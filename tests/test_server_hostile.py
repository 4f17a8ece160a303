"""A hostile client against the real app (TestClient, random test-tiny model), property-based: JSON
messages, every settings field at and beyond its bounds, binary framing, upload query parameters.

Invariants: the server answers a typed error or works; the session survives (no error here is
documented as fatal); a neighbour session in the same engine is unaffected (its captions are the same
as without the hostile one). Also: the worker's guards (a command cancelled before it runs, settings
the sampler cannot compute reaching the worker) and the websocket refusal when the worker is down.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import (
    client,
    encode_stream,
    image_messages,
    jpeg,
    of_type,
    packet_messages,
    stream,
    world_frames,
)
from starlette.websockets import WebSocketDisconnect
from test_server_inputs import JSON_VALUES, PROTOCOL_BOUNDS, client_texts, edge_values

from casa_live.model.engine.engine import SessionSettings as EngineSettings
from casa_live.server import protocol as p

TOKENS = 3
EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CODES = {c.value for c in p.ErrorCode}
FATAL = {"capacity", "unauthorized", "session_timeout"}
_ids = itertools.count()


@pytest.fixture(scope="module")
def app(model_dir):
    with client(model_dir, max_message_bytes=64 << 10, max_input_rate=100_000, max_sessions=4) as c:
        yield c


@pytest.fixture(scope="module")
def clip():
    return world_frames(6, seed=11)


def captions(ws, tag: str) -> list[str]:
    return [s["text"] for s in of_type(ws.marker(tag), "caption.segment")]


def run_neighbour(ws, clip, part: slice) -> list[str]:
    for i, m in enumerate(image_messages(clip)):
        if i in range(*part.indices(len(clip))):
            ws.send_bytes(m)
    return captions(ws, f"n{next(_ids)}")


@pytest.fixture(scope="module")
def reference(app, clip):
    """What the neighbour captions alone: the first half of the clip, then the second."""
    with stream(app) as solo:
        solo.update(mode="offline", max_new_tokens=TOKENS)
        return run_neighbour(solo, clip, slice(0, 3)), run_neighbour(solo, clip, slice(3, 6))


@pytest.fixture(scope="module")
def neighbour(app, clip, reference):
    """A neighbour open through every hostile test: it captions the first half before them and the
    second half after them (test_zz_...), and must match the reference both times."""
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=TOKENS)
        assert run_neighbour(ws, clip, slice(0, 3)) == reference[0]
        yield ws


@pytest.fixture(scope="module")
def hostile(app, neighbour):
    with stream(app) as ws:
        ws.update(mode="live", max_new_tokens=TOKENS)
        yield ws


def check_alive(ws) -> list[dict]:
    """Every event since the last check is a valid server event, every error typed and non-fatal; the
    session still answers a marker."""
    tag = f"alive-{next(_ids)}"
    ws.send({"type": "input.marker", "id": tag})
    events = []
    while True:
        event = ws.recv(30)
        assert event is not None, f"the session closed ({ws.close_code}) after {events}"
        p.parse_server_event(json.dumps(event))  # well-formed
        events.append(event)
        if event["type"] == "error":
            assert event["code"] in CODES and event["message"] and not event["fatal"], event
            assert event["code"] not in FATAL
        if event["type"] == "marker" and event["id"] == tag:
            return events


# ---- JSON messages -------------------------------------------------------------------------------


def _not_close(text: str) -> bool:
    try:
        return "session.close" not in json.dumps(json.loads(text))
    except Exception:
        return "session.close" not in text


@EXAMPLES
@given(text=client_texts().filter(_not_close))
def test_any_json_message(hostile, text):
    hostile.send_text(text)
    check_alive(hostile)


# ---- every settings field at and beyond its bounds ------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_setting_value(hostile, clip, data):
    field = data.draw(st.sampled_from([*PROTOCOL_BOUNDS, "fps", "prompt", "mode"]))
    if field == "prompt":
        value = data.draw(st.text(max_size=60) | st.text(min_size=1990, max_size=2010) | JSON_VALUES)
    elif field == "mode":
        value = data.draw(st.sampled_from(["live", "offline", "LIVE", "", None, 1]))
    else:
        value = data.draw(edge_values(*PROTOCOL_BOUNDS.get(field, (p.MIN_FPS, 10.0))))
    before = hostile.update()["settings"]
    baseline = {"fps": 2.0, "max_new_tokens": TOKENS, "mode": "live", "min_new_tokens": 0}
    hostile.send({"type": "session.update", "event_id": "s", "session": {**baseline, field: value}})
    events = check_alive(hostile)
    done = [e for e in events if e["type"] in ("session.updated", "error") and e.get("event_id") == "s"]
    assert len(done) == 1, events
    after = hostile.update()["settings"]
    if done[0]["type"] == "error":
        assert done[0]["code"] == "invalid_settings"
        assert after == before  # nothing changed
        return
    if isinstance(value, str) and field != "prompt":
        assert after[field] == value
    elif value is not None and field != "prompt":
        assert after[field] == pytest.approx(value)
    # the engine computes what was accepted: one frame gets its caption
    hostile.send_bytes(p.pack_image(jpeg(clip[0]), next(_ids) * 100_000_000))
    assert hostile.until("caption.segment", timeout=60)[-1]["reason"] in ("stop", "length", "deadline")


# ---- binary framing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(clip):
    return {
        "jpeg": jpeg(clip[0]),
        "h264": [m[9:] for m in packet_messages(clip[:2], "libx264")],
        "webm": encode_stream(clip[:2], "webm", "libvpx")[:2000],
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_binary_message(hostile, media, data):
    hostile.send({"type": "session.update", "input": {"codec": "h264"}})
    kind = data.draw(st.sampled_from([1, 2, 3]) | st.integers(0, 255))
    pts = data.draw(
        st.integers(-(2**63), 2**63 - 1)
        | st.sampled_from([0, p.MAX_PTS_US, p.MAX_PTS_US + 1, -p.MAX_PTS_US, 2**63 - 1, -(2**63)])
        | st.integers(0, 10**9)
    )
    payload = data.draw(
        st.binary(max_size=300)
        | st.just(media["jpeg"])
        | st.sampled_from(media["h264"])
        | st.just(media["webm"])
        | st.just(b"\x00" * (70 << 10))  # above max_message_bytes
    )
    if kind == p.BinaryKind.CONTAINER:
        message = bytes([kind]) + payload
    else:
        message = bytes([kind]) + struct.pack(">q", pts) + payload
    message = message[: data.draw(st.integers(0, len(message)))] if data.draw(st.booleans()) else message
    hostile.send_bytes(message)
    check_alive(hostile)


def test_huge_pts_is_bad_frame_on_every_kind_and_the_session_goes_on(hostile, media):
    hostile.send({"type": "session.update", "input": {"codec": "h264"}})
    for message in (p.pack_image(media["jpeg"], 2**63 - 1), p.pack_packet(media["h264"][0], 2**63 - 10)):
        hostile.send_bytes(message)
        errors = [e for e in check_alive(hostile) if e["type"] == "error"]
        assert [e["code"] for e in errors] == ["bad_frame"] and "2**53" in errors[0]["message"]


# ---- upload query parameters ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upload(clip):
    return encode_stream(clip[:2], "webm", "libvpx")


WATCH_KEYS = ["watch", "watch_threshold", "watch_min_frames", "watch_clear_frames", "watch_cooldown"]
QUERY_KEYS = st.sampled_from(
    [*PROTOCOL_BOUNDS, "fps", "prompt", "mode", "format", "token", "junk", *WATCH_KEYS]
)
QUERY_VALUES = st.text(max_size=30) | st.sampled_from(
    [
        "1e-30",
        "nan",
        "inf",
        "-1",
        str(2**64),
        str(2**63),
        "0.01",
        "0.5",
        "1",
        "2",
        "srt",
        "vtt",
        "json",
        "\u0000",
    ]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(QUERY_KEYS | st.text(max_size=8), QUERY_VALUES, max_size=4))
def test_any_upload_query(app, upload, query):
    if re.fullmatch(r"[0-9]+", query.get("max_new_tokens", "").strip()):  # valid long captions cost time
        query["max_new_tokens"] = str(min(int(query["max_new_tokens"].strip()), TOKENS))
    response = app.post("/v1/captions", params=query, content=upload)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["code"] in CODES and error["message"]
    elif query.get("format", "json") == "json":
        assert response.json()["frames_received"] >= 1


def test_upload_refused_for_capacity_is_counted(model_dir, upload):
    with client(model_dir, max_sessions=1) as c, stream(c):  # the only slot is taken
        response = c.post("/v1/captions", content=upload)
        assert response.status_code == 503 and response.json()["error"]["code"] == "capacity"
        assert 'casa_sessions_rejected_total{reason="capacity"} 1.0' in c.get("/metrics").text


def test_seed_above_64_bits_is_a_json_400(app, upload):
    response = app.post("/v1/captions", params={"seed": str(2**64 + 1), "temperature": "1"}, content=upload)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_settings"
    assert "seed" in response.json()["error"]["message"]


# ---- the neighbour --------------------------------------------------------------------------------


def test_hostile_settings_in_the_same_batch_leave_the_neighbour_identical(app, clip):
    """A hostile session and a neighbour captioning at once: the hostile one sends extreme (valid)
    settings, invalid ones and garbage between its frames; the neighbour's captions are those of a run
    without it."""
    good = image_messages(clip)
    with stream(app) as solo:
        solo.update(mode="offline", max_new_tokens=TOKENS)
        for m in good:
            solo.send_bytes(m)
        alone = captions(solo, "solo")
    extreme = {"temperature": p.MIN_TEMPERATURE, "top_k": p.MAX_TOP_K, "repetition_penalty": 10.0,
               "no_repeat_ngram": 16, "seed": p.MAX_SEED, "min_new_tokens": TOKENS}  # fmt: skip
    invalid = [
        {"temperature": 1e-30},
        {"seed": 2**70},
        {"top_k": 2**40},
        {"fps": 1e-9},
        {"temperature": 4e-3},
    ]
    with stream(app) as bad, stream(app) as ws:
        bad.update(mode="offline", max_new_tokens=TOKENS, **extreme)
        ws.update(mode="offline", max_new_tokens=TOKENS)
        for i, m in enumerate(good):
            ws.send_bytes(m)
            bad.send_bytes(m)
            bad.send({"type": "session.update", "session": invalid[i % len(invalid)], "event_id": "x" * 200})
            bad.send_text("[" * 30_000 + "]" * 30_000)
            bad.send_bytes(p.pack_image(jpeg(clip[i]), 2**63 - 1))
        assert captions(ws, "with") == alone
        assert [e for e in ws.events if e["type"] == "error"] == []
        codes = {e["code"] for e in check_alive(bad) + bad.events if e["type"] == "error"}
        assert codes == {"invalid_settings", "bad_json", "bad_frame"}


def test_settings_the_sampler_cannot_compute_never_reach_the_batch(app, clip):
    """Defence in depth: settings out of range handed to the worker directly (past the protocol's
    checks) are replaced by the defaults before the batch runs; only that session is told."""
    ctx = app.app.state.ctx
    good = image_messages(clip)
    with stream(app) as solo:
        solo.update(mode="offline", max_new_tokens=TOKENS)
        for m in good:
            solo.send_bytes(m)
        alone = captions(solo, "solo")
    with stream(app) as bad, stream(app) as ws:
        bad.update(mode="offline", max_new_tokens=TOKENS)
        ws.update(mode="offline", max_new_tokens=TOKENS)
        session = next(s for s in ctx.sessions if s.id == bad.events[0]["session_id"])
        broken = EngineSettings(max_new_tokens=TOKENS, temperature=1e-30)
        app.portal.call(ctx.worker.update, session.slot, session.settings.prompt, broken, False)
        for m in good:
            ws.send_bytes(m)
            bad.send_bytes(m)
        assert captions(ws, "with") == alone
        events = bad.marker("bad")
        assert [e["code"] for e in events if e["type"] == "error"] == ["internal"]
        assert len(of_type(events, "caption.segment")) == len(good)  # it goes on, with default sampling


def test_zz_the_neighbour_was_never_touched(neighbour, clip, reference):
    assert run_neighbour(neighbour, clip, slice(3, 6)) == reference[1]
    assert [e for e in neighbour.events if e["type"] == "error"] == []


# ---- worker guards --------------------------------------------------------------------------------


class _StubEngine:
    max_sessions = 1
    max_prompt_tokens = 100

    def __init__(self) -> None:
        self.opened = 0

    def prompt_ids(self, prompt):
        return [1]

    def open(self, prompt, settings):
        self.opened += 1
        return 0

    def has_work(self):
        return False

    def vision_backlog(self):
        return 0

    vision_batch = 4

    def help_vision(self):
        return False

    def free_rows(self):
        return self.max_sessions - self.opened

    def set_frame_ready_callback(self, fn):
        pass

    def shutdown(self):
        pass

    def close(self, row):
        pass

    def kv_tokens(self, row):
        return 0


def test_a_command_cancelled_before_it_runs_claims_nothing():
    from casa_live.server.metrics import Metrics
    from casa_live.server.worker import Worker

    async def run() -> tuple[int, bool]:
        engine = _StubEngine()
        worker = Worker(engine, Metrics(), asyncio.get_running_loop())
        task = asyncio.create_task(worker.open(object(), None, EngineSettings(), True))
        await asyncio.sleep(0)  # the command is queued, the thread not started yet
        task.cancel()
        await asyncio.sleep(0)
        worker.start()
        await asyncio.sleep(0.2)
        alive = worker.alive
        worker.stop()
        return engine.opened, alive

    opened, alive = asyncio.run(run())
    assert opened == 0 and alive


def test_the_websocket_is_refused_with_1013_when_the_worker_is_down(model_dir):
    with client(model_dir) as c:
        c.app.state.ctx.worker.stop()
        deadline = time.monotonic() + 5
        while c.app.state.ctx.worker.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        with c.websocket_connect(p.STREAM_PATH) as ws:
            event = ws.receive_json()
            assert event["code"] == "capacity" and event["fatal"] and "retry" in event["message"]
            with pytest.raises(WebSocketDisconnect) as refused:
                ws.receive_json()
        assert refused.value.code == 1013
        assert c.get("/readyz").status_code == 503
        assert 'casa_sessions_rejected_total{reason="unavailable"} 1.0' in c.get("/metrics").text
