"""`casa stream`: send a video source to a casa-live server over the websocket protocol, show captions.

Design:
- One connection, two tasks: a sender (reads the source in a worker thread, samples at the session
  fps, encodes JPEG, paces) and a receiver (renders deltas, writes segments, tracks stats). The
  receiver owns every server event; the sender only pushes bytes.
- Pacing: `realtime` sends each frame when its pts is due on the wall clock, like a camera would, and
  lets the server drop what it cannot keep up with (latest frame wins). Without realtime the client
  sends as fast as the server captions: every frame is followed by an `input.marker`, and at most
  `window` markers may be outstanding, so nothing is dropped and the server never idles.
- Shutdown: end of source or Ctrl-C -> `session.close` -> wait (bounded) for the in-flight captions
  and `session.closed`. Writers flush after every segment, so even a second Ctrl-C or a lost
  connection leaves valid files.
- Reconnect: a connection that ends with 1006 (dropped), 1011 (server error), 1012 (the server drained
  it: `session.draining`, then the captions in flight, then the close) or 1013 (capacity) is followed
  by a new session after a jittered exponential backoff, at most `reconnect_tries` in a row. The source
  and its clock outlive the connection: the new session gets the same settings and goes on from the
  next frame (a frame read while draining is sent there first). Caption numbering goes on too: the
  new session's frame 0 is the stream's next frame, so SRT/VTT cues and JSONL frames have no gaps or
  duplicates, and timestamps are the source's. A container stream cannot resume (its header went to
  the old session), so it ends with an error instead.
- Questions (`--ask`, `--ask-every`, `--interactive`) are clients/questions.py: a queue that outlives
  the connection and a third task per connection, the asker, that sends them. Before `session.close`
  the client waits (bounded) for the answers in flight, since closing a session discards its
  questions; questions a dropped connection took with it are asked again on the next session.
- Watches (`--watch`) are clients/watches.py: the rules go in the session.update of every session;
  the receiver hands it the alerts and each segment's scores.
- Only the documented protocol is spoken (docs/protocol.md, server/protocol.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from casa_live.clients import wire
from casa_live.clients.printer import LivePrinter
from casa_live.clients.questions import Questions
from casa_live.clients.sources import Frame, Source, SourceError, encode_jpeg
from casa_live.clients.watches import Watches
from casa_live.clients.writers import CaptionWriter, Segment

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

CLOSE_REASONS = {
    1006: "the connection dropped without a goodbye (server stopped, crashed, or the network failed)",
    1008: "the server refused the credentials: pass the right key with --token or CASA_TOKEN",
    1009: "a message was larger than the server accepts: lower --max-side or --jpeg-quality",
    1011: "the server hit an internal error (its log has the details)",
    1012: "the server is restarting or scaling down (it drained this session)",
    1013: "the server is at capacity (every session slot is busy): try again shortly",
}

# Closes after which a new session can succeed (on another replica, or once a slot frees).
RETRY_CLOSE_CODES = frozenset({1006, 1011, 1012, 1013})
RETRY_HTTP_STATUS = frozenset({502, 503, 504})  # a load balancer with no replica ready


class StreamError(Exception):
    """Ends the stream with a message for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class StreamOptions:
    url: str = "ws://127.0.0.1:8000/v1/stream"
    token: str | None = None
    session: dict[str, Any] = field(default_factory=dict)  # session.update fields set by the user
    realtime: bool = True
    send: Literal["jpeg", "container"] = "jpeg"
    jpeg_quality: int = 85
    max_side: int | None = 640
    container: str | None = None  # container format name for send="container" (None: let the server probe)
    duration: float | None = None  # stop after this many seconds of media
    window: int = 2  # outstanding frames (markers) without realtime
    open_timeout: float = 10.0
    reply_timeout: float = 60.0  # no answer for this long -> give up
    close_timeout: float = 10.0  # wait for in-flight captions after session.close
    reconnect_tries: int = 6  # new sessions in a row after a retryable close; 0 = never reconnect
    backoff_base: float = 0.25  # seconds: the first reconnect waits 0.125-0.25 s, then doubling
    backoff_max: float = 8.0
    questions: list[str] = field(default_factory=list)  # asked right after the session starts
    ask_every: float | None = None  # ...and again every this many seconds of stream time
    interactive: bool = False  # each line typed on stdin is a question
    answer_max_new_tokens: int | None = None  # the longest answer (None: the server's setting)
    watches: list[dict[str, Any]] = field(default_factory=list)  # session.update watches (watch_rules)


