"""Decoding client media into model-sized RGB frames, off the event loop.

Three input paths (DESIGN §3; measured in research/ecosystem.md §1):
- 0x01 images: `decode_image` with Pillow (JPEG draft mode decodes at reduced size when the target is
  small). The format is sniffed from magic bytes: JPEG/PNG/WebP are accepted, other image formats are
  `unsupported_codec`, anything else is `bad_frame`. Dimensions are checked from the header before
  the pixels are decoded, so a huge image costs nothing.
- 0x02 container chunks: `ContainerDecoder` feeds a blocking file-like object to `av.open` running in
  its own thread with `probesize=32` (without it the first frame waits ~1.3 s for stream probing).
  Never `fflags=nobuffer`: it drops frames. The container format is recognised from the first chunk's
  header; a first chunk without one is a late join and a clear `bad_frame`. A chunk that starts with a
  header while a stream is running starts a new stream (a recorder restart).
- 0x03 encoded packets: `PacketDecoder`, one PyAV codec context, one access unit per packet, no parser
  (no added frame of latency). Default slice threading: a frame-threaded standalone context can hang
  the process when garbage-collected.

PyAV raises nothing for garbage in the middle of a container stream (the demuxer resyncs or stops), so
`ContainerDecoder` watches for it: a jump in the frame timestamps, many bytes without a frame, or the
demuxer ending while the client is still sending. Each is reported once as a non-fatal `bad_frame`.

Frames are resampled to the session fps by pts (`Resampler`); only kept frames are converted to RGB
and resized (PyAV's swscale, ~1.6 ms at 720p) to the model's square `image_size`.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from PIL import Image

from server.errors import BadFrame, CasaError, FrameTooLarge, UnsupportedCodec
from server.protocol import CONTAINER_FORMATS, PACKET_CODECS

log = logging.getLogger("casa.decode")

Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, against the configured limits
_US = Fraction(1, 1_000_000)


@dataclass
class FrameLimits:
    size: int  # model input side: frames come out (size, size, 3) uint8
    max_width: int
    max_height: int

    def check(self, width: int, height: int) -> None:
        if width > self.max_width or height > self.max_height:
            raise FrameTooLarge(
                f"frame is {width}x{height}; this server accepts at most {self.max_width}x{self.max_height} "
                f"(the model sees {self.size}x{self.size}): downscale before sending"
            )
        if width < 1 or height < 1:
            raise BadFrame(f"frame has empty dimensions {width}x{height}")


class Resampler:
    """Keep frames at `fps` by pts: a frame is kept when it reaches the next slot; a pts jump (seek,
    restart) re-anchors the grid instead of keeping a burst."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self._next: float | None = None
        self._prev: float | None = None

    def reset(self) -> None:
        self._next = None

    def undo(self) -> None:
        """Give back the slot of the last kept frame (it failed to decode: the next frame may take it)."""
        self._next = self._prev

    def keep(self, pts: float) -> bool:
        self._prev = self._next
        period = 1.0 / self.fps
        eps = 1e-3 * period  # float pts from integer time bases land a hair early
        if self._next is None or pts < self._next - period or pts > self._next + 4 * period:
            self._next = pts + period
            return True
        if pts >= self._next - eps:
            self._next += period
            return True
        return False


# ---------------------------------------------------------------------------------------------- images

_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
)
_OTHER_IMAGES = (
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
)


def sniff_image(payload: bytes) -> str | None:
    for magic, name in _IMAGE_MAGIC:
        if payload.startswith(magic):
            return name
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "webp"
    for magic, name in _OTHER_IMAGES:
        if payload.startswith(magic):
            return name
    return None


def decode_image(payload: bytes, limits: FrameLimits) -> np.ndarray:
    """One JPEG/PNG/WebP -> (size, size, 3) uint8. Raises BadFrame, FrameTooLarge, UnsupportedCodec."""
    kind = sniff_image(payload)
    if kind is None:
        raise BadFrame("0x01 payload is not an image (expected JPEG, PNG or WebP after the 9-byte header)")
    if kind not in ("jpeg", "png", "webp"):
        raise UnsupportedCodec(f"{kind} images are not accepted: send JPEG, PNG or WebP")
    try:
        img = Image.open(io.BytesIO(payload))
        limits.check(*img.size)
        if kind == "jpeg":
            img.draft("RGB", (limits.size, limits.size))  # DCT scaling: decode at >= the target size
        img = img.convert("RGB")
        if img.size != (limits.size, limits.size):
            img = img.resize((limits.size, limits.size), Image.Resampling.BILINEAR)
        return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    except CasaError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt (PIL raises these)
        raise BadFrame(
            f"could not decode the {kind.upper()} image: {exc}; send one complete image per message"
        ) from None


