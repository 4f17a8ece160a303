"""`Ingest`: one session's input path, from client bytes to model-sized frames, on one thread.

The event loop only checks sizes and rates, splits binary messages and hands them over (`image`,
`packet`, `chunk`, `file`), together with settings changes (`configure`) and flush points (`barrier`,
`end`). Everything else happens on the session's ingest thread, one item at a time, in the order the
client sent them: it owns the decoders (image, packet, container demuxer), the fps resampler, the
offline credits and the byte budget, so no state is shared between threads beyond two queues.

- In: a FIFO bounded by `max_buffered_bytes` and `INPUT_MESSAGES`; when it is full, the loop awaits,
  the socket's receive buffer fills and the client's sends slow down.
- Out: one bounded queue (`OUTBOX` items) of frames, counts, errors and acknowledgements, drained on
  the event loop into the session (`IngestListener`). An acknowledgement follows everything the
  thread produced before it, so `await barrier()` means "all input sent before is decoded and its
  frames handed to the session".
- A container stream's demuxer runs on the same thread: when it needs bytes it pulls the next input,
  handling images, packets, settings and barriers met on the way (container.py).
- Offline mode: at most `OFFLINE_CREDITS` frames in flight; the thread waits for a credit before it
  hands over a frame (backpressure). The session gives a credit back when the frame is captioned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from casa_live.model.engine.threads import name_this_thread
from casa_live.server.errors import BadFrame, CasaError, FrameFailed, InternalError
from casa_live.server.ingest.container import ContainerStream, decode_file, sniff_container, starts_stream
from casa_live.server.ingest.frames import FrameLimits, Resampler
from casa_live.server.ingest.image import decode_image
from casa_live.server.ingest.packet import PacketDecoder

log = logging.getLogger("casa.ingest")

OFFLINE_CREDITS = 4  # frames in flight per offline session
INPUT_MESSAGES = 16  # messages queued for the ingest thread, at most
OUTBOX = 64  # items queued for the event loop, at most
ACK_TIMEOUT = 60.0


class IngestListener(Protocol):
    """The session, as the ingest sees it. Every method runs on the event loop."""

    def ingest_frame(self, image: np.ndarray, pts: float, decode_seconds: float, credited: bool) -> None: ...
    def ingest_counts(self, received: int, skipped: int) -> None: ...
    def ingest_error(self, exc: CasaError) -> None: ...


@dataclass
class _Item:
    kind: str  # image | packet | chunk | file | configure | barrier | end | stop
    data: Any = None
    pts_us: int = 0
    ack: asyncio.Future | None = None
    size: int = 0  # bytes counted against the input budget


_STOP = _Item("stop")


class _Stopped(Exception):
    """Raised on the ingest thread when the session closed mid-decode: unwinds the decoder."""


class Ingest:
    def __init__(
        self,
        listener: IngestListener,
        loop: asyncio.AbstractEventLoop,
        limits: FrameLimits,
        *,
        max_buffered_bytes: int,
        fps: float,
        offline: bool,
        codec: str | None = None,
        container: str | None = None,
        name: str = "casa-ingest",
    ) -> None:
        self.listener, self.loop, self.limits = listener, loop, limits
        self.max_buffered_bytes = max_buffered_bytes
        # loop side
        self._queued_bytes = 0
        self._queued = 0
        self._room = asyncio.Event()
        self._closed = False
        # shared: the two queues and the credit counter, each behind its own lock
        self._in: collections.deque[_Item] = collections.deque()
        self._in_cv = threading.Condition()
        self._out: collections.deque[tuple] = collections.deque()
        self._out_cv = threading.Condition()
        self._credits = OFFLINE_CREDITS
        self._credit_cv = threading.Condition()
        self._stopping = threading.Event()
        # ingest thread only
        self._resampler = Resampler(fps)
        self._offline = offline
        self._codec, self._container_fmt = codec, container
        self._packets: PacketDecoder | None = None
        self._stream: ContainerStream | None = None
        self._skip_until_header = False  # a container stream failed to start: skip chunks until a header
        self._pending: collections.deque[_Item] = collections.deque()  # pulled back by a stream restart
        self._end_acks: list[asyncio.Future] = []
        self._received = self._skipped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- event-loop side ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def image(self, payload: bytes, pts_us: int) -> None:
        await self._put(_Item("image", payload, pts_us, size=len(payload)))

    async def packet(self, payload: bytes, pts_us: int) -> None:
        await self._put(_Item("packet", payload, pts_us, size=len(payload)))

    async def chunk(self, payload: bytes) -> None:
        await self._put(_Item("chunk", payload, size=len(payload)))

    async def configure(self, *, fps: float, offline: bool, codec: str | None, container: str | None) -> None:
        """New settings, applied in order with the input (what was sent before uses the old ones)."""
        await self._ask(_Item("configure", (fps, offline, codec, container)))

    async def barrier(self) -> None:
        """Wait until all input handed over so far is decoded (a container stream: its demuxer has
        consumed every byte), and its frames were given to the listener."""
        await self._ask(_Item("barrier"))

    async def end(self) -> None:
        """The client sends nothing more: EOF to a running container stream, so that the demuxer and
        decoder release the frames they hold back; returns once it drained."""
        await self._ask(_Item("end"))

    async def decode_file(self, data: bytes | bytearray) -> str | None:
        """Decode a whole uploaded file on the ingest thread; returns a warning or raises CasaError."""
        return await self._ask(_Item("file", data), timeout=None)

    def release_credit(self) -> None:
        """A credited frame finished (event loop)."""
        with self._credit_cv:
            self._credits = min(OFFLINE_CREDITS, self._credits + 1)
            self._credit_cv.notify_all()

    def close(self) -> None:
        """Stop the thread without waiting (safe inside a cancelled task); pending acks are cancelled."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        with self._in_cv:
            dropped = list(self._in)
            self._in.clear()
            self._in.append(_STOP)
            self._in_cv.notify_all()
        for item in dropped:
            if item.ack is not None and not item.ack.done():
                item.ack.cancel()
        for cv in (self._credit_cv, self._out_cv):
            with cv:
                cv.notify_all()
        self._room.set()

    async def _put(self, item: _Item) -> None:
        if self._closed:
            return
        while self._queued and (
            self._queued_bytes + item.size > self.max_buffered_bytes or self._queued >= INPUT_MESSAGES
        ):
            self._room.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room.wait(), 1.0)
            if self._closed:
                return
            if not self._thread.is_alive():
                raise InternalError("the session's input thread stopped; reconnect")
        self._queued += 1
        self._queued_bytes += item.size
        with self._in_cv:
            self._in.append(item)
            self._in_cv.notify()

    async def _ask(self, item: _Item, timeout: float | None = ACK_TIMEOUT) -> Any:
        if self._closed:
            return None
        item.ack = self.loop.create_future()
        await self._put(item)
        if timeout is None:
            return await item.ack
        try:
            return await asyncio.wait_for(asyncio.shield(item.ack), timeout)
        except asyncio.TimeoutError:
            log.warning("ingest did not answer a %s within %.0f s", item.kind, timeout)
            return None

    def _dequeued(self, size: int) -> None:  # event loop
        self._queued -= 1
        self._queued_bytes -= size
        self._room.set()

    def _drain(self) -> None:  # event loop
        with self._out_cv:
            items = list(self._out)
            self._out.clear()
            self._out_cv.notify_all()
        listener = self.listener
        for kind, *args in items:
            if self._closed and kind != "ack":
                continue
            try:
                if kind == "frame":
                    listener.ingest_counts(args[4], args[5])
                    listener.ingest_frame(*args[:4])
                elif kind == "counts":
                    listener.ingest_counts(*args)
                elif kind == "error":
                    listener.ingest_error(args[0])
                elif kind == "ack":
                    future, result, exc = args
                    if not future.done():
                        if exc is not None:
                            future.set_exception(exc)
                        else:
                            future.set_result(result)
            except Exception:
                log.exception("ingest listener failed on %s", kind)

    # ---- ingest thread --------------------------------------------------------------------------

    def _post(self, *item: Any) -> None:
        """Queue one item for the event loop; waits while the outbox is full (the loop is busy)."""
        with self._out_cv:
            while len(self._out) >= OUTBOX and not self._stopping.is_set():
                self._out_cv.wait(0.5)
            if self._stopping.is_set() and item[0] != "ack":
                return
            wake = not self._out
            self._out.append(item)
        if wake:
            with contextlib.suppress(RuntimeError):  # loop closed: the server is shutting down
                self.loop.call_soon_threadsafe(self._drain)

    def _counts(self) -> tuple[int, int]:
        counts = (self._received, self._skipped)
        self._received = self._skipped = 0
        return counts

    def _flush_counts(self) -> None:
        if self._received or self._skipped:
            self._post("counts", *self._counts())

    def _next(self) -> _Item:
        if self._pending:
            return self._pending.popleft()
        with self._in_cv:
            while not self._in:
                self._in_cv.wait()
            item = self._in.popleft()
        if item is not _STOP:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._dequeued, item.size)
        return item

    def _run(self) -> None:
        name_this_thread(self._thread.name)  # the OS name too, for top -H and the load test's profile
        try:
            while not self._stopping.is_set():
                item = self._next()
                if item is _STOP:
                    break
                self._handle(item)
        except _Stopped:
            pass
        except Exception:  # _handle catches everything an input can cause: this is a bug
            log.exception("ingest thread failed")
        for ack in self._end_acks:
            self._post("ack", ack, None, None)

    def _handle(self, item: _Item) -> None:
        """One input item, at the top level or from inside a container stream's read."""
        result, error = None, None
        try:
            if item.kind == "image":
                self._image(item.data, item.pts_us)
            elif item.kind == "packet":
                self._packet(item.data, item.pts_us)
            elif item.kind == "chunk":
                self._chunk(item.data)
            elif item.kind == "configure":
                self._configure(*item.data)
            elif item.kind == "file":
                result = self._file(item.data)
        except _Stopped:
            raise
        except CasaError as exc:
            if item.kind == "file":
                error = exc
            else:
                self._flush_counts()
                self._post("error", exc)
        except Exception:  # a bug, never the client's fault: log it, tell the client, go on
            log.exception("ingest failed on a %s message", item.kind)
            failed = FrameFailed(
                f"a {item.kind} message could not be processed (internal error); the session continues"
            )
            if item.kind == "file":
                error = failed
            else:
                self._post("error", failed)
        self._flush_counts()
        if item.ack is not None:
            self._post("ack", item.ack, result, error)

    # -- settings

    def _configure(self, fps: float, offline: bool, codec: str | None, container: str | None) -> None:
        self._resampler.fps = fps
        self._offline = offline
        if codec != self._codec:
            self._packets = None  # a new codec starts a new decoder at the next packet
        self._codec, self._container_fmt = codec, container

    # -- frames

    def _take_credit(self) -> bool:
        if not self._offline:
            return False
        with self._credit_cv:
            while self._credits <= 0 and not self._stopping.is_set():
                self._credit_cv.wait(0.5)
            if self._stopping.is_set():
                return False
            self._credits -= 1
            return True

    def frame(self, image: np.ndarray, pts: float, decode_seconds: float) -> None:
        """A decoded, kept frame (FrameSink): wait for a credit (offline), then hand it over."""
        self._received += 1
        credited = self._take_credit()
        if self._stopping.is_set():
            raise _Stopped
        self._post("frame", image, pts, decode_seconds, credited, *self._counts())

    def skipped(self) -> None:
        self._received += 1
        self._skipped += 1

    def error(self, exc: CasaError) -> None:
        self._flush_counts()
        self._post("error", exc)

    # -- the three input kinds

    def _image(self, payload: bytes, pts_us: int) -> None:
        pts = pts_us / 1e6
        if not self._resampler.keep(pts):
            self.skipped()
            return
        t0 = time.perf_counter()
        try:
            image = decode_image(payload, self.limits)
        except Exception:
            self._resampler.undo()  # the next frame may take the slot of one that did not decode
            raise
        self.frame(image, pts, time.perf_counter() - t0)

    def _packet(self, payload: bytes, pts_us: int) -> None:
        if self._codec is None:
            raise BadFrame(
                '0x03 packets need a codec: send session.update {"input": {"codec": "h264"}} first'
            )
        if self._packets is None:
            self._packets = PacketDecoder(self._codec, self.limits)
        t0 = time.perf_counter()
        frames, n = self._packets.decode(payload, pts_us, self._resampler.keep)
        dt = time.perf_counter() - t0
        self._received += n - len(frames)
        self._skipped += n - len(frames)
        for image, t in frames:
            self.frame(image, t, dt)

    def _chunk(self, chunk: bytes) -> None:
        if self._skip_until_header and sniff_container(chunk) is None:
            return  # the error was reported once: skip chunks until one starts a new stream
        self._skip_until_header = False
        self._resampler.reset()
        ok = False
        try:
            self._stream = ContainerStream(
                chunk,
                self.limits,
                self._resampler.keep,
                self,
                self,
                self.max_buffered_bytes,
                self._container_fmt,
            )
            self._stream.run()
            ok = True
        finally:
            self._stream = None
            if not ok:
                self._skip_until_header = True
            for ack in self._end_acks:  # session.close waited for this stream to drain
                self._flush_counts()
                self._post("ack", ack, None, None)
            self._end_acks.clear()

    def pull(self) -> bytes | None:
        """Source for the running container stream: the next chunk, handling whatever else comes
        first. None is EOF: the client ended or restarted the stream, or the session is closing."""
        while True:
            self._flush_counts()
            item = self._next()
            if item is _STOP:
                self._stopping.set()
                return None
            if item.kind == "chunk":
                if starts_stream(item.data):
                    self._pending.appendleft(item)  # a recorder restart: end this stream, then start it
                    return None
                return item.data
            if item.kind == "end":
                assert item.ack is not None
                self._end_acks.append(item.ack)  # answered once the stream drained
                return None
            if item.kind == "barrier":
                self._post("ack", item.ack, None, None)  # everything fed before is consumed
                continue
            self._handle(item)

    # -- uploads

    def _file(self, data: bytes | bytearray) -> str | None:
        self._resampler.reset()
        return decode_file(data, self.limits, self._resampler.keep, self)