@dataclass
class StreamStats:
    sent: int = 0
    unit: str = "frames"
    captioned: int = 0
    dropped: int = 0
    lag_ms: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    reconnects: int = 0  # reconnect tries
    reconnect_seconds: list[float] = field(default_factory=list)  # connection lost -> next session ready
    lost: int = 0  # frames sent on a session that ended before their caption came
    asked: int = 0  # questions sent
    answered: int = 0  # answers completed or incomplete (cut by their token limit)
    alerts: int = 0  # alerts started
    watching: bool = False  # the stream has watches: the summary counts its alerts

    def summary(self) -> str:
        lat = sorted(self.latencies_ms)
        p50 = f"{lat[len(lat) // 2]:.0f} ms" if lat else "n/a"
        text = f"sent {self.sent} {self.unit}, captioned {self.captioned}, dropped {self.dropped}, latency p50 {p50}"
        if self.asked:
            text += f", answered {self.answered} of {self.asked} questions"
        if self.watching:
            text += f", {self.alerts} alert{'' if self.alerts == 1 else 's'}"
        if self.reconnect_seconds:
            text += f", reconnected {len(self.reconnect_seconds)}x ({self.lost} frames lost)"
        return text


def stream_url(server: str) -> str:
    """Accept `host:port`, http(s):// or ws(s):// with or without a path; default to /v1/stream."""
    url = server.strip()
    if "://" not in url:
        url = "ws://" + url
    scheme, _, rest = url.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    if scheme not in ("ws", "wss"):
        raise StreamError(
            f"unsupported server URL scheme {scheme!r}: use ws://, wss://, http:// or https://", EXIT_USAGE
        )
    host, slash, path = rest.partition("/")
    if not slash or not path.strip("/"):
        path = wire.STREAM_PATH.lstrip("/")
    return f"{scheme}://{host}/{path}"


def describe_close(code: int | None, reason: str = "") -> str:
    text = CLOSE_REASONS.get(code or 1006, f"the server closed the connection (code {code})")
    return f"{text}{f' [{reason}]' if reason else ''}"


class _Reconnect(Exception):
    """The connection ended in a way a new session can fix (1006, 1011, 1012, 1013, or a drain)."""


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: `min(cap, base * 2**(attempt-1))`, drawn from its upper half
    (spreads a fleet of clients cut at once without ever retrying instantly)."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


