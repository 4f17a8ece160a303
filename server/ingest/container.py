"""0x02 container chunks (WebM/Matroska, fragmented MP4, MPEG-TS, IVF) and whole uploaded files.

A stream is demuxed by `av.open` on a non-seekable file, `ChunkReader`, with `probesize=32` (without it
the first frame waits ~1.3 s for stream probing). Never `fflags=nobuffer`: it drops frames. The
demuxer runs on the session's ingest thread: when it wants bytes and none are buffered, the reader
pulls the session's next input from the ingest (`pull`), so images, packets, settings and barriers
sent meanwhile are handled in order on the same thread, and the buffer holds at most one chunk. The
one exception is a fragmented MP4's init segment (`ftyp` + `moov`), which FFmpeg needs in one read:
it is buffered whole, up to the session's byte cap (`max_buffered_bytes`); a larger one is refused.
FFmpeg itself buffers a packet whole before decoding it, so the demuxer may also consume at most that
cap without giving a frame (`ContainerStream._on_read`).

The container format is recognised from the first chunk's header; a first chunk without one is a late
join and a clear `bad_frame`. A chunk that starts with a header while a stream runs ends that stream
(a recorder restart) and starts a new one.

PyAV raises nothing for garbage in the middle of a stream (the demuxer resyncs or stops), so
`ContainerStream` watches for it: a jump in the frame timestamps, many bytes without a frame, or the
demuxer ending while the client is still sending. Each is reported once as a non-fatal `bad_frame`.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Protocol

import av
import numpy as np

from casa_live.server.errors import BadFrame, CasaError, FrameTooLarge, UnsupportedCodec
from casa_live.server.ingest.frames import FrameLimits, to_rgb
from casa_live.server.protocol import CONTAINER_FORMATS

log = logging.getLogger("casa.ingest")

READ_AHEAD = 32 << 10  # PyAV's I/O buffer: the demuxer may hold this much unparsed input
_FORMAT_NAMES = {"webm": "matroska", "matroska": "matroska", "mp4": "mp4", "mpegts": "mpegts", "ivf": "ivf"}


def sniff_container(chunk: bytes) -> str | None:
    """The PyAV input format for a stream whose first bytes are `chunk`, or None (no header: late join)."""
    if chunk.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # also WebM (FFmpeg's matroska,webm demuxer)
    if chunk.startswith(b"DKIF"):
        return "ivf"
    if chunk[4:8] in (b"ftyp", b"styp", b"moov"):
        return "mp4"
    if chunk[:1] == b"\x47" and (len(chunk) < 189 or chunk[188:189] == b"\x47"):
        return "mpegts"
    return None


def starts_stream(chunk: bytes) -> bool:
    """A chunk that begins a new stream (MPEG-TS chunks all look alike, so TS never restarts)."""
    return sniff_container(chunk) in ("matroska", "mp4", "ivf")


def mp4_init_bytes(data: bytes | memoryview) -> int | None:
    """Bytes up to the end of a fragmented MP4's init segment (the top-level boxes before the first
    `moof`/`mdat`, i.e. ftyp + moov), or None while more bytes are needed to tell. FFmpeg's mov demuxer
    misparses the moov when a read boundary falls at some offsets inside it (reproduced with PyAV 18:
    500-byte first reads fail, 30- and 550-byte ones work), so the reader hands it over in one read.
    Reads only box headers (16 bytes a box): cheap to call on a large buffer, and no copy of it."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = bytes(data[pos + 4 : pos + 8])
        if kind in (b"moof", b"mdat", b"sidx", b"styp"):
            return pos
        if size == 1:  # 64-bit size follows
            if pos + 16 > len(data):
                return None
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        if size < 8:
            return pos  # not a box: let the demuxer report it
        pos += size
        if kind == b"moov":
            return pos
    if pos > len(data):
        return pos  # a box runs past the buffer: this many bytes are needed
    return None


class Source(Protocol):
    """Where a ChunkReader gets its bytes: the session's ingest."""

    def pull(self) -> bytes | None:
        """Block until the next chunk of this stream (handling any other input meanwhile); None = EOF
        (the client ended or restarted the stream, or the session is closing)."""