def to_rgb(frame: av.VideoFrame, limits: FrameLimits) -> np.ndarray:
    limits.check(frame.width, frame.height)
    out = frame.reformat(width=limits.size, height=limits.size, format="rgb24", interpolation="BILINEAR")
    return out.to_ndarray()


# ---------------------------------------------------------------------------------------------- packets


class PacketDecoder:
    """0x03: one access unit per message into one PyAV codec context (H.264 Annex B, VP8, VP9)."""

    STALL_PACKETS = 12  # this many packets in a row without a frame = garbage

    def __init__(self, codec: str, limits: FrameLimits) -> None:
        if codec not in PACKET_CODECS:
            raise UnsupportedCodec(
                f"codec {codec!r} is not supported for 0x03 packets; use one of {PACKET_CODECS}"
            )
        self.codec, self.limits = codec, limits
        self.ctx = av.CodecContext.create(codec, "r")  # default SLICE threading; never FRAME (hangs at GC)
        self._dry = 0

    def decode(
        self, payload: bytes, pts: float, keep: Callable[[float], bool]
    ) -> tuple[list[tuple[np.ndarray, float]], int]:
        """Returns (kept frames as (rgb, pts), number of frames decoded)."""
        packet = av.Packet(payload)
        packet.pts = round(pts * 1e6)
        packet.time_base = _US
        try:
            frames = self.ctx.decode(packet)
        except av.FFmpegError as exc:
            raise BadFrame(
                f"{self.codec} decoder rejected the packet ({exc.strerror}): send one complete access unit "
                "per message, starting with a keyframe"
            ) from None
        self._dry = 0 if frames else self._dry + 1
        if self._dry == self.STALL_PACKETS:
            raise BadFrame(
                f"no frame decoded from the last {self.STALL_PACKETS} {self.codec} packets: the stream is "
                "corrupt, starts without a keyframe, or is not the codec named in input.codec"
            )
        out = []
        for frame in frames:
            t = float(frame.pts * _US) if frame.pts is not None else pts
            if keep(t):
                out.append((to_rgb(frame, self.limits), t))
        return out, len(frames)


# ---------------------------------------------------------------------------------------------- containers


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