class Streamer:
    def __init__(
        self,
        source: Source,
        options: StreamOptions,
        writers: list[CaptionWriter] | None = None,
        printer: LivePrinter | None = None,
        stdin: TextIO | None = None,
    ) -> None:
        self.source, self.opt = source, options
        self.stdin = stdin  # where --interactive reads questions (default: sys.stdin)
        self.writers = writers or []
        self.printer = printer or LivePrinter()
        self.stats = StreamStats(watching=bool(options.watches))
        self.settings: wire.SessionSettings | None = None  # the effective settings, once updated
        self.interrupted = asyncio.Event()
        self._closed = asyncio.Event()  # session.closed received (this connection)
        self._draining = asyncio.Event()  # session.draining received (this connection)
        self._credits: asyncio.Semaphore | None = None
        self._fatal: StreamError | None = None
        self._retry: str | None = None  # why this connection ended in a way a reconnect can fix
        self._marker_seq = 0
        # across connections: the source, its clock, the frame read but not yet sent, the numbering
        self._frames: Iterator[Frame] | None = None
        self._t0: float | None = None
        self._pending: tuple[Frame, bytes] | None = None
        self._source_done = False
        self._offset = 0  # session frame index -> stream frame index, for this connection
        self._next_frame = 0  # the stream index the next caption gets
        self._conn_sent = self._conn_captioned = self._conn_dropped = 0
        self._dropped_before = 0  # frames the previous sessions dropped
        self._lost_at: float | None = None  # when the last connection ended in a retryable way
        self._fetch: asyncio.Future | None = None  # the next frame being read and encoded
        self.questions = Questions(
            options.questions,
            options.ask_every,
            options.answer_max_new_tokens,
            self.writers,
            self.printer,
            self.stats,
        )
        self.watches = Watches(options.watches, self.writers, self.printer, self.stats)

    # ---- connection -------------------------------------------------------------------------
    async def _connect(self, reconnecting: bool = False):
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

        headers = {"Authorization": f"Bearer {self.opt.token}"} if self.opt.token else None
        try:
            return await connect(
                self.opt.url,
                additional_headers=headers,
                open_timeout=self.opt.open_timeout,
                max_size=2**22,
                ping_interval=20,
                ping_timeout=60,
            )
        except InvalidURI as e:
            raise StreamError(f"bad server URL {self.opt.url!r}: {e}", EXIT_USAGE) from e
        except InvalidStatus as e:
            status = e.response.status_code
            if status in RETRY_HTTP_STATUS:  # a load balancer with no replica ready right now
                raise _Reconnect(f"the server answered HTTP {status} (no replica ready)") from e
            if status == 401:
                msg = "the server refused the credentials: pass the right key with --token or CASA_TOKEN"
            elif status == 403:
                msg = "the server refused the websocket (HTTP 403): it may still be loading its model (see /readyz)"
            elif status == 404:
                msg = f"{self.opt.url} has no streaming endpoint: is this a casa-live server?"
            else:
                msg = f"the server answered HTTP {status} instead of opening the stream"
            raise StreamError(f"cannot open {self.opt.url}: {msg}") from e
        except (OSError, TimeoutError, InvalidHandshake) as e:
            if isinstance(e, ConnectionRefusedError):
                why = "connection refused"
            elif isinstance(e, socket.gaierror):
                why = "unknown host"
            elif isinstance(e, TimeoutError):
                why = f"no answer within {self.opt.open_timeout:.0f} s"
            else:
                why = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
            if reconnecting:  # it served a moment ago: the replica went away, the next try may land elsewhere
                raise _Reconnect(f"cannot reach the server: {why}") from e
            raise StreamError(
                f"cannot reach the server at {self.opt.url}: {why}. Is `casa serve` running there?"
            ) from e

    async def _expect(self, ws, wanted: type):
        """Read events until `wanted` arrives; an error event or a close becomes a StreamError, or a
        _Reconnect where another try can succeed (capacity, a retryable close code)."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), self.opt.reply_timeout)
            except TimeoutError:
                raise StreamError(
                    f"the server did not answer within {self.opt.reply_timeout:.0f} s"
                ) from None
            except ConnectionClosed as e:
                code = _close_code(e)
                if (code or 1006) in RETRY_CLOSE_CODES:
                    raise _Reconnect(describe_close(code, _close_reason(e))) from e
                raise StreamError(
                    f"cannot start the session: {describe_close(code, _close_reason(e))}"
                ) from e
            event = wire.parse_event(raw)
            if isinstance(event, wanted):
                return event
            if isinstance(event, wire.Error):
                if event.code == "capacity":
                    raise _Reconnect(wire.describe_error(event))
                code = EXIT_USAGE if event.code == "invalid_settings" else EXIT_ERROR
                raise StreamError(wire.describe_error(event), code)

    # ---- main -------------------------------------------------------------------------------
    async def run(self) -> int:
        """Sessions until the source ends: a connection that ends in a retryable way (1006, 1011, 1012,
        1013, a drain) is followed by a new one after a jittered backoff, at most `reconnect_tries` in a
        row; the new session gets the same settings and goes on from the next frame."""
        update = self._update_message()  # bad flags fail here, before connecting
        for question in self.opt.questions:  # a question the server would refuse fails here too
            if not self.questions.queue(question):
                raise StreamError(f"invalid question {question!r}", EXIT_USAGE)
        if self.opt.interactive:
            self.questions.start_reader(asyncio.get_running_loop(), self.stdin)
        try:
            code = await self._sessions(update)
            self.questions.stream_ended()
            return code
        finally:
            if self._fetch is not None:
                self._fetch.cancel()
            if self._frames is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(_close_iter, self._frames)

    async def _sessions(self, update: str) -> int:
        tries = connections = 0
        while True:
            captioned_before = self.stats.captioned
            try:
                await self._connection(update, connections)
                return EXIT_INTERRUPTED if self.interrupted.is_set() else EXIT_OK
            except _Reconnect as why:
                reason = str(why)
            connections += 1
            if self.stats.captioned > captioned_before:
                tries = 0  # that session worked: a fresh budget of tries
            if self.interrupted.is_set() or (self._source_done and self._pending is None):
                return EXIT_INTERRUPTED if self.interrupted.is_set() else EXIT_OK
            if self.opt.send == "container":
                raise StreamError(
                    f"{reason}; a container stream cannot resume on a new session (its header was sent "
                    "once): rerun, or stream JPEG frames (--send jpeg), which reconnect"
                )
            tries += 1
            if tries > self.opt.reconnect_tries:
                raise StreamError(
                    f"gave up after {self.opt.reconnect_tries} reconnect tries: {reason}"
                    if self.opt.reconnect_tries
                    else reason
                )
            delay = backoff_delay(tries, self.opt.backoff_base, self.opt.backoff_max)
            self.printer.message(
                f"reconnecting in {delay:.1f} s (try {tries} of {self.opt.reconnect_tries}): {reason}"
            )
            self.stats.reconnects += 1
            if self._lost_at is None:
                self._lost_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.interrupted.wait(), delay)

    async def _connection(self, update: str, connections: int) -> None:
        """One websocket session; raises _Reconnect when it ended in a way a new one can fix."""
        self._closed.clear()
        self._draining.clear()
        self._fatal = self._retry = None
        ws = await self._connect(reconnecting=connections > 0)
        try:
            created = await self._expect(ws, wire.SessionCreated)
            await ws.send(update)
            updated = await self._expect(ws, wire.SessionUpdated)
            self.settings = updated.settings
            fps = float(updated.settings.fps or 2.0)
            self._offset = self._next_frame
            self._dropped_before = self.stats.dropped
            self._conn_sent = self._conn_captioned = self._conn_dropped = 0
            if self._lost_at is not None:
                gap = time.monotonic() - self._lost_at
                self._lost_at = None
                self.stats.reconnect_seconds.append(gap)
                self.printer.message(
                    f"reconnected: session {created.session_id} after {gap:.1f} s; captions go on from frame "
                    f"{self._next_frame}"
                )
            else:
                self.printer.message(
                    f"session {created.session_id} on model {created.model}: {fps:g} fps, "
                    f"{updated.settings.mode or 'live'} mode"
                )
            self._credits = asyncio.Semaphore(max(1, self.opt.window))
            receiver = asyncio.create_task(self._receive(ws))
            sender = asyncio.create_task(self._send(ws, fps))
            asker = asyncio.create_task(self.questions.send(ws, self._draining))
            stopper = asyncio.create_task(self.interrupted.wait())
            await asyncio.wait({sender, receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
            # Stop producing; the receiver keeps going until session.closed or the close timeout.
            stopper.cancel()
            sender.cancel()  # a frame it holds is kept for the next session (_send_frames)
            with contextlib.suppress(asyncio.CancelledError):
                await sender  # expected failures are in self._fatal; anything else is a bug and propagates
            await self.questions.settle(
                receiver, asker, self._draining, self.interrupted, self.opt.close_timeout
            )
            asker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asker
            await self._finish(ws, receiver)
        finally:
            await ws.close()
            self.questions.connection_ended(
                retry=self._retry is not None and self._fatal is None and not self.interrupted.is_set()
            )
            self.watches.connection_ended()
            self.printer.finish()
        if self._fatal is not None:
            raise self._fatal
        if self._retry is not None and not self.interrupted.is_set():
            lost = max(0, self._conn_sent - self._conn_captioned - self._conn_dropped)
            self.stats.lost += lost
            raise _Reconnect(self._retry + (f" ({lost} frame(s) sent there got no caption)" if lost else ""))

    async def _finish(self, ws, receiver: asyncio.Task) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._draining.is_set() and not self._source_done and not self.interrupted.is_set():
            # the server captions what was sent, then closes 1012: wait for it, do not close the session
            timeout = self.opt.reply_timeout
        else:
            if not receiver.done():
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(wire.session_close())
            timeout = (
                min(self.opt.close_timeout, 3.0) if self.interrupted.is_set() else self.opt.close_timeout
            )
        if not receiver.done():
            try:
                await asyncio.wait_for(asyncio.shield(receiver), timeout)
            except TimeoutError:
                self.printer.message(f"warning: no session.closed within {timeout:.0f} s; closing anyway")
                receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver

    # ---- sender -----------------------------------------------------------------------------
    async def _send(self, ws, fps: float) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            if self.opt.send == "container":
                await self._send_container(ws)
            else:
                await self._send_frames(ws, fps)
        except SourceError as e:
            self._fatal = StreamError(str(e), EXIT_USAGE if self.stats.sent == 0 else EXIT_ERROR)
        except StreamError as e:
            self._fatal = e
        except ConnectionClosed:
            pass  # the receiver sees the same close and reports it

    async def _pace(self, t0: float, pts: float) -> None:
        if self.opt.realtime and not self.source.live:
            delay = t0 + pts - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _flow(self, ws) -> None:
        """Without realtime: take a credit before sending (returned when the marker echoes)."""
        if self.opt.realtime:
            return
        try:
            await asyncio.wait_for(self._credits.acquire(), self.opt.reply_timeout)
        except TimeoutError:
            if self._draining.is_set():
                return
            raise StreamError(
                f"the server stopped answering (no caption for {self.opt.reply_timeout:.0f} s)"
            ) from None

    async def _marker(self, ws) -> None:
        if not self.opt.realtime:
            self._marker_seq += 1
            await ws.send(wire.marker(f"m{self._marker_seq}"))

    async def _send_frames(self, ws, fps: float) -> None:
        """Frames from the source, which outlives the connection: a frame read while the session
        drains, or whose send failed, is sent first on the next session."""
        from websockets.exceptions import ConnectionClosed

        if self._frames is None:
            self._frames = self.source.frames(fps)
            self._t0 = time.monotonic()
        frames, quality, max_side = self._frames, self.opt.jpeg_quality, self.opt.max_side

        def next_encoded() -> tuple[Frame, bytes] | None:
            frame = next(frames, None)
            if frame is None:
                return None
            return frame, encode_jpeg(frame.image, quality, max_side)

        while not self.interrupted.is_set() and not self._draining.is_set():
            item, self._pending = self._pending, None
            if item is None:
                if self._fetch is None:  # survives this task's cancellation: the next session awaits it
                    self._fetch = asyncio.ensure_future(asyncio.to_thread(next_encoded))
                item = await asyncio.shield(self._fetch)
                self._fetch = None
            if item is None:
                self._source_done = True
                return
            frame, jpeg = item
            if self.opt.duration is not None and frame.pts > self.opt.duration:
                self._source_done = True
                return
            try:
                await self._pace(self._t0, frame.pts)
                await self._flow(ws)
                if self._draining.is_set():  # the server is stopping: this frame goes to the next session
                    self._pending = item
                    return
                await ws.send(wire.image_frame(frame.pts, jpeg))
            except (ConnectionClosed, asyncio.CancelledError):
                self._pending = item
                raise
            self.stats.sent += 1
            self._conn_sent += 1
            self.questions.ask_again(frame.pts)
            await self._marker(ws)

    async def _send_container(self, ws) -> None:
        chunks = self.source.container_chunks()
        self.stats.unit = "container chunks"
        t0 = time.monotonic()
        while not self.interrupted.is_set():
            chunk = await asyncio.to_thread(next, chunks, None)  # the file is read off the event loop
            if chunk is None:
                self._source_done = True
                return
            if self.opt.duration is not None and chunk.time > self.opt.duration:
                self._source_done = True
                return
            await self._pace(t0, chunk.time)
            await self._flow(ws)
            await ws.send(wire.container_chunk(chunk.data))
            self.stats.sent += 1
            self.questions.ask_again(chunk.time)
            await self._marker(ws)

    # ---- receiver ---------------------------------------------------------------------------
    async def _receive(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

        try:
            async for raw in ws:
                event = wire.parse_event(raw)
                if isinstance(event, wire.CaptionDelta):
                    self.printer.delta(self._offset + event.frame, event.pts, event.text)
                elif isinstance(event, wire.CaptionSegment):
                    self._segment(event)
                elif isinstance(event, wire.Stats):
                    self._stats(event)
                elif isinstance(event, wire.ResponseDone):
                    self.questions.answered(event.response, self._offset)
                elif isinstance(event, wire.AlertStarted):
                    self.watches.started(event, self._offset)
                elif isinstance(event, wire.AlertEnded):
                    self.watches.ended(event, self._offset)
                elif isinstance(event, wire.Marker):
                    if self._credits is not None and not self.opt.realtime:
                        self._credits.release()
                elif isinstance(event, wire.SessionDraining):
                    self._draining.set()
                    if not self._source_done:
                        self.printer.message(
                            "server: draining (it is stopping); finishing the captions in flight, then reconnecting"
                        )
                elif isinstance(event, wire.Error):
                    message = wire.describe_error(event)
                    if not event.fatal and self.questions.in_flight(event.event_id):
                        self.questions.refused(event.event_id, message)  # the server refused this question
                    elif event.fatal and event.code in ("capacity", "internal"):
                        self._retry = message  # the close (1013, 1011) follows: a new session may work
                    elif event.fatal:
                        self._fatal = StreamError(message)
                    else:
                        self.printer.message(f"server: {message}")
                elif isinstance(event, wire.SessionClosed):
                    if event.stats is not None:
                        self._stats(event.stats)
                    if event.reason == "draining":
                        self._retry = "the server drained the session (it is stopping)"
                    self._closed.set()
                    return
        except ConnectionClosedOK as e:
            if _close_code(e) == 1012 and self._retry is None:
                self._retry = describe_close(1012, _close_reason(e))
        except ConnectionClosed as e:
            code = _close_code(e)
            if (code or 1006) in RETRY_CLOSE_CODES:
                self._retry = self._retry or (
                    f"lost the connection to the server: {describe_close(code, _close_reason(e))}"
                )
            elif self._fatal is None:
                self._fatal = StreamError(
                    f"lost the connection to the server: {describe_close(code, _close_reason(e))}"
                )
            return
        if self._retry is not None:
            return
        if not self._closed.is_set() and self._fatal is None and not self.interrupted.is_set():
            self._fatal = StreamError(
                f"the server closed the stream early: {describe_close(_close_code_of(ws), '')}"
            )

    def _segment(self, event: wire.CaptionSegment) -> None:
        frame = self._offset + event.frame  # stream numbering: it goes on across reconnects
        seg = Segment(
            frame, event.start, event.end, event.text, event.ttft_ms, event.latency_ms, event.watch_scores
        )
        self._next_frame = max(self._next_frame, frame + 1)
        self.watches.scored(frame, event.start, event.watch_scores)
        for w in self.writers:
            w.write(seg)
        self.printer.segment(seg)
        self.stats.captioned += 1
        self._conn_captioned += 1
        if seg.latency_ms is not None:
            self.stats.latencies_ms.append(float(seg.latency_ms))

    def _stats(self, event: wire.Stats) -> None:
        self.stats.dropped = self._dropped_before + event.frames_dropped
        self._conn_dropped = event.frames_dropped
        self.stats.lag_ms = event.lag_ms

    def _update_message(self) -> str:
        from pydantic import ValidationError

        session = {**self.opt.session, "mode": "live" if self.opt.realtime else "offline"}
        if self.opt.watches:
            session["watches"] = self.opt.watches
        container = (
            {"container": self.opt.container} if self.opt.send == "container" and self.opt.container else None
        )
        try:
            return wire.session_update(session, container)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise StreamError(f"invalid session settings: {problems}", EXIT_USAGE) from None


def _close_iter(it: Iterator) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _close_code(exc: Exception) -> int | None:
    rcvd = getattr(exc, "rcvd", None)
    return rcvd.code if rcvd is not None else None


def _close_reason(exc: Exception) -> str:
    rcvd = getattr(exc, "rcvd", None)
    return rcvd.reason if rcvd is not None else ""


def _close_code_of(ws) -> int | None:
    return getattr(ws, "close_code", None)


def run_stream(
    source: Source,
    options: StreamOptions,
    writers: list[CaptionWriter],
    printer: LivePrinter,
    stdin: TextIO | None = None,
) -> int:
    """Run one stream to completion with Ctrl-C handling; returns the process exit code. `stdin`:
    where `options.interactive` reads questions (default sys.stdin)."""

    async def main() -> int:
        streamer = Streamer(source, options, writers, printer, stdin)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_sigint() -> None:
            if streamer.interrupted.is_set():
                task.cancel()  # second Ctrl-C: stop now (files are already flushed)
            else:
                printer.message("interrupted: finishing the captions in flight (Ctrl-C again to quit now)")
                streamer.interrupted.set()

        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows event loops
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            loop.add_signal_handler(signal.SIGTERM, on_sigint)
        try:
            code = await streamer.run()
        finally:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
        printer.message(streamer.stats.summary())
        return code

    try:
        return asyncio.run(main())
    except StreamError as e:
        printer.message(f"error: {e}")
        return e.code
    except (asyncio.CancelledError, KeyboardInterrupt):
        printer.message("stopped")
        return EXIT_INTERRUPTED
    finally:
        for w in writers:
            w.close()
        source.close()
