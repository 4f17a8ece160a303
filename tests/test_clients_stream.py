"""The command-line streamer's parts, and its behaviour against a scripted protocol server.

The scripted server speaks server/protocol.py exactly but fails on demand (capacity, auth, a fatal
error, a dropped connection), which the real server cannot be made to do on cue. End-to-end runs
against the real server are in test_clients_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from subtitle_helpers import assert_monotonic, parse_srt, parse_vtt

from casa_live.clients import wire
from casa_live.clients.printer import LivePrinter
from casa_live.clients.sources import Sampler, SourceError, encode_jpeg, open_source
from casa_live.clients.stream import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    StreamError,
    StreamOptions,
    backoff_delay,
    run_stream,
    stream_url,
)
from casa_live.clients.watches import watch_rules
from casa_live.clients.writers import Alert, Answer, Segment, open_writers
from casa_live.server import protocol
from casa_live.server.alerts import AlertTracker
from casa_live.server.subtitles import format_timestamp

# ---------------------------------------------------------------------------------- pure parts


def test_timestamps_and_writers(tmp_path: Path) -> None:
    assert format_timestamp(3723.4567, ",") == "01:02:03,457"
    assert format_timestamp(0.0, ".") == "00:00:00.000"
    writers = open_writers(srt=tmp_path / "a.srt", vtt=tmp_path / "a.vtt", jsonl=tmp_path / "a.jsonl")
    segs = [
        Segment(0, 0.0, 0.5, "a red circle", 12.0, 40.0),
        Segment(1, 0.5, 0.5, "", 10.0, 30.0),  # empty caption: JSONL only
        Segment(2, 1.0, 1.0, "two\n\nlines --> x", 11.0, 35.0),  # zero length, blank line, arrow
    ]
    for s in segs:
        for w in writers:
            w.write(s)
    # Files are readable before close (flushed per segment).
    assert len(parse_srt((tmp_path / "a.srt").read_text())) == 2
    for w in writers:
        w.close()
    srt = parse_srt((tmp_path / "a.srt").read_text())
    vtt = parse_vtt((tmp_path / "a.vtt").read_text())
    assert srt == vtt
    assert [c[2] for c in srt] == ["a red circle", "two\nlines -> x"]
    assert_monotonic(srt)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) >= {"start", "end", "text", "ttft_ms", "latency_ms"}


def test_sampler_picks_one_frame_per_period() -> None:
    s = Sampler(2.0)
    taken = [i for i in range(90) if s.take(i / 30)]  # 3 s of 30 fps
    assert taken == [0, 15, 30, 45, 60, 75]
    s = Sampler(2.0)
    assert [t for t in (0.0, 0.1, 0.6, 3.0, 3.2, 3.5) if s.take(t)] == [0.0, 0.6, 3.0, 3.5]  # gap: no burst


def test_sources(tmp_path: Path) -> None:
    from casa_live.model.world.video import write_video

    path = write_video(
        tmp_path / "ramp.mp4", [np.full((48, 64, 3), 8 * i, np.uint8) for i in range(30)], fps=10
    )
    frames = list(open_source(str(path)).frames(2.0))
    assert [round(f.pts, 3) for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8
    chunks = list(open_source(str(path)).container_chunks())
    assert b"".join(c.data for c in chunks) == path.read_bytes()
    times = [c.time for c in chunks]
    # Cut where packets end, at least 0.25 s of media apart: the realtime sender paces by these.
    assert times == sorted(times) and times[0] < 0.25 and times[-1] == pytest.approx(2.9, abs=0.01)
    assert len(chunks) >= 8 and all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(sorted(set(times))))

    syn = open_source("synthetic:5", seconds=3)
    frames = list(syn.frames(2.0))
    assert [f.pts for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert np.array_equal(frames[2].image, syn.clip().frames[2])
    data = b"".join(c.data for c in syn.container_chunks())
    assert data[:4] == b"\x1a\x45\xdf\xa3"  # EBML: a WebM header the server can start from

    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="integer seed"):
        open_source("synthetic:abc")
    with pytest.raises(SourceError, match="no container bytes"):
        open_source("/dev/video0").container_chunks()

    jpeg = encode_jpeg(np.zeros((480, 1280, 3), np.uint8), max_side=640)
    assert Image.open(io.BytesIO(jpeg)).size == (640, 240)


def test_stream_url() -> None:
    assert stream_url("127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/stream"
    assert stream_url("http://h:1/") == "ws://h:1/v1/stream"
    assert stream_url("https://h") == "wss://h/v1/stream"
    assert stream_url("ws://h:2/custom/path") == "ws://h:2/custom/path"
    with pytest.raises(StreamError):
        stream_url("ftp://h")


def test_wire_messages_follow_the_protocol() -> None:
    msg = protocol.unpack(wire.image_frame(1.5, b"JPEG"))
    assert msg.kind == protocol.BinaryKind.IMAGE and msg.pts_us == 1_500_000 and msg.payload == b"JPEG"
    assert protocol.unpack(wire.container_chunk(b"\x1a\x45")).kind == protocol.BinaryKind.CONTAINER
    update = protocol.parse_client_event(
        wire.session_update({"fps": 2, "prompt": "hi"}, {"container": "webm"})
    )
    assert update.session.fps == 2 and update.input.container == "webm"
    assert protocol.parse_client_event(wire.marker("m1")).id == "m1"
    assert protocol.parse_client_event(wire.session_close()).type == "session.close"
    assert wire.parse_event(b"\x00") is None and wire.parse_event('{"type": "from.the.future"}') is None
    err = wire.parse_event('{"type":"error","code":"capacity","message":"32 of 32 in use","fatal":true}')
    assert wire.describe_error(err) == "capacity: the server is full; try again shortly - 32 of 32 in use"


def test_printer_overwrites_partial_line() -> None:
    out = io.StringIO()
    p = LivePrinter(out, io.StringIO(), live=True)
    p.delta(0, 0.0, "a red")
    p.delta(0, 0.0, " circle")
    p.segment(Segment(0, 0.0, 0.5, "a red circle"))
    text = out.getvalue()
    assert "\r\x1b[K[00:00:00.000] a red circle" in text
    assert text.endswith("\r\x1b[K[00:00:00.000 --> 00:00:00.500] a red circle\n")
    out = io.StringIO()
    p = LivePrinter(out, io.StringIO(), live=False)  # a pipe: final lines only
    p.delta(0, 0.0, "a red")
    p.segment(Segment(0, 0.0, 0.5, "a red circle"))
    assert out.getvalue() == "[00:00:00.000 --> 00:00:00.500] a red circle\n"


# ---------------------------------------------------------------------------------- scripted server


class ScriptedServer:
    """/v1/stream speaking server/protocol.py, in a thread. `mode` picks a failure:
    ok | capacity | fatal_after_2 | drop_after_2 | drain_after_2 | bad_settings; `token` requires a
    Bearer key. A failure happens once (at the third frame received over all connections); each
    connection numbers its frames from 0, as a real server does, and captions say the overall count.

    Questions (`response.create`) are answered as the real server does, about the latest captioned
    frame, at once when one was captioned and otherwise after the next caption: `response.created`,
    two deltas, `response.done` with the text `seen N` (N the overall frame count). `questions`:
    answer | refuse (invalid_request, echoing the event_id, as a model without a question template) |
    hold_first (the first connection never answers; the later ones do).

    Watches (session.update `watches`) are scored `scores(n)` on the overall frame n, the same for
    every watch, and debounced by the server's own AlertTracker: alert.started / alert.ended come
    before the frame's segment, which carries watch_scores; session.close ends the active alerts
    (reason session_closed), as the real server does."""

    def __init__(
        self,
        mode: str = "ok",
        token: str | None = None,
        questions: str = "answer",
        scores=lambda n: 0.5,
    ) -> None:
        self.mode, self.token, self.question_mode, self.scores = mode, token, questions, scores
        self.questions: list[tuple[int, dict]] = []  # (connection, response.create as sent)
        self.max_in_flight = 0
        self.frames: list[protocol.BinaryMessage] = []
        self.arrivals: list[float] = []  # time.monotonic() of each binary message
        self.updates: list[dict] = []
        self.connections = 0
        self.headers: dict[str, str] = {}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", 0) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handle(self, ws) -> None:
        send = lambda ev: ws.send(protocol.dump(ev))  # noqa: E731
        self.headers = dict(ws.request.headers)
        self.connections += 1
        k = -1  # this connection's frame index
        n = -1  # the overall frame count of the latest caption
        conn = self.connections
        pending: list[protocol.ResponseCreate] = []  # questions not answered yet
        trackers: dict[str, AlertTracker] = {}  # this session's watches
        last: dict[str, tuple[int, float, float]] = {}  # watch id -> (frame, pts, score) last scored

        async def score(k: int, n: int, pts: float) -> dict[str, float] | None:
            if not trackers:
                return None
            scores = {wid: self.scores(n) for wid in trackers}
            for wid, tracker in trackers.items():
                last[wid] = (k, pts, scores[wid])
                change = tracker.observe(k, pts, scores[wid])
                if change == "started":
                    await send(protocol.AlertStarted(watch_id=wid, frame=k, pts=pts, score=scores[wid]))
                elif change == "ended":
                    await send(protocol.AlertEnded(watch_id=wid, frame=k, pts=pts, score=scores[wid]))
            return scores

        async def answer(frame: int, n: int, pts: float) -> None:
            if self.question_mode == "hold_first" and conn == 1:
                return
            while pending:
                req = pending.pop(0).response
                await send(
                    protocol.ResponseCreated(response=protocol.ResponseStarted(id=req.id, frame=frame))
                )
                for piece in ("seen", f" {n}"):
                    await send(protocol.ResponseOutputTextDelta(response_id=req.id, delta=piece))
                result = protocol.ResponseResult(
                    id=req.id,
                    frame=frame,
                    pts=pts,
                    text=f"seen {n}",
                    status="completed",
                    ttft_ms=3.0,
                    latency_ms=7.0,
                )
                await send(protocol.ResponseDone(response=result))

        if self.token and ws.request.headers.get("Authorization") != f"Bearer {self.token}":
            await send(protocol.Error(code="unauthorized", message="missing or wrong key", fatal=True))
            await ws.close(1008, "unauthorized")
            return
        if self.mode == "capacity":
            await send(protocol.Error(code="capacity", message="2 of 2 sessions in use", fatal=True))
            await ws.close(1013, "capacity")
            return
        settings = protocol.SessionSettings(prompt="describe", fps=2.0, max_new_tokens=20, mode="live")
        limits = protocol.Limits(
            max_message_bytes=1 << 22,
            max_frame_width=4096,
            max_frame_height=4096,
            max_fps=10,
            max_session_seconds=60,
            idle_timeout_seconds=30,
            max_input_rate=100,
        )
        await send(
            protocol.SessionCreated(
                session_id="s1",
                model="scripted",
                image_size=112,
                limits=limits,
                settings=settings,
                input=protocol.InputSettings(),
            )
        )
        async for raw in ws:
            if isinstance(raw, bytes):
                msg = protocol.unpack(raw)
                self.frames.append(msg)
                self.arrivals.append(time.monotonic())
                n = len(self.frames) - 1
                k += 1
                if n == 2 and self.mode == "drain_after_2":  # this frame is in flight: caption it, then 1012
                    await send(protocol.SessionDraining(deadline_seconds=5.0))
                if n == 2 and self.mode == "fatal_after_2":
                    await send(protocol.Error(code="internal", message="boom", fatal=True))
                    await ws.close(1011, "internal")
                    return
                if n == 2 and self.mode == "drop_after_2":
                    ws.transport.abort()
                    return
                pts = msg.pts if msg.pts is not None else n / settings.fps
                for piece in ("frame", f" {n}"):
                    await send(protocol.CaptionDelta(frame=k, pts=pts, text=piece))
                watch_scores = await score(k, n, pts)
                await send(
                    protocol.CaptionSegment(
                        frame=k,
                        start=pts,
                        end=pts + 1 / settings.fps,
                        text=f"frame {n}",
                        tokens=3,
                        reason="stop",
                        ttft_ms=5.0,
                        latency_ms=9.0,
                        watch_scores=watch_scores,
                    )
                )
                await answer(k, n, pts)
                if n == 2 and self.mode == "drain_after_2":
                    # as the real drain does: frames already on the wire are still captioned;
                    # close once none has arrived for 0.3 s
                    while True:
                        try:
                            late = await asyncio.wait_for(ws.recv(), 0.3)
                        except asyncio.TimeoutError:
                            break
                        if isinstance(late, bytes):
                            msg = protocol.unpack(late)
                            self.frames.append(msg)
                            self.arrivals.append(time.monotonic())
                            n, k = len(self.frames) - 1, k + 1
                            pts = msg.pts if msg.pts is not None else n / settings.fps
                            await send(
                                protocol.CaptionSegment(
                                    frame=k, start=pts, end=pts + 1 / settings.fps, text=f"frame {n}",
                                    tokens=3, reason="stop", ttft_ms=5.0, latency_ms=9.0,
                                )
                            )  # fmt: skip
                    await send(protocol.SessionClosed(reason="draining"))
                    await ws.close(1012, "draining")
                    return
                continue
            event = protocol.parse_client_event(raw)
            if event.type == "session.update":
                self.updates.append(json.loads(raw))
                if self.mode == "bad_settings":
                    await send(
                        protocol.Error(code="invalid_settings", message="fps: above max_fps 10", fatal=False)
                    )
                    continue
                merged = settings.model_dump() | event.session.model_dump(exclude_none=True)
                settings = protocol.SessionSettings(**merged)
                for w in event.session.watches or []:
                    trackers[w.id] = AlertTracker(w.threshold, w.min_frames, w.clear_frames, w.cooldown_s)
                await send(protocol.SessionUpdated(settings=settings, input=protocol.InputSettings()))
            elif event.type == "response.create":
                self.questions.append((conn, json.loads(raw)))
                if self.question_mode == "refuse":
                    await send(
                        protocol.Error(
                            code="invalid_request",
                            message="this model answers no questions (its checkpoint has no question template)",
                            fatal=False,
                            event_id=event.event_id,
                        )
                    )
                    continue
                pending.append(event)
                self.max_in_flight = max(self.max_in_flight, len(pending))
                if k >= 0:
                    await answer(k, n, self.frames[-1].pts)
            elif event.type == "input.marker":
                await send(protocol.Marker(id=event.id))
            elif event.type == "session.close":
                for wid, tracker in trackers.items():
                    if wid in last and tracker.end(last[wid][0], last[wid][1]):
                        frame, pts, value = last[wid]
                        ended = protocol.AlertEnded(
                            watch_id=wid, frame=frame, pts=pts, score=value, reason="session_closed"
                        )
                        await send(ended)
                await send(protocol.SessionClosed(reason="client"))
                await ws.close(1000)
                return


def _run(url: str, tmp_path: Path, capsys, **kw) -> tuple[int, str, Path]:
    options = StreamOptions(url=url, open_timeout=5, reply_timeout=10, close_timeout=5, **kw)
    writers = open_writers(srt=tmp_path / "out.srt", vtt=tmp_path / "out.vtt")
    code = run_stream(open_source("synthetic:1", seconds=3), options, writers, LivePrinter(live=False))
    return code, capsys.readouterr().err, tmp_path


def test_stream_happy_path_flow_control_and_files(tmp_path: Path, capsys) -> None:
    with ScriptedServer(token="sekrit") as srv:
        code, err, out = _run(
            srv.url,
            tmp_path,
            capsys,
            token="sekrit",
            realtime=False,
            session={"prompt": "what moves?", "fps": 2},
        )
    assert code == EXIT_OK, err
    assert srv.headers.get("authorization") == "Bearer sekrit"
    assert srv.updates[0]["session"] == {"prompt": "what moves?", "fps": 2.0, "mode": "offline"}
    assert [m.pts for m in srv.frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    cues = parse_srt((out / "out.srt").read_text())
    assert [c[2] for c in cues] == [f"frame {i}" for i in range(6)]
    assert_monotonic(cues)
    assert parse_vtt((out / "out.vtt").read_text()) == cues
    assert "sent 6 frames, captioned 6" in err


def test_stream_container_mode(tmp_path: Path, capsys) -> None:
    with ScriptedServer() as srv:
        code, err, _ = _run(srv.url, tmp_path, capsys, realtime=False, send="container", container="webm")
    assert code == EXIT_OK, err
    assert srv.frames and all(m.kind == protocol.BinaryKind.CONTAINER for m in srv.frames)
    assert srv.frames[0].payload[:4] == b"\x1a\x45\xdf\xa3"
    assert srv.updates[0]["input"] == {"container": "webm"}


@pytest.mark.parametrize(
    ("mode", "token", "code", "words"),
    [
        ("capacity", None, EXIT_ERROR, "the server is full"),
        ("ok", "needed", EXIT_ERROR, "needs a valid key (--token or CASA_TOKEN)"),
        (
            "bad_settings",
            None,
            EXIT_USAGE,
            "invalid_settings: a session setting was rejected - fps: above max_fps",
        ),
        ("fatal_after_2", None, EXIT_ERROR, "internal: the server hit an internal error - boom"),
        ("drop_after_2", None, EXIT_ERROR, "lost the connection to the server"),
    ],
)
def test_stream_reports_server_failures(tmp_path: Path, capsys, mode, token, code, words) -> None:
    with ScriptedServer(mode, token) as srv:
        got, err, out = _run(srv.url, tmp_path, capsys, realtime=False, reconnect_tries=0)
    assert got == code, err
    assert words in err
    if mode.endswith("after_2"):  # the captions before the failure are in the files
        assert [c[2] for c in parse_srt((out / "out.srt").read_text())] == ["frame 0", "frame 1"]


def _run_jsonl(url: str, tmp_path: Path, capsys, **kw) -> tuple[int, str, list[dict]]:
    options = StreamOptions(url=url, open_timeout=5, reply_timeout=10, close_timeout=5, realtime=False, **kw)
    writers = open_writers(srt=tmp_path / "out.srt", vtt=tmp_path / "out.vtt", jsonl=tmp_path / "out.jsonl")
    code = run_stream(open_source("synthetic:1", seconds=3), options, writers, LivePrinter(live=False))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return code, capsys.readouterr().err, rows


def test_reconnect_after_a_drain_loses_nothing_and_numbering_goes_on(tmp_path: Path, capsys) -> None:
    with ScriptedServer("drain_after_2") as srv:
        code, err, rows = _run_jsonl(srv.url, tmp_path, capsys, session={"prompt": "what moves?"})
    assert code == EXIT_OK, err
    assert srv.connections == 2
    # the second session got the same settings
    assert srv.updates[0] == srv.updates[1]
    assert srv.updates[0]["session"] == {"prompt": "what moves?", "mode": "offline"}
    # every frame was sent once; the one in flight at the drain was captioned by the old session
    assert [m.pts for m in srv.frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [r["text"] for r in rows] == [f"frame {i}" for i in range(6)]
    assert [r["frame"] for r in rows] == list(range(6))  # no restart at 0, no gap
    assert [r["start"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    cues = parse_srt((tmp_path / "out.srt").read_text())  # indexes 1..6 checked by the parser
    assert len(cues) == 6 and parse_vtt((tmp_path / "out.vtt").read_text()) == cues
    assert_monotonic(cues)
    assert "server: draining" in err and "reconnecting in" in err and "reconnected: session s1" in err
    assert "reconnected 1x (0 frames lost)" in err


@pytest.mark.parametrize("mode", ["drop_after_2", "fatal_after_2"])
def test_reconnect_after_1006_or_1011_loses_at_most_the_frame_in_flight(
    tmp_path: Path, capsys, mode: str
) -> None:
    with ScriptedServer(mode) as srv:
        code, err, rows = _run_jsonl(srv.url, tmp_path, capsys)
    assert code == EXIT_OK, err
    assert srv.connections == 2
    # The frame the server took down with it (pts 1.0) is lost; the stream goes on from the next
    # one. On a loaded machine the client may already have sent pts 1.5 into the dying connection
    # before it saw the failure: that one is lost too, and counted.
    everything = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    starts = [r["start"] for r in rows]
    lost = len(everything) - len(rows)
    assert starts in ([0.0, 0.5, 1.5, 2.0, 2.5], [0.0, 0.5, 2.0, 2.5]), starts
    assert [m.pts for m in srv.frames] == (everything if lost == 1 else [0.0, 0.5, 1.0, 2.0, 2.5])
    assert [r["frame"] for r in rows] == list(range(len(rows)))  # numbering goes on without a gap
    assert len(parse_srt((tmp_path / "out.srt").read_text())) == len(rows)
    assert f"reconnected 1x ({lost} frames lost)" in err


def test_reconnect_gives_up_after_its_tries(tmp_path: Path, capsys) -> None:
    with ScriptedServer("capacity") as srv:
        t0 = time.monotonic()
        code, err, _ = _run(srv.url, tmp_path, capsys, realtime=False, reconnect_tries=3, backoff_base=0.05)
        took = time.monotonic() - t0
    assert code == EXIT_ERROR
    assert srv.connections == 4  # the first try and 3 reconnects
    assert "gave up after 3 reconnect tries: capacity: the server is full" in err
    assert err.count("reconnecting in") == 3 and "(try 3 of 3)" in err
    assert took >= 0.05 * (0.5 + 1 + 2) / 1  # the backoff was waited (jitter keeps each wait >= half)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    import random

    rng = random.Random(0)
    for attempt in range(1, 12):
        ceiling = min(8.0, 0.25 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.25, 8.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not fixed


def test_stream_rejects_bad_settings_before_connecting(tmp_path: Path, capsys) -> None:
    code, err, _ = _run("ws://127.0.0.1:9/v1/stream", tmp_path, capsys, session={"fps": -1})
    assert code == EXIT_USAGE and "invalid session settings: fps" in err


def test_stream_unreachable_server(tmp_path: Path, capsys) -> None:
    code, err, _ = _run("ws://127.0.0.1:9/v1/stream", tmp_path, capsys)
    assert code == EXIT_ERROR
    assert "cannot reach the server at ws://127.0.0.1:9/v1/stream: connection refused" in err


def test_realtime_paces_frames_at_their_timestamps(tmp_path: Path, capsys) -> None:
    with ScriptedServer() as srv:
        code, err, _ = _run(srv.url, tmp_path, capsys, realtime=True)
    assert code == EXIT_OK, err
    arrivals = np.array(srv.arrivals) - srv.arrivals[0]
    pts = np.array([m.pts for m in srv.frames])
    assert len(pts) == 6
    assert np.abs(arrivals - pts).max() < 0.25, (arrivals, pts)  # 0.5 s apart, not all at once


def test_http_url_source(tmp_path: Path) -> None:
    import functools
    import http.server

    from casa_live.model.world.video import write_video

    write_video(tmp_path / "clip.webm", [np.full((32, 32, 3), 20 * i, np.uint8) for i in range(8)], fps=4)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        source = open_source(f"http://127.0.0.1:{httpd.server_address[1]}/clip.webm")
        assert not source.live
        assert [f.pts for f in source.frames(2.0)] == [0.0, 0.5, 1.0, 1.5]
    finally:
        httpd.shutdown()


# ---------------------------------------------------------------------------------- questions

COUNT = "how many objects are there?"


def test_question_messages_follow_the_protocol() -> None:
    event = protocol.parse_client_event(wire.response_create("q7", COUNT, 8))
    assert event.type == "response.create" and event.event_id == "q7"  # an error about it names it
    assert (event.response.id, event.response.question, event.response.max_new_tokens) == ("q7", COUNT, 8)
    assert protocol.parse_client_event(wire.response_cancel("q7")).response_id == "q7"
    for bad in ("", "   ", "x" * (protocol.MAX_QUESTION_CHARS + 1)):
        with pytest.raises(ValidationError):
            wire.response_create("q1", bad)
    # The server leaves frame, pts and ttft_ms out of an answer that never started: still an answer.
    done = wire.parse_event(
        '{"type":"response.done","response":{"id":"q1","text":"","status":"cancelled","latency_ms":2.5}}'
    )
    assert isinstance(done, wire.ResponseDone)
    assert (done.response.frame, done.response.pts, done.response.ttft_ms) == (None, None, None)
    assert done.response.status == "cancelled"
    assert wire.parse_event('{"type":"response.done","response":{"id":"q1"}}') is None
    full = protocol.ResponseResult(
        id="q2", frame=3, pts=1.5, text="two", status="completed", ttft_ms=4.0, latency_ms=9.0
    )
    assert wire.parse_event(protocol.dump(protocol.ResponseDone(response=full))).response == full


def test_printer_writes_answers_apart_from_captions() -> None:
    out = io.StringIO()
    p = LivePrinter(out, io.StringIO(), live=False, quiet=True)  # quiet hides captions, not answers
    p.segment(Segment(0, 0.0, 0.5, "a red circle"))
    p.answer(Answer("q1", COUNT, 4, 2.0, "two", "completed", 5.0, 9.0))
    p.answer(Answer("q2", "where is\nit?", 5, 2.5, "top", "incomplete", 5.0, 9.0))
    p.answer(Answer("q3", COUNT, None, None, "", "cancelled", None, 1.0))
    p.answer(Answer("q4", COUNT, None, None, "", "failed", error="invalid_request: no template"))
    assert out.getvalue().splitlines() == [
        "? how many objects are there? -> two (frame 4)",
        "? where is it? -> top (frame 5, incomplete)",
        "? how many objects are there? -> (cancelled)",
        "? how many objects are there? -> (failed: invalid_request: no template)",
    ]
    out = io.StringIO()
    p = LivePrinter(out, io.StringIO(), live=True)  # a terminal: the partial caption line goes on below
    p.delta(7, 3.5, "a blue")
    p.answer(Answer("q1", COUNT, 6, 3.0, "one", "completed", 5.0, 9.0))
    assert out.getvalue().endswith(
        "\r\x1b[K? how many objects are there? -> one (frame 6)\n\r\x1b[K[00:00:03.500] a blue"
    )


def test_jsonl_records_answers_apart_from_captions(tmp_path: Path) -> None:
    writers = open_writers(srt=tmp_path / "a.srt", jsonl=tmp_path / "a.jsonl")
    for w in writers:
        w.write(Segment(0, 0.0, 0.5, "a red circle", 12.0, 40.0))
        w.write_answer(Answer("q1", COUNT, 0, 0.0, "one", "completed", 5.0, 9.0))
        w.write_answer(Answer("q2", COUNT, None, None, "", "failed", error="refused"))
        w.close()
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "frame": 0,
        "start": 0.0,
        "end": 0.5,
        "text": "a red circle",
        "ttft_ms": 12.0,
        "latency_ms": 40.0,
    }
    assert rows[1] == {
        "type": "answer", "id": "q1", "question": COUNT, "frame": 0, "pts": 0.0, "text": "one",
        "status": "completed", "ttft_ms": 5.0, "latency_ms": 9.0,
    }  # fmt: skip
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "refused" and rows[2]["frame"] is None
    assert len(parse_srt((tmp_path / "a.srt").read_text())) == 1  # subtitles: captions only


def _run_ask(
    srv: ScriptedServer, tmp_path: Path, capsys, stdin=None, **kw
) -> tuple[int, str, str, list[dict]]:
    options = StreamOptions(
        url=srv.url, open_timeout=5, reply_timeout=10, close_timeout=5, realtime=False, **kw
    )
    writers = open_writers(srt=tmp_path / "out.srt", jsonl=tmp_path / "out.jsonl")
    code = run_stream(open_source("synthetic:1", seconds=3), options, writers, LivePrinter(live=False), stdin)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    captured = capsys.readouterr()
    return code, captured.out, captured.err, rows


def test_ask_at_the_start_and_every_seconds_of_stream_time(tmp_path: Path, capsys) -> None:
    with ScriptedServer() as srv:
        code, out, err, rows = _run_ask(
            srv, tmp_path, capsys, questions=[COUNT, "is the scene empty?"], ask_every=1.0
        )
    assert code == EXIT_OK, err
    # at the start, then when the stream reaches 1.0 s and 2.0 s (frames at 0, 0.5, ... 2.5 s)
    asked = [(q["response"]["id"], q["response"]["question"]) for _, q in srv.questions]
    assert asked == [(f"q{i + 1}", (COUNT, "is the scene empty?")[i % 2]) for i in range(6)]
    assert all(q["event_id"] == q["response"]["id"] for _, q in srv.questions)
    captions = [r for r in rows if "type" not in r]
    answers = [r for r in rows if r.get("type") == "answer"]
    assert [r["text"] for r in captions] == [f"frame {i}" for i in range(6)]  # caption records as before
    assert sorted(a["id"] for a in answers) == [f"q{i}" for i in range(1, 7)]
    for a in answers:
        assert a["status"] == "completed" and a["text"] == f"seen {a['frame']}"
        assert a["pts"] == a["frame"] * 0.5 and a["ttft_ms"] == 3.0 and a["latency_ms"] == 7.0
    first = next(a for a in answers if a["id"] == "q1")
    assert first["question"] == COUNT and first["frame"] == 0  # asked before any frame: about the first
    by_id = {a["id"]: a for a in answers}
    assert by_id["q3"]["frame"] >= 2 and by_id["q5"]["frame"] >= 4  # the later rounds see later frames
    lines = out.splitlines()
    assert sum(line.startswith("[") for line in lines) == 6  # the captions keep their own lines
    assert f"? {COUNT} -> seen 0 (frame 0)" in lines
    assert sum(line.startswith("? ") for line in lines) == 6
    assert "answered 6 of 6 questions" in err


def test_interactive_lines_are_questions(tmp_path: Path, capsys) -> None:
    stdin = io.StringIO(
        f"{COUNT}\n\n   \nis there a red circle?\n{'x' * (protocol.MAX_QUESTION_CHARS + 1)}\n"
    )
    with ScriptedServer() as srv:
        code, out, err, rows = _run_ask(srv, tmp_path, capsys, stdin=stdin, interactive=True)
    assert code == EXIT_OK, err
    assert [q["response"]["question"] for _, q in srv.questions] == [COUNT, "is there a red circle?"]
    answers = [r for r in rows if r.get("type") == "answer"]
    assert [(a["id"], a["question"], a["status"]) for a in answers] == [
        ("q1", COUNT, "completed"),
        ("q2", "is there a red circle?", "completed"),
    ]
    assert "interactive: type a question" in err
    assert f"question not asked: String should have at most {protocol.MAX_QUESTION_CHARS} characters" in err
    assert "? is there a red circle? -> seen" in out


def test_at_most_four_questions_in_flight(tmp_path: Path, capsys) -> None:
    questions = [f"is there a {c} circle?" for c in ("red", "green", "blue", "yellow", "purple", "white")]
    with ScriptedServer() as srv:
        code, _, err, rows = _run_ask(srv, tmp_path, capsys, questions=questions)
    assert code == EXIT_OK, err
    assert srv.max_in_flight == protocol.MAX_RESPONSES_IN_FLIGHT  # a fifth would be rate_limited
    answers = [r for r in rows if r.get("type") == "answer"]
    assert [a["question"] for a in answers] == questions and all(a["status"] == "completed" for a in answers)
    assert "rate_limited" not in err


def test_a_refused_question_is_recorded_and_the_stream_goes_on(tmp_path: Path, capsys) -> None:
    with ScriptedServer(questions="refuse") as srv:
        code, out, err, rows = _run_ask(srv, tmp_path, capsys, questions=[COUNT])
    assert code == EXIT_OK, err
    captions = [r for r in rows if "type" not in r]
    (answer,) = [r for r in rows if r.get("type") == "answer"]
    assert len(captions) == 6
    assert answer["status"] == "failed" and answer["frame"] is None and answer["text"] == ""
    assert answer["error"].startswith(
        "invalid_request: the server refused a question - this model answers no questions"
    )
    assert f"? {COUNT} -> (failed: invalid_request" in out
    assert "answered 0 of 1 questions" in err


def test_bad_questions_are_usage_errors(tmp_path: Path, capsys) -> None:
    code, err, _ = _run("ws://127.0.0.1:9/v1/stream", tmp_path, capsys, questions=["  "])
    assert code == EXIT_USAGE and "invalid question" in err


def test_questions_lost_with_a_connection_are_asked_again(tmp_path: Path, capsys) -> None:
    with ScriptedServer("drop_after_2", questions="hold_first") as srv:
        code, _, err, rows = _run_ask(srv, tmp_path, capsys, questions=[COUNT])
    assert code == EXIT_OK, err
    assert srv.connections == 2
    assert [(conn, q["response"]["id"]) for conn, q in srv.questions] == [(1, "q1"), (2, "q1")]
    (answer,) = [r for r in rows if r.get("type") == "answer"]
    captions = [r for r in rows if "type" not in r]
    assert answer["status"] == "completed"
    # frame numbers go on across sessions, for answers as for captions
    assert answer["frame"] in [c["frame"] for c in captions[2:]], (answer, captions)
    assert answer["text"] == f"seen {answer['frame'] + (len(srv.frames) - len(captions))}"


# ---------------------------------------------------------------------------------- watches

RED = "is there a red circle?"
EMPTY = "is the scene empty?"


def test_printer_and_jsonl_record_alerts_apart_from_captions(tmp_path: Path) -> None:
    out = io.StringIO()
    p = LivePrinter(out, io.StringIO(), live=False, quiet=True)  # quiet hides captions, not alerts
    p.segment(Segment(0, 0.0, 0.5, "a red circle"))
    started = Alert("started", "w1", RED, 31, 15.5, 0.968, metadata={"camera": "door-3"})
    ended = Alert("ended", "w1", "is there\na red circle?", 40, 20.0, 0.12, "session_closed")
    p.alert(started)
    p.alert(ended)
    assert out.getvalue().splitlines() == [
        f"[alert w1 started] frame 31 @ 15.5s score 0.97 — {RED}",
        f"[alert w1 ended: session_closed] frame 40 @ 20s score 0.12 — {RED}",
    ]
    writers = open_writers(srt=tmp_path / "a.srt", jsonl=tmp_path / "a.jsonl")
    for w in writers:
        w.write(Segment(0, 0.0, 0.5, "a red circle", 12.0, 40.0, {"w1": 0.968}))
        w.write_alert(started)
        w.write_alert(ended)
        w.close()
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows[0]["watch_scores"] == {"w1": 0.968}
    assert rows[1] == {
        "type": "alert", "event": "started", "watch_id": "w1", "question": RED, "frame": 31, "pts": 15.5,
        "score": 0.968, "metadata": {"camera": "door-3"},
    }  # fmt: skip
    assert rows[2]["reason"] == "session_closed" and "metadata" not in rows[2]
    assert len(parse_srt((tmp_path / "a.srt").read_text())) == 1  # subtitles: captions only


def test_watch_rules_number_the_questions() -> None:
    rules = watch_rules([RED, f" {EMPTY} "], threshold=0.2, min_frames=2)
    assert [(r["id"], r["question"]) for r in rules] == [("w1", RED), ("w2", EMPTY)]
    assert all(
        (r["threshold"], r["min_frames"], r["clear_frames"], r["cooldown_s"]) == (0.2, 2, 1, 0.0)
        for r in rules
    )
    assert [protocol.Watch(**r).id for r in rules] == ["w1", "w2"]  # what the server accepts


def test_watches_are_set_and_their_alerts_printed_and_recorded(tmp_path: Path, capsys) -> None:
    # yes on frames 1 and 2 (0.5 s and 1.0 s), no elsewhere: one alert from frame 1 to frame 3
    with ScriptedServer(scores=lambda n: 0.9 if n in (1, 2) else 0.1) as srv:
        code, out, err, rows = _run_ask(
            srv, tmp_path, capsys, watches=watch_rules([RED, EMPTY], threshold=0.5)
        )
    assert code == EXIT_OK, err
    sent = srv.updates[0]["session"]["watches"]
    assert [(w["id"], w["question"], w["threshold"]) for w in sent] == [("w1", RED, 0.5), ("w2", EMPTY, 0.5)]
    alerts = [r for r in rows if r.get("type") == "alert"]
    assert [(a["event"], a["watch_id"], a["question"], a["frame"], a["pts"], a["score"]) for a in alerts] == [
        ("started", "w1", RED, 1, 0.5, 0.9),
        ("started", "w2", EMPTY, 1, 0.5, 0.9),
        ("ended", "w1", RED, 3, 1.5, 0.1),
        ("ended", "w2", EMPTY, 3, 1.5, 0.1),
    ]
    assert all("reason" not in a for a in alerts)  # the score fell
    captions = [r for r in rows if "type" not in r]
    assert [c["watch_scores"] for c in captions] == [
        {"w1": s, "w2": s} for s in (0.1, 0.9, 0.9, 0.1, 0.1, 0.1)
    ]
    # a frame's alerts come before its caption record, as the server sends them
    kinds = [(r.get("type", "caption"), r["frame"]) for r in rows]
    assert kinds.index(("alert", 1)) < kinds.index(("caption", 1))
    lines = out.splitlines()
    assert f"[alert w1 started] frame 1 @ 0.5s score 0.90 — {RED}" in lines
    assert f"[alert w2 ended] frame 3 @ 1.5s score 0.10 — {EMPTY}" in lines
    assert sum(line.startswith("[alert ") for line in lines) == 4
    assert "2 alerts" in err


def test_an_alert_active_at_the_close_ends_there(tmp_path: Path, capsys) -> None:
    with ScriptedServer(scores=lambda n: 0.9) as srv:
        code, out, err, rows = _run_ask(srv, tmp_path, capsys, watches=watch_rules([RED], min_frames=2))
    assert code == EXIT_OK, err
    alerts = [(r["event"], r["frame"], r.get("reason")) for r in rows if r.get("type") == "alert"]
    assert alerts == [("started", 1, None), ("ended", 5, "session_closed")]
    assert f"[alert w1 ended: session_closed] frame 5 @ 2.5s score 0.90 — {RED}" in out.splitlines()
    assert "1 alert" in err


def test_alerts_cut_off_by_a_dropped_connection_end_and_the_watches_go_on(tmp_path: Path, capsys) -> None:
    with ScriptedServer("drop_after_2", scores=lambda n: 0.9) as srv:
        code, _, err, rows = _run_ask(srv, tmp_path, capsys, watches=watch_rules([RED]))
    assert code == EXIT_OK, err
    assert srv.connections == 2
    assert srv.updates[1]["session"]["watches"] == srv.updates[0]["session"]["watches"]
    alerts = [(r["event"], r["frame"], r.get("reason")) for r in rows if r.get("type") == "alert"]
    captions = [r for r in rows if "type" not in r]
    # no alert.ended came from the dropped session: the client ends it on the last frame scored there;
    # the new session starts afresh (frames in the stream's numbering)
    assert alerts[:2] == [("started", 0, None), ("ended", 1, "connection_lost")]
    assert alerts[2] == ("started", 2, None) and alerts[3][2] == "session_closed"
    assert alerts[3][1] == captions[-1]["frame"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--watch", RED, "--watch-threshold", "1"], "not a probability strictly between 0 and 1"),
        (["--watch", RED, "--watch-threshold", "abc"], "not a probability strictly between 0 and 1"),
        (["--watch", RED, "--watch-min-frames", "0"], "not a whole number of frames from 1 to 100"),
        (["--watch", RED, "--watch-cooldown", "-1"], "not a number of seconds >= 0"),
    ],
)
def test_watch_flags_are_checked_by_the_parser(capsys, argv: list[str], words: str) -> None:
    from casa_live.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["stream", "synthetic:1", *argv])
    assert exit_info.value.code == EXIT_USAGE
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--watch-threshold", "0.2"], "--watch-threshold needs at least one --watch"),
        ([f"--watch=is there a {i}?" for i in range(9)], "9 --watch questions; a session has at most 8"),
        (["--watch", " "], "invalid session settings: watches.0.question"),
    ],
)
def test_bad_watches_are_usage_errors(capsys, argv: list[str], words: str) -> None:
    from casa_live.cli.main import main

    assert main(["stream", "synthetic:1", "--server", "ws://127.0.0.1:9", *argv]) == EXIT_USAGE
    assert words in capsys.readouterr().err
