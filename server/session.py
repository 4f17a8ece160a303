"""One client stream: its events, settings, markers and output.

`Session` is transport-free and lives on the event loop: it parses client events, checks sizes and
rates, hands media to its `Ingest` (server/ingest/: one thread per session owns the decoders, the
resampler and the byte and credit budgets), offers the frames the ingest returns to the inference
worker, turns worker tokens into protocol events and keeps the per-session bookkeeping (stats,
markers, lag). server/connection.py runs a Session over a websocket; the upload endpoint
(server/upload.py) drives one without a websocket.

Ordering guarantees:
- frames get session indexes in input order; a frame's deltas come before its segment; segments come
  in frame order (one engine row captions one frame at a time);
- `input.marker` is a flush barrier: the marker is echoed once every frame decoded from input sent
  before it has been captioned or dropped. For container streams the barrier first waits until the
  demuxer has consumed every byte fed before the marker;
- `session.close` flushes the same way, then `session.closed`, then close 1000.
- a drain (server/drain.py, on SIGTERM) sends `session.draining`, captions what was sent before the
  client could stop, then `session.closed` (reason `draining`) and close 1012.

Backpressure: deltas are dropped when the outbound queue is nearly full (a segment repeats the whole
caption); segments, markers and errors are never dropped. The ingest's input is bounded
(`max_buffered_bytes`): past it the receive loop waits. In offline mode at most `OFFLINE_CREDITS`
frames are in flight and decoding waits for credits, so nothing is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ValidationError

from casa_live.model.engine.settings import SETTING_NAMES
from casa_live.model.engine.settings import SessionSettings as EngineSettings
from casa_live.server import protocol as p
from casa_live.server.errors import (
    BadFrame,
    BadJSON,
    Capacity,
    CasaError,
    FrameTooLarge,
    InvalidRequest,
    InvalidSettings,
    RateLimited,
    UnknownType,
    UnsupportedCodec,
    clip,
    from_validation_error,
    report,
)
from casa_live.server.ingest import FrameLimits, Ingest
from casa_live.server.watches import SessionWatches
from casa_live.server.worker import AskJob, FrameJob, FrameOutput, ResponseOutput, Slot

if TYPE_CHECKING:
    from casa_live.server.context import ServerContext

log = logging.getLogger("casa.session")

OUT_QUEUE = 1024  # outbound events; deltas are dropped above 3/4 of it
BARRIER_TIMEOUT = 60.0
# A drained session closes once nothing new has arrived for this long after its frames were captioned:
# frames the client sent before it read `session.draining` are still on the wire, and are captioned too.
DRAIN_SETTLE = 0.3
RATE_WINDOW = 10.0  # seconds: stats.caption_rate counts the captions finished in this window


@dataclass
class CloseRequest:
    code: int


class _Bucket:
    """Token bucket: `rate` messages per second, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Session:
    def __init__(self, ctx: ServerContext, *, record: bool = False) -> None:
        self.ctx = ctx
        self.id = "sess_" + uuid.uuid4().hex[:16]
        self.loop = asyncio.get_running_loop()
        s = ctx.settings
        self.settings = ctx.default_settings()
        self.input = p.InputSettings()
        self.limits = FrameLimits.for_processor(
            ctx.engine.processor, ctx.engine.image_size, s.max_frame_width, s.max_frame_height
        )
        self.bucket = _Bucket(s.max_input_rate)
        self.out: asyncio.Queue[BaseModel | CloseRequest] = asyncio.Queue(OUT_QUEUE)
        self.slot: Slot | None = None
        self.ingest: Ingest | None = None  # started with the session (start)
        self.closing = False
        self.drained = False  # closed by a drain (server/drain.py): 1012, the client reconnects elsewhere
        self.messages_in = 0  # binary messages received (a drain waits until they stop coming)
        # frame bookkeeping (event loop only)
        self.next_index = 0
        self.unfinished: dict[int, float] = {}  # frame index -> received (time.monotonic)
        self.credited: set[int] = set()
        self.markers: collections.deque[tuple[int, str]] = collections.deque()
        self.finished = asyncio.Event()  # set whenever a frame finishes
        self.texts: dict[int, list[str]] = {}
        self.received = self.skipped = self.captioned = self.dropped = 0
        self.drop_reasons: collections.Counter[str] = collections.Counter()
        self.caption_times: collections.deque[float] = collections.deque()  # last RATE_WINDOW s
        self.kv_tokens = 0
        self.lag_peak = 0.0
        self.last_rate_error = 0.0
        self.segments: list[p.CaptionSegment] | None = [] if record else None
        self._stats_key: tuple | None = None
        self.responses: dict[str, _Response] = {}  # questions in flight, by response id
        self.answers: list[p.ResponseResult] | None = [] if record else None
        self.watches = SessionWatches(self.id, ctx.alerts, self.emit, record)
        # with watches, a frame's segment goes out with its scores. A CASA row's frame is often
        # scored before its caption closes (frame index -> scores, until the segment); token
        # insertion scores it after, so the segment waits for them (frame index -> the segment)
        self.early_scores: dict[int, dict[str, float]] = {}
        self.pending: dict[int, p.CaptionSegment] = {}

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, settings: p.SessionSettings | None = None) -> p.SessionCreated:
        """Claim a model slot (Capacity when full). Optional initial settings (the upload endpoint)."""
        if not self.ctx.admits():
            raise Capacity(
                "the server is overloaded (past capacity, it is captioning fewer frames of its open "
                "streams); retry later or connect to another replica"
            )
        if settings is not None:
            self.settings = self._merge(settings)
        self.slot = await self.ctx.worker.open(
            self, self.settings.prompt, self._engine_settings(), self.settings.mode == "live"
        )
        if self.settings.watches:
            try:
                await self._set_watches(self.settings.watches)
            except CasaError:
                self.ctx.worker.close(self.slot)  # refused: the slot it claimed goes back
                self.slot = None
                raise
            self.watches.replace(self.settings.watches)
        self.watches.metadata = dict(self.settings.metadata or {})
        self.ingest = Ingest(
            self,
            self.loop,
            self.limits,
            max_buffered_bytes=max(self.ctx.settings.max_buffered_bytes, self.ctx.settings.max_message_bytes),
            fps=self.settings.fps or 2.0,
            offline=self.settings.mode == "offline",
            codec=self.input.codec,
            container=self.input.container,
            name=f"casa-ingest-{self.id[5:13]}",
        )
        created = p.SessionCreated(
            session_id=self.id,
            model=self.ctx.model_name,
            image_size=self.ctx.engine.image_size,
            limits=self.ctx.settings.limits(),
            settings=self.settings,
            input=self.input,
        )
        self.emit(created)
        return created

    def close(self) -> None:
        """Release everything now, without awaiting (safe inside a cancelled task): the ingest thread
        (it stops on its own), the model slot; frames still pending count as dropped (closed)."""
        self.closing = True
        self.watches.close()  # a client gone without session.close: its sinks still see the ends
        if self.ingest is not None:
            self.ingest.close()
        if self.slot is not None:
            self.ctx.worker.close(self.slot)
            self.slot = None
        if self.unfinished:
            self.ctx.metrics.frames_dropped_total.labels("closed").inc(len(self.unfinished))
            self.unfinished.clear()

    # ---- settings -------------------------------------------------------------------------------

    def _merge(self, patch: p.SessionSettings) -> p.SessionSettings:
        # the fields set, as the models they are (a dump would turn watches into dicts)
        update = {k: v for k in patch.model_fields_set if (v := getattr(patch, k)) is not None}
        merged = self.settings.model_copy(update=update)
        if merged.fps is not None and merged.fps > self.ctx.settings.max_fps:
            raise InvalidSettings(
                f"fps {merged.fps} is above this server's limit of {self.ctx.settings.max_fps}; settings unchanged"
            )
        return merged

    def _engine_settings(self) -> EngineSettings:
        s = self.settings
        settings = EngineSettings(**{name: getattr(s, name) for name in SETTING_NAMES})
        if s.min_new_tokens is not None:  # at most the caption's length
            settings.min_new_tokens = min(s.min_new_tokens, s.max_new_tokens or 0)
        try:
            return settings.validate()  # the protocol's bounds already hold; this is the engine's own check
        except ValueError as exc:
            raise InvalidSettings(f"settings unchanged: {exc}") from None

    async def update(self, event: p.SessionUpdate) -> None:
        try:
            await self._update(event)
        except CasaError as exc:  # every error an update causes echoes its event_id
            exc.event_id = event.event_id
            raise

    async def _update(self, event: p.SessionUpdate) -> None:
        new = self._merge(event.session) if event.session is not None else self.settings
        new_input = self.input
        if event.input is not None:
            patch = event.input.model_dump(exclude_unset=True, exclude_none=True)
            new_input = self.input.model_copy(update=patch)
            if new_input.codec is not None and new_input.codec not in p.PACKET_CODECS:
                raise UnsupportedCodec(
                    f"codec {new_input.codec!r} is not supported for 0x03 packets; use one of {p.PACKET_CODECS}",
                    event_id=event.event_id,
                )
            if new_input.container is not None and new_input.container not in p.CONTAINER_FORMATS:
                raise UnsupportedCodec(
                    f"container {new_input.container!r} is not supported; use one of {p.CONTAINER_FORMATS}",
                    event_id=event.event_id,
                )
        old = self.settings
        self.settings = new
        new_watches = event.session.watches if event.session is not None else None
        try:
            engine_settings = self._engine_settings()
            assert self.slot is not None
            if new_watches is not None:  # first: the one part the model may refuse (too long)
                await self._set_watches(new_watches)
            try:
                await self.ctx.worker.update(self.slot, new.prompt, engine_settings, new.mode == "live")
            except CasaError:
                if new_watches is not None:  # nothing changed: the model scores the old list again
                    await self._set_watches(old.watches or [])
                raise
        except CasaError:
            self.settings = old
            raise
        if new_watches is not None:
            self.watches.replace(new_watches)
            if not new_watches:  # no more scores are coming
                self._release_pending()
        self.watches.metadata = dict(new.metadata or {})
        self.input = new_input
        assert self.ingest is not None
        await self.ingest.configure(
            fps=new.fps or 2.0,
            offline=new.mode == "offline",
            codec=new_input.codec,
            container=new_input.container,
        )
        self.emit(p.SessionUpdated(settings=self.settings, input=self.input, event_id=event.event_id))

    async def _set_watches(self, watches: list[p.Watch]) -> None:
        """The model scores these from now on (InvalidSettings when it cannot)."""
        if watches and self.ctx.engine.gen.template.question is None:
            raise InvalidSettings(
                "this model scores no watches (its checkpoint has no question template: no "
                "template.question in generation_config.json, docs/checkpoints.md); settings unchanged"
            )
        assert self.slot is not None
        await self.ctx.worker.set_watches(self.slot, [(w.id, w.question) for w in watches])

    # ---- input ----------------------------------------------------------------------------------

    async def handle_text(self, text: str) -> p.SessionClose | None:
        """Apply one client event; returns the SessionClose event when the client asked to close."""
        if len(text.encode("utf-8", "surrogatepass")) > self.ctx.settings.max_message_bytes:
            raise FrameTooLarge(f"text message above {self.ctx.settings.max_message_bytes} bytes")
        event = _parse(text)
        if isinstance(event, p.SessionUpdate):
            await self.update(event)
        elif isinstance(event, p.InputMarker):
            upto = await self.barrier()
            self.markers.append((upto, event.id))
            self._check_markers()
        elif isinstance(event, p.SessionClose):
            return event
        elif isinstance(event, p.ResponseCreate):
            self.ask(event)
        elif isinstance(event, p.ResponseCancel):
            if event.response_id not in self.responses:
                raise InvalidRequest(
                    f"no response {clip(event.response_id)!r} is in flight (it ended, or was never created)",
                    event_id=event.event_id,
                )
            assert self.slot is not None
            self.ctx.worker.cancel(self.slot, event.response_id)
        return None

    # ---- questions ------------------------------------------------------------------------------

    def ask(self, event: p.ResponseCreate) -> str:
        """Queue a question about the current frame; returns its response id."""
        req = event.response
        if self.ctx.engine.gen.template.question is None:
            raise InvalidRequest(
                "this model answers no questions (its checkpoint has no question template: no "
                "template.question in generation_config.json, docs/checkpoints.md); serve one that has",
                event_id=event.event_id,
            )
        rid = req.id or "resp_" + uuid.uuid4().hex[:20]
        if rid in self.responses:
            raise InvalidRequest(
                f"response {clip(rid)!r} is already in flight; give each question its own id",
                event_id=event.event_id,
            )
        if len(self.responses) >= p.MAX_RESPONSES_IN_FLIGHT:
            raise RateLimited(
                f"{p.MAX_RESPONSES_IN_FLIGHT} questions are already in flight in this session; "
                "wait for a response.done",
                event_id=event.event_id,
            )
        if self.slot is None or self.closing:
            raise InvalidRequest(
                "the session is closing; questions are no longer taken", event_id=event.event_id
            )
        now = time.monotonic()
        self.responses[rid] = _Response(now)
        self.ctx.worker.ask(self.slot, AskJob(rid, req.question, req.max_new_tokens, now))
        return rid

    def worker_responses(self, outputs: list[ResponseOutput]) -> None:
        m = self.ctx.metrics
        for out in outputs:
            r = self.responses.get(out.id)
            if r is None:
                continue
            if out.started is not None:
                r.frame, r.pts = out.started.index, out.started.pts
                self.emit(p.ResponseCreated(response=p.ResponseStarted(id=out.id, frame=r.frame)))
            if out.token and r.first_at is None:
                r.first_at = out.at
                m.response_ttft_seconds.observe(out.at - r.received)
            if out.delta:
                r.text.append(out.delta)
                self.emit(p.ResponseOutputTextDelta(response_id=out.id, delta=out.delta))
            if out.status is not None:
                del self.responses[out.id]
                if out.error is not None:
                    self.send_error(out.error)
                m.responses_total.labels(out.status).inc()
                if out.status in ("completed", "incomplete"):
                    m.response_latency_seconds.observe(out.at - r.received)
                result = p.ResponseResult(
                    id=out.id,
                    frame=r.frame,
                    pts=r.pts,
                    text="".join(r.text).strip(),
                    status=out.status,
                    ttft_ms=None if r.first_at is None else round((r.first_at - r.received) * 1000, 3),
                    latency_ms=round((out.at - r.received) * 1000, 3),
                )
                if self.answers is not None:
                    self.answers.append(result)
                self.emit(p.ResponseDone(response=result))

    async def handle_binary(self, data: bytes) -> None:
        self.messages_in += 1
        limit = self.ctx.settings.max_message_bytes
        if len(data) > limit:
            raise FrameTooLarge(
                f"binary message is {len(data)} bytes; the limit is {limit}: send smaller frames/chunks"
            )
        if not self.bucket.take():
            self.ctx.metrics.frames_dropped_total.labels("rate_limited").inc()
            now = time.monotonic()
            if now - self.last_rate_error >= 1.0:
                self.last_rate_error = now
                raise RateLimited(
                    f"more than {self.ctx.settings.max_input_rate:g} binary messages per second: messages are being "
                    "discarded; send fewer frames (the server captions at the session fps anyway)"
                )
            return
        try:
            msg = p.unpack(data)
        except p.BinaryMessageError as exc:
            raise (UnknownType if exc.unknown_kind else BadFrame)(str(exc)) from None
        ingest = self.ingest
        assert ingest is not None
        if msg.kind == p.BinaryKind.IMAGE:
            await ingest.image(msg.payload, msg.pts_us or 0)
        elif msg.kind == p.BinaryKind.CONTAINER:
            await ingest.chunk(msg.payload)
        else:
            await ingest.packet(msg.payload, msg.pts_us or 0)

    def _accept(self, image: np.ndarray, pts: float, decode_seconds: float, credited: bool) -> None:
        """A decoded, sampled frame: give it an index and offer it to the worker (event loop)."""
        self.ctx.metrics.frame_decode_seconds.observe(decode_seconds)
        if self.slot is None or self.closing:
            self._give_credit(credited)
            return
        index = self.next_index
        self.next_index += 1
        now = time.monotonic()
        self.unfinished[index] = now
        if credited:
            self.credited.add(index)
        live = self.settings.mode == "live"
        budget = 1.0 / (self.settings.fps or 2.0) if live else None
        self.ctx.worker.offer(self.slot, FrameJob(index, pts, image, now, budget))

    def _give_credit(self, credited: bool) -> None:
        if credited and self.ingest is not None:
            self.ingest.release_credit()

    # ---- ingest callbacks (event loop) ------------------------------------------------------------

    def ingest_frame(self, image: np.ndarray, pts: float, decode_seconds: float, credited: bool) -> None:
        self._accept(image, pts, decode_seconds, credited)

    def ingest_counts(self, received: int, skipped: int) -> None:
        if received:
            self.received += received
            self.ctx.metrics.frames_received_total.inc(received)
        if skipped:
            self.skipped += skipped
            self.ctx.metrics.frames_dropped_total.labels("resample").inc(skipped)

    def ingest_error(self, exc: CasaError) -> None:
        self.send_error(exc)

    # ---- flush barrier --------------------------------------------------------------------------

    async def barrier(self) -> int:
        """Wait until all input received so far is decoded; return the index the next frame will get."""
        if self.ingest is not None:
            await self.ingest.barrier()
        return self.next_index

    async def end_input(self) -> None:
        """The client sends nothing more: EOF to a running container stream, so that the demuxer and
        decoder release the frames they hold back (MPEG-TS keeps the last PES until the next starts)."""
        if self.ingest is not None:
            await self.ingest.end()

    async def flush(self, deadline: float | None = None) -> None:
        """Wait until every frame received so far is captioned or dropped (or `deadline`, monotonic)."""
        deadline = time.monotonic() + BARRIER_TIMEOUT if deadline is None else deadline
        try:
            upto = await asyncio.wait_for(self.barrier(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return
        while time.monotonic() < deadline:
            self.finished.clear()
            if not any(i < upto for i in self.unfinished):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.finished.wait(), 1.0)
        # then the answers that can end: started ones, and waiting ones once a frame is captioned
        # (they start at the row's next frame boundary); a question with no frame to see never can
        while self.responses and self.captioned and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def drain(self, deadline: float, reason: str = "shutdown") -> None:
        """Graceful end on a server drain: `session.draining`, caption the frames in flight (those sent
        before the client could stop), then `session.closed` and close 1012, all by `deadline`."""
        if self.closing or self.drained:
            return
        self.emit(
            p.SessionDraining(deadline_seconds=round(max(0.0, deadline - time.monotonic()), 3), reason=reason)
        )
        while time.monotonic() < deadline:
            seen = self.messages_in
            await self.flush(deadline)
            await asyncio.sleep(max(0.0, min(DRAIN_SETTLE, deadline - time.monotonic())))
            if self.messages_in == seen and not self.unfinished:
                break
        if self.closing:  # the client closed first (session.close or gone)
            return
        self.drained = True
        self.finish("draining", p.CloseCode.SERVICE_RESTART)

    def _finish(self, index: int) -> None:
        received = self.unfinished.pop(index, None)
        if received is not None:
            self.lag_peak = max(self.lag_peak, time.monotonic() - received)
        if index in self.credited:
            self.credited.discard(index)
            self._give_credit(True)
        self.finished.set()
        self._check_markers()

    def _check_markers(self) -> None:
        oldest = min(self.unfinished, default=self.next_index)
        while self.markers and self.markers[0][0] <= oldest:
            _, marker_id = self.markers.popleft()
            self.emit(p.Marker(id=marker_id))

    # ---- worker callbacks (event loop) ----------------------------------------------------------

    def worker_output(self, outputs: list[FrameOutput], kv_tokens: int) -> None:
        self.kv_tokens = kv_tokens
        for out in outputs:
            job = out.job
            # a later frame's output: an earlier frame still waiting for scores will get none
            self._release_pending(before=job.index)
            if out.text:
                self.texts.setdefault(job.index, []).append(out.text)
                self.emit(p.CaptionDelta(frame=job.index, pts=job.pts, text=out.text))
            if out.done:
                text = "".join(self.texts.pop(job.index, []))
                fps = self.settings.fps or 2.0
                segment = p.CaptionSegment(
                    frame=job.index,
                    start=job.pts,
                    end=job.pts + 1.0 / fps,
                    text=text.strip(),
                    tokens=out.tokens,
                    reason=out.reason or "stop",
                    ttft_ms=round(((out.first_token_at or out.at) - job.received) * 1000, 3),
                    latency_ms=round((out.at - job.received) * 1000, 3),
                    restated=out.restated or None,
                )
                scores = self.early_scores.pop(job.index, None)
                if scores is not None:
                    self._scored(job, segment, scores)
                elif self.watches:
                    self.pending[job.index] = segment
                else:
                    self._complete(segment)

    def worker_scores(self, job: FrameJob, scores: dict[str, float]) -> None:
        """A frame's watch scores: kept until its caption closes (they came first: CASA), or at
        once alerts and the waiting segment carrying them (token insertion)."""
        segment = self.pending.pop(job.index, None)
        if segment is None and job.index in self.unfinished:
            self.early_scores[job.index] = scores
            return
        self._scored(job, segment, scores)

    def _scored(self, job: FrameJob, segment: p.CaptionSegment | None, scores: dict[str, float]) -> None:
        """Alerts from a frame's scores (the webhook carries its caption), then its segment."""
        self.watches.observe(job.index, job.pts, scores, segment.text if segment is not None else None)
        if segment is not None:
            segment.watch_scores = scores
            self._complete(segment)

    def _complete(self, segment: p.CaptionSegment) -> None:
        self.captioned += 1
        self.caption_times.append(time.monotonic())
        self.ctx.metrics.frames_captioned_total.inc()
        if self.segments is not None:
            self.segments.append(segment)
        self.emit(segment)
        self._finish(segment.frame)

    def _release_pending(self, before: int | None = None) -> None:
        """Send the segments waiting for scores that will not come (all, or those before a frame),
        and forget the scores of earlier frames whose captions will not come."""
        for index in [i for i in self.early_scores if before is None or i < before]:
            del self.early_scores[index]
        for index in sorted(self.pending):
            if before is None or index < before:
                self._complete(self.pending.pop(index))

    def worker_dropped(self, job: FrameJob, reason: str) -> None:
        self.dropped += 1
        self.drop_reasons[reason] += 1
        self.ctx.metrics.frames_dropped_total.labels(reason).inc()
        self._finish(job.index)

    def worker_failed(self, job: FrameJob | None, error: CasaError) -> None:
        self._release_pending()  # a failure resets the row: its scores are lost
        if job is not None:
            self.early_scores.pop(job.index, None)
            self.texts.pop(job.index, None)
            self._finish(job.index)
        code = self.send_error(error)
        if code is not None:  # the slot is gone: end the connection (the receive loop sees the close)
            self.slot = None
            self.finish("error", code)

    # ---- output ---------------------------------------------------------------------------------

    def emit(self, event: BaseModel | CloseRequest) -> None:
        if isinstance(event, p.CaptionDelta) and self.out.qsize() > OUT_QUEUE * 3 // 4:
            return  # the client reads too slowly: its segment will carry the whole text
        try:
            self.out.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("session %s: outbound queue full, client not reading; event dropped", self.id)

    def send_error(self, exc: BaseException) -> int | None:
        event, close_code = report(exc, self.ctx.metrics, session_id=self.id)
        self.emit(event)
        return close_code

    def current_lag(self, now: float | None = None) -> float:
        if not self.unfinished:
            return 0.0
        return (now or time.monotonic()) - min(self.unfinished.values())

    def stats(self) -> p.Stats:
        lag = max(self.lag_peak, self.current_lag())
        self.lag_peak = 0.0
        now = time.monotonic()
        while self.caption_times and now - self.caption_times[0] > RATE_WINDOW:
            self.caption_times.popleft()
        return p.Stats(
            frames_dropped_reasons=dict(self.drop_reasons) or None,
            caption_rate=round(len(self.caption_times) / RATE_WINDOW, 3),
            frames_received=self.received,
            frames_skipped=self.skipped,
            frames_captioned=self.captioned,
            frames_dropped=self.dropped,
            lag_ms=round(lag * 1000, 3),
            kv_tokens=self.kv_tokens,
        )

    def emit_stats_if_changed(self) -> None:
        key = (self.received, self.captioned, self.dropped, self.kv_tokens, bool(self.unfinished))
        if key != self._stats_key:
            self._stats_key = key
            self.emit(self.stats())

    def finish(self, reason: str, code: int) -> None:
        """Queue the last events: a `cancelled` response.done for each question still in flight,
        stats, session.closed, then the close itself."""
        now = time.monotonic()
        for rid in list(self.responses):
            self.worker_responses([ResponseOutput(rid, now, status="cancelled")])
        self._release_pending()
        self.watches.close()
        self.emit(p.SessionClosed(reason=reason, stats=self.stats()))
        self.emit(CloseRequest(code))


@dataclass
class _Response:
    """A question in flight, as the session tracks it (event loop only)."""

    received: float  # time.monotonic()
    frame: int | None = None
    pts: float | None = None
    first_at: float | None = None
    text: list[str] = field(default_factory=list)


def _parse(
    text: str,
) -> p.SessionUpdate | p.InputMarker | p.SessionClose | p.ResponseCreate | p.ResponseCancel:
    """A client event, or a typed error: any failure to parse a client message is the client's
    (bad_json, unknown_type, invalid_settings), never an internal error, whatever the input."""
    try:
        return p.parse_client_event(text)
    except ValidationError as exc:
        raise from_validation_error(exc, raw=_loads_or_none(text)) from None
    except Exception:  # e.g. RecursionError or MemoryError on pathological input
        raise BadJSON(
            "text messages must be JSON objects with a 'type' (this one could not be parsed)"
        ) from None


def _loads_or_none(text: str) -> object:
    """The raw JSON, only to echo its event_id; None when the stdlib cannot read it either (deep
    nesting raises RecursionError, which is not a ValueError)."""
    try:
        return json.loads(text)
    except Exception:
        return None