class ChunkReader(io.RawIOBase):
    """A blocking, non-seekable file over a session's chunks. `read` returns what is buffered (short
    reads are fine) and pulls the next chunk only when the buffer is empty; after EOF it returns b"".
    `first_read(buffered) -> bytes the first read must hold (None: unknown yet)` makes the first read
    wait for a whole init segment, bounded by `cap` bytes."""

    def __init__(
        self,
        source: Source,
        cap: int,
        on_read: Callable[[int], None] | None = None,
        first_read: Callable[[memoryview], int | None] | None = None,
    ) -> None:
        super().__init__()
        self._source = source
        self._buf = bytearray()
        self._cap = cap
        self._eof = False
        self.failed: CasaError | None = None  # why the reader gave EOF early (the byte cap)
        self.fed = 0  # bytes received
        self.consumed = 0  # bytes handed to the demuxer
        self._on_read = on_read
        self._first_read = first_read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def eof(self) -> bool:
        return self._eof

    def feed(self, data: bytes) -> None:
        self._buf += data
        self.fed += len(data)

    def _pull(self) -> bool:
        if self._eof:
            return False
        chunk = self._source.pull()
        if chunk is None:
            self._eof = True
            return False
        self.feed(chunk)
        return True

    def _fill_first_read(self) -> None:
        first, self._first_read = self._first_read, None
        while True:
            with memoryview(self._buf) as view:
                need = first(view)
            if need == 0 or (need is not None and len(self._buf) >= need):
                return
            if (need or 0) > self._cap or len(self._buf) > self._cap:
                self._fail(need)
                return
            if not self._pull():
                return

    def _fail(self, need: int | None) -> None:
        declared = f"declares {need} bytes" if need else f"is over {len(self._buf)} bytes"
        self.fail(
            FrameTooLarge(
                f"the MP4 init segment (ftyp + moov) {declared}; this server buffers at most {self._cap} "
                "bytes of a container stream per session (max_buffered_bytes): send a smaller init segment"
            )
        )

    def fail(self, exc: CasaError) -> None:
        """End the stream now (EOF to the demuxer), for `exc`; what is buffered is dropped."""
        if self.failed is None:
            self.failed = exc
        self._buf = bytearray()
        self._eof = True

    def read(self, n: int = -1) -> bytes:
        if self._first_read is not None:
            self._fill_first_read()
        while not self._buf and self._pull():
            pass
        n = len(self._buf) if n is None or n < 0 else n
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.consumed += len(data)
        if self._on_read is not None and data:
            self._on_read(self.consumed)
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class FrameSink(Protocol):
    """Where decoded frames go: the session's ingest (on its own thread)."""

    def frame(self, image: np.ndarray, pts: float, decode_seconds: float) -> None: ...
    def skipped(self) -> None: ...
    def error(self, exc: CasaError) -> None: ...


