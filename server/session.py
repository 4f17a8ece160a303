"""One client stream: parsing, decoding, feeding the worker, and the events it sends back.

`Session` is transport-free: it parses client events, decodes media (off the event loop), feeds the
inference worker, turns worker tokens into protocol events and keeps the per-session bookkeeping
(stats, markers, lag). server/connection.py runs a Session over a websocket; the upload endpoint
(server/upload.py) drives one without a websocket.

Ordering guarantees:
- frames get session indexes in input order; a frame's deltas come before its segment; segments come
  in frame order (one engine row captions one frame at a time);
- `input.marker` is a flush barrier: the marker is echoed once every frame decoded from input sent
  before it has been captioned or dropped. For container streams the barrier first waits until the
  demuxer has consumed every byte fed before the marker;
- `session.close` flushes the same way, then `session.closed`, then close 1000.

Backpressure: deltas are dropped when the outbound queue is nearly full (a segment repeats the whole
caption); segments, markers and errors are never dropped. In offline mode at most `OFFLINE_CREDITS`
frames are in flight and decoding waits for credits, so nothing is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ValidationError

from model.generate import SessionSettings as EngineSettings
from server import protocol as p
from server.decode import (
    ContainerDecoder,
    FrameLimits,
    PacketDecoder,
    Resampler,
    decode_image,
    sniff_container,
)
from server.errors import (
    BadFrame,
    CasaError,
    FrameTooLarge,
    InvalidSettings,
    RateLimited,
    UnknownType,
    UnsupportedCodec,
    from_validation_error,
    report,
)
from server.worker import FrameJob, FrameOutput, Slot

if TYPE_CHECKING:
    from server.app import ServerContext

log = logging.getLogger("casa.session")

OUT_QUEUE = 1024  # outbound events; deltas are dropped above 3/4 of it
OFFLINE_CREDITS = 4  # frames in flight per offline session
BARRIER_TIMEOUT = 60.0


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
        self.limits = FrameLimits(ctx.engine.image_size, s.max_frame_width, s.max_frame_height)
        self.resampler = Resampler(self.settings.fps or 2.0)
        self.bucket = _Bucket(s.max_input_rate)
        self.out: asyncio.Queue[BaseModel | CloseRequest] = asyncio.Queue(OUT_QUEUE)
        self.slot: Slot | None = None
        self.container: ContainerDecoder | None = None
        self.packets: PacketDecoder | None = None
        self.credits: threading.Semaphore | None = None
        self.closing = threading.Event()
        # frame bookkeeping (event loop only)
        self.next_index = 0
        self.unfinished: dict[int, float] = {}  # frame index -> received (time.monotonic)
        self.credited: set[int] = set()
        self.markers: collections.deque[tuple[int, str]] = collections.deque()
        self.finished = asyncio.Event()  # set whenever a frame finishes
        self.decoder_progress = asyncio.Event()
        self.starved_at = 0  # container bytes consumed when the demuxer last ran dry
        self.awaiting_header = False  # a container stream failed to start: skip chunks until a header
        self.texts: dict[int, list[str]] = {}
        self.received = self.skipped = self.captioned = self.dropped = 0
        self.kv_tokens = 0
        self.lag_peak = 0.0
        self.last_rate_error = 0.0
        self.segments: list[p.CaptionSegment] | None = [] if record else None
        self._stats_key: tuple | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, settings: p.SessionSettings | None = None) -> p.SessionCreated:
        """Claim a model slot (Capacity when full). Optional initial settings (the upload endpoint)."""
        if settings is not None:
            self.settings = self._merge(settings)
        self._apply_mode()
        self.slot = await self.ctx.worker.open(
            self, self.settings.prompt, self._engine_settings(), self.settings.mode == "live"
        )
        self.resampler.fps = self.settings.fps or 2.0
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
        """Release everything now, without awaiting (safe inside a cancelled task): the model slot, the
        decode thread (EOF; it exits on its own); frames still pending count as dropped (closed)."""
        self.closing.set()
        if self.container is not None:
            self.container.reader.end()
            self.container = None
        if self.slot is not None:
            self.ctx.worker.close(self.slot)
            self.slot = None
        if self.unfinished:
            self.ctx.metrics.frames_dropped_total.labels("closed").inc(len(self.unfinished))
            self.unfinished.clear()

    # ---- settings -------------------------------------------------------------------------------

    def _merge(self, patch: p.SessionSettings) -> p.SessionSettings:
        update = patch.model_dump(exclude_unset=True, exclude_none=True)
        merged = self.settings.model_copy(update=update)
        if merged.fps is not None and merged.fps > self.ctx.settings.max_fps:
            raise InvalidSettings(
                f"fps {merged.fps} is above this server's limit of {self.ctx.settings.max_fps}; settings unchanged"
            )
        return merged

    def _engine_settings(self) -> EngineSettings:
        s = self.settings
        return EngineSettings(
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=min(s.min_new_tokens or 0, s.max_new_tokens or 0),
            temperature=s.temperature,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            no_repeat_ngram=s.no_repeat_ngram,
            seed=s.seed or 0,
        )

    def _apply_mode(self) -> None:
        offline = self.settings.mode == "offline"
        if offline and self.credits is None:
            self.credits = threading.Semaphore(OFFLINE_CREDITS)
        elif not offline:
            self.credits = None

    async def update(self, event: p.SessionUpdate) -> None:
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
        try:
            assert self.slot is not None
            await self.ctx.worker.update(self.slot, new.prompt, self._engine_settings(), new.mode == "live")
        except CasaError as exc:
            self.settings = old
            exc.event_id = event.event_id
            raise
        self._apply_mode()
        self.resampler.fps = new.fps or 2.0
        if new_input.codec != self.input.codec:
            self.packets = None  # a new codec starts a new decoder at the next packet
        self.input = new_input
        self.emit(p.SessionUpdated(settings=self.settings, input=self.input, event_id=event.event_id))

    # ---- input ----------------------------------------------------------------------------------

    async def handle_text(self, text: str) -> p.SessionClose | None:
        """Apply one client event; returns the SessionClose event when the client asked to close."""
        if len(text.encode()) > self.ctx.settings.max_message_bytes:
            raise FrameTooLarge(f"text message above {self.ctx.settings.max_message_bytes} bytes")
        try:
            event = p.parse_client_event(text)
        except ValidationError as exc:
            raise from_validation_error(exc, raw=_loads_or_none(text)) from None
        if isinstance(event, p.SessionUpdate):
            await self.update(event)
        elif isinstance(event, p.InputMarker):
            upto = await self.barrier()
            self.markers.append((upto, event.id))
            self._check_markers()
        elif isinstance(event, p.SessionClose):
            return event
        return None

    async def handle_binary(self, data: bytes) -> None:
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
        if msg.kind == p.BinaryKind.IMAGE:
            await self._image(msg.payload, msg.pts or 0.0)
        elif msg.kind == p.BinaryKind.CONTAINER:
            await self._container(msg.payload)
        else:
            await self._packet(msg.payload, msg.pts or 0.0)

    async def _image(self, payload: bytes, pts: float) -> None:
        self.received += 1
        self.ctx.metrics.frames_received_total.inc()
        if not self.resampler.keep(pts):
            self._skip()
            return
        credited = await self._take_credit()
        t0 = time.perf_counter()
        try:
            image = await asyncio.to_thread(decode_image, payload, self.limits)
        except BaseException:
            self._give_credit(credited)
            self.resampler.undo()
            raise
        self._accept(image, pts, time.perf_counter() - t0, credited)

    async def _packet(self, payload: bytes, pts: float) -> None:
        if self.input.codec is None:
            raise BadFrame(
                '0x03 packets need a codec: send session.update {"input": {"codec": "h264"}} first'
            )
        if self.packets is None:
            self.packets = PacketDecoder(self.input.codec, self.limits)
        t0 = time.perf_counter()
        frames, n = await asyncio.to_thread(self.packets.decode, payload, pts, self.resampler.keep)
        dt = time.perf_counter() - t0
        self.received += n
        self.ctx.metrics.frames_received_total.inc(n)
        for _ in range(n - len(frames)):
            self._skip()
        for image, t in frames:
            self._accept(image, t, dt, await self._take_credit())

    async def _container(self, chunk: bytes) -> None:
        if self.container is not None and _starts_stream(chunk):
            # a recorder restart: finish the old stream, start a new one
            old, self.container = self.container, None
            await asyncio.to_thread(old.end, 5.0)
        if self.container is not None and self.container.alive:
            self.container.feed(chunk)
            return
        if self.awaiting_header and sniff_container(chunk) is None:
            return  # the error was reported once: skip chunks until one starts a new stream
        self.container = None
        self.resampler.reset()
        self.starved_at = 0
        self.awaiting_header = True
        self.container = ContainerDecoder(
            chunk, self.limits, self.resampler.keep, LoopSink(self), self.input.container
        )
        self.awaiting_header = False

    async def _take_credit(self) -> bool:
        credits = self.credits
        if credits is None:
            return False
        while True:  # everything below runs on the loop: clear, try, wait cannot miss a release
            self.finished.clear()
            if credits.acquire(blocking=False):
                return True
            await self.finished.wait()

    def _give_credit(self, credited: bool) -> None:
        if credited and self.credits is not None:
            self.credits.release()

    def _skip(self) -> None:
        self.skipped += 1
        self.ctx.metrics.frames_dropped_total.labels("resample").inc()

    def _accept(self, image: np.ndarray, pts: float, decode_seconds: float, credited: bool) -> None:
        """A decoded, sampled frame: give it an index and offer it to the worker (event loop)."""
        self.ctx.metrics.frame_decode_seconds.observe(decode_seconds)
        if self.slot is None or self.closing.is_set():
            self._give_credit(credited)
            return
        index = self.next_index
        self.next_index += 1
        now = time.monotonic()
        self.unfinished[index] = now
        if credited:
            self.credited.add(index)
        live = self.settings.mode == "live"
        deadline = now + 1.0 / (self.settings.fps or 2.0) if live else None
        self.ctx.worker.offer(self.slot, FrameJob(index, pts, image, now, deadline))

    # ---- flush barrier --------------------------------------------------------------------------

    async def barrier(self) -> int:
        """Wait until all input received so far is decoded; return the index the next frame will get."""
        container = self.container
        if container is not None:
            fed = container.reader.fed
            deadline = time.monotonic() + BARRIER_TIMEOUT
            while time.monotonic() < deadline:
                self.decoder_progress.clear()
                if not container.alive or self.starved_at >= fed:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.decoder_progress.wait(), 0.5)
        return self.next_index

    async def end_input(self) -> None:
        """The client sends nothing more: EOF to a running container stream, so that the demuxer and
        decoder release the frames they hold back (MPEG-TS keeps the last PES until the next starts)."""
        if self.container is not None and self.container.alive:
            await asyncio.to_thread(self.container.end, BARRIER_TIMEOUT)

    async def flush(self) -> None:
        """Wait until every frame received so far is captioned or dropped."""
        upto = await self.barrier()
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while time.monotonic() < deadline:
            self.finished.clear()
            if not any(i < upto for i in self.unfinished):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.finished.wait(), 1.0)

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
                )
                self.captioned += 1
                self.ctx.metrics.frames_captioned_total.inc()
                if self.segments is not None:
                    self.segments.append(segment)
                self.emit(segment)
                self._finish(job.index)

    def worker_dropped(self, job: FrameJob, reason: str) -> None:
        self.dropped += 1
        self.ctx.metrics.frames_dropped_total.labels(reason).inc()
        self._finish(job.index)

    def worker_failed(self, job: FrameJob | None, error: CasaError) -> None:
        if job is not None:
            self.texts.pop(job.index, None)
            self._finish(job.index)
        code = self.send_error(error)
        if code is not None:  # the slot is gone: end the connection (the receive loop sees the close)
            self.slot = None
            self.finish("error", code)

    # ---- container decode thread callbacks (hopped onto the loop by LoopSink) ----------------------

    def container_frame(self, image: np.ndarray, pts: float, decode_seconds: float, credited: bool) -> None:
        self._accept(image, pts, decode_seconds, credited)

    def container_progress(self, frames: int, skipped: int, starved_at: int | None) -> None:
        self.received += frames
        self.ctx.metrics.frames_received_total.inc(frames)
        for _ in range(skipped):
            self._skip()
        if starved_at is not None:
            self.starved_at = starved_at
        self.decoder_progress.set()

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
        return p.Stats(
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
        """Queue the last events: stats, session.closed, then the close itself."""
        self.emit(p.SessionClosed(reason=reason, stats=self.stats()))
        self.emit(CloseRequest(code))


class LoopSink:
    """ContainerDecoder callbacks: run on the decode thread, hop onto the event loop."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self._skipped = 0

    def _call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(RuntimeError):  # loop closed: the server is shutting down
            self.s.loop.call_soon_threadsafe(fn, *args)

    def on_frame(self, image: np.ndarray, pts: float, decode_seconds: float) -> None:
        credited = False
        credits = self.s.credits
        if credits is not None:  # offline: wait for a free credit (backpressure on the demuxer)
            while not self.s.closing.is_set():
                if credits.acquire(timeout=0.2):
                    credited = True
                    break
        skipped, self._skipped = self._skipped, 0
        self._call(self.s.container_progress, 1 + skipped, skipped, None)
        self._call(self.s.container_frame, image, pts, decode_seconds, credited)

    def on_skipped(self) -> None:
        self._skipped += 1

    def on_error(self, exc: BaseException) -> None:
        self._call(self.s.send_error, exc)

    def on_starved(self, consumed: int) -> None:
        skipped, self._skipped = self._skipped, 0
        self._call(self.s.container_progress, skipped, skipped, consumed)

    def on_end(self) -> None:
        skipped, self._skipped = self._skipped, 0
        self._call(self.s.container_progress, skipped, skipped, None)


def _starts_stream(chunk: bytes) -> bool:
    """A chunk that begins a new stream (MPEG-TS chunks all look alike, so TS never restarts)."""
    return sniff_container(chunk) in ("matroska", "mp4", "ivf")


def _loads_or_none(text: str) -> object:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return None