def mp4_init_bytes(data: bytes) -> int | None:
    """Bytes up to the end of a fragmented MP4's init segment (the top-level boxes before the first
    `moof`/`mdat`, i.e. ftyp + moov), or None while more bytes are needed to tell. FFmpeg's mov demuxer
    misparses the moov when a read boundary falls at some offsets inside it (reproduced with PyAV 18:
    500-byte first reads fail, 30- and 550-byte ones work), so the reader hands it over in one read."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
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
    return None


READ_AHEAD = 32 << 10  # PyAV's I/O buffer: the demuxer may hold this much unparsed input
_FORMAT_NAMES = {"webm": "matroska", "matroska": "matroska", "mp4": "mp4", "mpegts": "mpegts", "ivf": "ivf"}


class ChunkReader(io.RawIOBase):
    """A blocking, non-seekable file: `read` waits for fed bytes and returns what is there (short reads
    are fine); after `end()` it returns b"" (EOF). `on_starved` fires each time the demuxer has consumed
    everything fed so far, which is how a flush barrier knows the decoder caught up."""

    def __init__(
        self,
        on_starved: Callable[[int], None],
        on_read: Callable[[int], None] | None = None,
        first_read: Callable[[bytes], int | None] | None = None,
    ) -> None:
        super().__init__()
        self._buf = bytearray()
        self._cv = threading.Condition()
        self._ended = False
        self.fed = 0  # bytes fed
        self.consumed = 0  # bytes handed to the demuxer
        self._on_starved = on_starved
        self._on_read = on_read
        # first_read(buffered) -> bytes the first read must hold (None: unknown yet, wait for more)
        self._first_read = first_read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def feed(self, data: bytes) -> None:
        with self._cv:
            self._buf += data
            self.fed += len(data)
            self._cv.notify_all()

    def end(self) -> None:
        with self._cv:
            self._ended = True
            self._cv.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cv:
            if self._first_read is not None:
                while not self._ended and (need := self._first_read(bytes(self._buf))) != 0:
                    if need is not None and len(self._buf) >= need:
                        break
                    self._on_starved(self.consumed)
                    self._cv.wait()
                self._first_read = None
            if not self._buf and not self._ended:
                self._on_starved(self.consumed)
                while not self._buf and not self._ended:
                    self._cv.wait()
            n = len(self._buf) if n is None or n < 0 else n
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self.consumed += len(data)
        if self._on_read is not None:
            self._on_read(self.consumed)
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class ContainerSink(Protocol):
    """Callbacks from the decode thread (the session hops them onto the event loop)."""

    def on_frame(self, image: np.ndarray, pts: float, decode_seconds: float) -> None: ...
    def on_skipped(self) -> None: ...
    def on_error(self, exc: CasaError) -> None: ...
    def on_starved(self, consumed: int) -> None: ...
    def on_end(self) -> None: ...


class ContainerDecoder:
    """0x02: one container stream, demuxed and decoded incrementally in a thread."""

    GAP_SECONDS = 2.0  # a pts jump above max(this, 8 frame intervals) = lost data
    STALL_MIN_BYTES = 16 << 10  # bytes without a frame above max(this, 4 x the largest normal gap) = garbage

    def __init__(
        self,
        first_chunk: bytes,
        limits: FrameLimits,
        keep: Callable[[float], bool],
        sink: ContainerSink,
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
            sink.on_starved, self._on_read, mp4_init_bytes if self.format == "mp4" else None
        )
        self.frames = 0
        self._last_end = 0  # stream byte offset where the last packet that gave a frame ended
        self._largest_gap = 0  # most bytes between two such packets, so far
        self._stalled = False
        self._ended_by_client = False
        self._thread = threading.Thread(target=self._run, name="casa-demux", daemon=True)
        self.reader.feed(first_chunk)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def feed(self, chunk: bytes) -> None:
        self.reader.feed(chunk)

    def end(self, timeout: float = 5.0) -> None:
        """The client finished this stream: EOF to the demuxer, wait for the thread to drain."""
        self._ended_by_client = True
        self.reader.end()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._demux()
        except CasaError as exc:
            self.sink.on_error(exc)
        except av.FFmpegError as exc:
            self.sink.on_error(self._classify(exc))
        except Exception as exc:  # a bug here must not kill the session silently: report it as internal
            log.exception("container decode thread failed")
            self.sink.on_error(exc)  # type: ignore[arg-type]
        finally:
            self.reader.end()
            self.sink.on_end()

    def _stall_limit(self) -> int:
        return max(self.STALL_MIN_BYTES, 4 * self._largest_gap)

    def _on_read(self, consumed: int) -> None:
        """Garbage makes demuxers skip or swallow data without a word: many bytes without a frame. The
        demuxer reads ahead up to its 32 KiB buffer, hence the slack."""
        gap = consumed - self._last_end
        if self.frames and self._last_end and not self._stalled and gap > READ_AHEAD + self._stall_limit():
            self._stalled = True
            self.sink.on_error(
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
                for frame in frames:
                    self.frames += 1
                    pts = (
                        float(frame.time) if frame.time is not None else (last_pts or 0.0) + (interval or 0.0)
                    )
                    if last_pts is not None:
                        step = pts - last_pts
                        if step > max(self.GAP_SECONDS, 8 * interval) and interval > 0:
                            self.sink.on_error(
                                BadFrame(
                                    f"the {self.format} stream's timestamps jumped from {last_pts:.3f} s to {pts:.3f} s: "
                                    "frames were lost (corrupt data mid-stream?)"
                                )
                            )
                        elif step > 0:
                            interval = step if interval == 0 else 0.9 * interval + 0.1 * step
                    last_pts = pts
                    if self.keep(pts):
                        t1 = time.perf_counter()
                        image = to_rgb(frame, self.limits)
                        self.sink.on_frame(image, pts, decode_s + time.perf_counter() - t1)
                        decode_s = 0.0
                    else:
                        self.sink.on_skipped()
        if not self._ended_by_client:
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


def decode_file(
    data: bytes, limits: FrameLimits, keep: Callable[[float], bool], sink: ContainerSink
) -> str | None:
    """A whole uploaded video (any container PyAV reads, seekable: MP4 with its index at the end too).
    Blocking: run it in a thread. Raises BadFrame / UnsupportedCodec / FrameTooLarge when nothing can be
    read; returns a warning when the file breaks off after some frames, else None."""
    frames = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise UnsupportedCodec("the uploaded file has no video track")
            stream = container.streams.video[0]
            t0 = time.perf_counter()
            for frame in container.decode(stream):
                frames += 1
                pts = float(frame.time) if frame.time is not None else frames - 1.0
                if keep(pts):
                    image = to_rgb(frame, limits)
                    sink.on_frame(image, pts, time.perf_counter() - t0)
                else:
                    sink.on_skipped()
                t0 = time.perf_counter()
    except av.FFmpegError as exc:
        if frames == 0:
            raise BadFrame(
                f"the upload is not a readable video ({exc.strerror}); send MP4, WebM, MKV, MPEG-TS, "
                "AVI or IVF"
            ) from None
        return f"the video broke off after {frames} frames ({exc.strerror}); captions cover the readable part"
    finally:
        sink.on_end()
    if frames == 0:
        raise BadFrame("the uploaded video holds no decodable frame")
    return None