class ContainerStream:
    """One 0x02 container stream, demuxed and decoded on the session's ingest thread by `run()`."""

    GAP_SECONDS = 2.0  # a pts jump above max(this, 8 frame intervals) = lost data
    STALL_MIN_BYTES = 16 << 10  # bytes without a frame above max(this, 4 x the largest normal gap) = garbage

    def __init__(
        self,
        first_chunk: bytes,
        limits: FrameLimits,
        keep: Callable[[float], bool],
        sink: FrameSink,
        source: Source,
        cap: int,
        fmt: str | None = None,
    ) -> None:
        detected = sniff_container(first_chunk)
        if fmt is not None and fmt not in CONTAINER_FORMATS:
            raise UnsupportedCodec(f"container {fmt!r} is not supported; use one of {CONTAINER_FORMATS}")
        if detected is None:
            raise BadFrame(
                "the first 0x02 chunk does not start with a container header (WebM/Matroska EBML, MP4 ftyp, "
                "MPEG-TS sync byte or IVF DKIF): a client that joins a stream late must restart its recorder "
                "so that the first chunk holds the header"
            )
        self.format = _FORMAT_NAMES[fmt] if fmt else detected
        self.limits, self.keep, self.sink = limits, keep, sink
        self.reader = ChunkReader(
            source, cap, self._on_read, mp4_init_bytes if self.format == "mp4" else None
        )
        self.reader.feed(first_chunk)
        self.cap = cap
        self.frames = 0
        self._consumed_at_frame = 0  # bytes handed to the demuxer when the last frame came out
        self._last_end = 0  # stream byte offset where the last packet that gave a frame ended
        self._largest_gap = 0  # most bytes between two such packets, so far
        self._stalled = False

    def run(self) -> None:
        """Demux to the end of the stream. Raises CasaError for what ends it badly; returns normally
        when the client ended it (EOF) and it gave frames."""
        try:
            self._demux()
        except CasaError:
            raise
        except av.FFmpegError as exc:
            if self.reader.failed is not None:
                raise self.reader.failed from None
            raise self._classify(exc) from None
        if self.reader.failed is not None:
            raise self.reader.failed
        if not self.reader.eof:
            raise BadFrame(
                f"the {self.format} stream ended after {self.frames} frames while the client was still sending "
                "(corrupt data mid-stream?); send a new stream starting with its header"
            )
        if self.frames == 0:
            raise BadFrame(f"the {self.format} stream ended without a single decodable frame (truncated?)")
        tail = self.reader.fed - self._last_end
        if self._last_end and not self._stalled and tail > self._stall_limit():
            raise BadFrame(
                f"the last {tail} bytes of the {self.format} stream gave no frame (after frame {self.frames}): "
                "corrupt data mid-stream?"
            )

    def _stall_limit(self) -> int:
        return max(self.STALL_MIN_BYTES, 4 * self._largest_gap)

    def _on_read(self, consumed: int) -> None:
        """Garbage makes demuxers skip or swallow data without a word: many bytes without a frame. The
        demuxer reads ahead up to its 32 KiB buffer, hence the slack.

        The hard bound: FFmpeg buffers a packet whole before it decodes it, and a container may declare
        a packet of any size (an IVF frame header says 1 GiB, then megabytes follow). So the demuxer
        may consume at most `cap` bytes (max_buffered_bytes) without giving a frame; past that the
        stream ends with frame_too_large, and what FFmpeg held is freed with it."""
        if consumed - self._consumed_at_frame > self.cap + READ_AHEAD:
            self.reader.fail(
                FrameTooLarge(
                    f"{consumed - self._consumed_at_frame} bytes of the {self.format} stream gave no frame; this "
                    f"server holds at most {self.cap} bytes of a container stream per session "
                    "(max_buffered_bytes): send frames smaller than that, or a new stream starting with its header"
                )
            )
            return
        gap = consumed - self._last_end
        if self.frames and self._last_end and not self._stalled and gap > READ_AHEAD + self._stall_limit():
            self._stalled = True
            self.sink.error(
                BadFrame(
                    f"no frame decoded from the last {gap} bytes of the {self.format} stream after frame "
                    f"{self.frames}: corrupt data mid-stream?"
                )
            )

    def _frame_seen(self, packet: av.Packet) -> None:
        if packet.pos is None or packet.pos < 0:
            return  # this demuxer does not report byte positions
        end = packet.pos + packet.size
        if self._last_end and not self._stalled:
            self._largest_gap = max(self._largest_gap, end - self._last_end)
        self._last_end, self._stalled = end, False

    def _classify(self, exc: av.FFmpegError) -> CasaError:
        if self.frames == 0:
            return BadFrame(
                f"could not read the {self.format} stream header ({exc.strerror}): the stream is truncated or "
                "corrupt, or the first chunk is not its start (late join: restart the recorder)"
            )
        return BadFrame(
            f"the {self.format} stream became unreadable after {self.frames} frames ({exc.strerror}); "
            "send a new stream starting with its header"
        )

    def _demux(self) -> None:
        with av.open(
            self.reader, mode="r", format=self.format, container_options={"probesize": "32"}
        ) as container:
            if not container.streams.video:
                raise UnsupportedCodec(f"the {self.format} stream has no video track")
            stream = container.streams.video[0]
            if stream.codec_context is None or stream.codec_context.name not in av.codecs_available:
                raise UnsupportedCodec(f"the {self.format} stream's video codec cannot be decoded")
            last_pts: float | None = None
            interval = 0.0
            for packet in container.demux(stream):
                t0 = time.perf_counter()
                frames = packet.decode()
                decode_s = time.perf_counter() - t0
                if frames:
                    self._frame_seen(packet)
                    self._consumed_at_frame = self.reader.consumed
                for frame in frames:
                    self.frames += 1
                    pts = (
                        float(frame.time) if frame.time is not None else (last_pts or 0.0) + (interval or 0.0)
                    )
                    if last_pts is not None:
                        step = pts - last_pts
                        if step > max(self.GAP_SECONDS, 8 * interval) and interval > 0:
                            self.sink.error(
                                BadFrame(
                                    f"the {self.format} stream's timestamps jumped from {last_pts:.3f} s to "
                                    f"{pts:.3f} s: frames were lost (corrupt data mid-stream?)"
                                )
                            )
                        elif step > 0:
                            interval = step if interval == 0 else 0.9 * interval + 0.1 * step
                    last_pts = pts
                    if self.keep(pts):
                        t1 = time.perf_counter()
                        image = to_rgb(frame, self.limits)
                        self.sink.frame(image, pts, decode_s + time.perf_counter() - t1)
                        decode_s = 0.0
                    else:
                        self.sink.skipped()


class MemoryFile(io.RawIOBase):
    """A seekable read-only file over a buffer, without copying it (io.BytesIO would)."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:  # type: ignore[override]
        chunk = self._view[self._pos : self._pos + len(b)]
        b[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def close(self) -> None:
        self._view.release()
        super().close()


def decode_file(
    data: bytes | bytearray, limits: FrameLimits, keep: Callable[[float], bool], sink: FrameSink
) -> str | None:
    """A whole uploaded video (any container PyAV reads, seekable: MP4 with its index at the end too).
    Blocking. Raises BadFrame / UnsupportedCodec / FrameTooLarge when nothing can be read; returns a
    warning when the file breaks off after some frames, else None."""
    frames = 0
    try:
        with MemoryFile(data) as file, av.open(file, mode="r") as container:
            if not container.streams.video:
                raise UnsupportedCodec("the uploaded file has no video track")
            stream = container.streams.video[0]
            t0 = time.perf_counter()
            for frame in container.decode(stream):
                frames += 1
                pts = float(frame.time) if frame.time is not None else frames - 1.0
                if keep(pts):
                    image = to_rgb(frame, limits)
                    sink.frame(image, pts, time.perf_counter() - t0)
                else:
                    sink.skipped()
                t0 = time.perf_counter()
    except av.FFmpegError as exc:
        if frames == 0:
            raise BadFrame(
                f"the upload is not a readable video ({exc.strerror}); send MP4, WebM, MKV, MPEG-TS, "
                "AVI or IVF"
            ) from None
        return f"the video broke off after {frames} frames ({exc.strerror}); captions cover the readable part"
    if frames == 0:
        raise BadFrame("the uploaded video holds no decodable frame")
    return None
