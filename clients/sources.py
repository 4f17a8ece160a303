"""Video sources for the command-line streamer: files, webcams, network streams, the synthetic world.

`open_source(spec)` understands:
- `synthetic:SEED`: a clip of the synthetic world (model/world/scene.py), rendered in memory;
- `/dev/videoN`, `v4l2:/dev/videoN` or `webcam:N`: a V4L2 webcam (live);
- `rtsp://`, `rtmp://`, `udp://`, `srt://`, `http(s)://` URLs: anything FFmpeg can open (rtsp/rtmp/udp/srt
  are live);
- anything else: a local file PyAV opens.

A source yields `Frame`s (pts in seconds from its first frame, RGB uint8 HxWx3) already sampled at the
session fps by `Sampler`, so frames that are never sent are never converted to RGB. For the container
path (kind 0x02) a source gives raw bytes instead: the file itself, or the synthetic clip encoded to
WebM; live devices have no container bytes to forward.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "srt://", "tcp://")
URL_SCHEMES = (*LIVE_SCHEMES, "http://", "https://")
MAX_CHUNK_BYTES = 1 << 20  # well under the server's message limit
CHUNK_SECONDS = 0.25  # container chunks span at least this much media


class SourceError(Exception):
    """A source that cannot be opened or read; the message says what to check."""


@dataclass
class Frame:
    pts: float  # seconds from the first frame of the source
    image: np.ndarray  # (H, W, 3) uint8 RGB


@dataclass
class Chunk:
    time: float  # media seconds (from the first packet) reached once this chunk is decoded
    data: bytes


class Sampler:
    """Keeps one frame per 1/fps seconds of media time (the first frame always)."""

    def __init__(self, fps: float) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.period = 1.0 / fps
        self.next_pts: float | None = None

    def take(self, pts: float) -> bool:
        if self.next_pts is None:
            self.next_pts = pts + self.period
            return True
        # A tiny tolerance so 30 fps -> 2 fps picks every 15th frame despite float pts.
        if pts + 1e-6 < self.next_pts:
            return False
        # Skip whole periods after a gap (a stalled camera) rather than bursting to catch up.
        self.next_pts += self.period * max(1, math.floor((pts - self.next_pts) / self.period + 1e-6) + 1)
        return True


class Source:
    """Base class. `live` sources pace themselves; files are paced by the streamer if asked."""

    name = "source"
    live = False

    def frames(self, fps: float) -> Iterator[Frame]:
        raise NotImplementedError

    def container_chunks(self) -> Iterator[Chunk]:
        """The source's container bytes in order, each chunk with the media time it completes."""
        raise SourceError(f"{self.name} has no container bytes to send; use the default JPEG frames")

    def close(self) -> None:
        pass


class AVSource(Source):
    """Anything PyAV/FFmpeg opens: a file, a device, a URL."""

    def __init__(
        self,
        target: str,
        *,
        fmt: str | None = None,
        options: dict[str, str] | None = None,
        live: bool = False,
        name: str | None = None,
    ) -> None:
        self.target, self.fmt, self.options, self.live = target, fmt, options or {}, live
        self.name = name or target

    def _open(self):
        import av

        try:
            return av.open(self.target, format=self.fmt, options=self.options, timeout=10.0)
        except FileNotFoundError as e:
            raise SourceError(f"no such file or device: {self.target}") from e
        except (av.FFmpegError, OSError) as e:
            raise SourceError(f"cannot open {self.name}: {e}") from e

    def frames(self, fps: float) -> Iterator[Frame]:
        import av

        container = self._open()
        try:
            if not container.streams.video:
                raise SourceError(f"{self.name} has no video stream")
            stream = container.streams.video[0]
            sampler, first, index = Sampler(fps), None, 0
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            try:
                for frame in container.decode(stream):
                    t = frame.time if frame.time is not None else index / rate
                    index += 1
                    if first is None:
                        first = t
                    pts = max(0.0, t - first)
                    if sampler.take(pts):
                        yield Frame(pts, frame.to_ndarray(format="rgb24"))
            except av.FFmpegError as e:
                raise SourceError(f"error while reading {self.name}: {e}") from e
        finally:
            container.close()

    def container_chunks(self) -> Iterator[Chunk]:
        if self.live or "://" in self.target:
            return super().container_chunks()
        path = Path(self.target)
        if not path.is_file():
            raise SourceError(f"no such file: {self.target}")
        return timed_chunks(str(path), lambda: open(path, "rb"))


class SyntheticSource(Source):
    """A clip of the synthetic world the bundled model learnt (model/world/scene.py), at its own fps."""

    def __init__(self, seed: int, seconds: float = 8.0) -> None:
        self.seed, self.seconds = seed, seconds
        self.name = f"synthetic:{seed}"
        self._clip = None

    def clip(self):
        """The world's `Clip` (frames (F, H, W, 3) uint8 + per-frame ground truth), made once."""
        if self._clip is None:
            from casa_live.model.world.scene import WorldConfig, generate_clip

            fps = WorldConfig().fps
            self._clip = generate_clip(self.seed, WorldConfig(frames=max(1, round(self.seconds * fps))))
        return self._clip

    def frames(self, fps: float) -> Iterator[Frame]:
        clip = self.clip()
        sampler = Sampler(fps)
        for image, t in zip(clip.frames, clip.timestamps):
            if sampler.take(t):
                yield Frame(t, np.ascontiguousarray(image))

    def container_chunks(self) -> Iterator[Chunk]:
        from casa_live.model.world.video import encode_video

        clip = self.clip()
        data = encode_video(clip.frames, fps=clip.config.fps, fmt="webm")
        return timed_chunks(io.BytesIO(data), lambda: io.BytesIO(data))


def timed_chunks(target, reader, min_seconds: float = CHUNK_SECONDS) -> Iterator[Chunk]:
    """Split a container's bytes where its video packets end, so each chunk carries whole frames and
    the media time they reach: a realtime sender can then send the bytes of frame k at its pts.

    One demux pass (no decoding) reads each packet's byte offset (`packet.pos`) and pts; chunks span
    at least `min_seconds` of media (fewer, larger messages) and at most MAX_CHUNK_BYTES. Containers
    whose demuxer reports no offsets fall back to fixed-size chunks at media time 0.
    """
    import av

    marks: list[tuple[int, float]] = []  # (byte offset where a packet ends, its time in seconds)
    try:
        with av.open(target) as container:
            if not container.streams.video:
                raise SourceError("the file has no video stream")
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.pos is not None and packet.pos >= 0 and packet.pts is not None and packet.size:
                    marks.append((packet.pos + packet.size, float(packet.pts * packet.time_base)))
    except av.FFmpegError as e:
        raise SourceError(f"cannot read the container: {e}") from e
    t0 = min((t for _, t in marks), default=0.0)
    # Cut points: offsets in increasing order, each with the latest media time reached by then.
    cuts: list[tuple[int, float]] = []
    reached = opened = 0.0
    for end, t in sorted(marks):
        reached = max(reached, t - t0)
        if cuts and reached - opened < min_seconds:
            cuts[-1] = (end, reached)  # extend the current chunk
        else:
            cuts.append((end, reached))
            opened = reached
    with reader() as f:
        sent = 0
        for end, t in cuts:
            while sent < end:
                data = f.read(min(end - sent, MAX_CHUNK_BYTES))
                if not data:
                    return
                sent += len(data)
                yield Chunk(t, data)
        while data := f.read(MAX_CHUNK_BYTES):  # trailing bytes (cues, index)
            yield Chunk(reached, data)


def open_source(spec: str, *, seconds: float = 8.0) -> Source:
    """Parse a SOURCE argument (see the module docstring); `seconds` is the synthetic clip length."""
    if spec.startswith("synthetic:") or spec == "synthetic":
        _, _, seed = spec.partition(":")
        try:
            return SyntheticSource(int(seed or 0), seconds)
        except ValueError:
            raise SourceError(
                f"synthetic source needs an integer seed, e.g. synthetic:7 (got {spec!r})"
            ) from None
    if spec.startswith("webcam:"):
        spec = f"/dev/video{spec.partition(':')[2] or 0}"
    if spec.startswith("v4l2:"):
        spec = spec.partition(":")[2]
    if spec.startswith("/dev/video"):
        return AVSource(spec, fmt="v4l2", live=True, name=f"webcam {spec}")
    if spec.startswith(URL_SCHEMES):
        options = {"rtsp_transport": "tcp"} if spec.startswith(("rtsp://", "rtsps://")) else {}
        return AVSource(spec, options=options, live=spec.startswith(LIVE_SCHEMES))
    if not Path(spec).exists():
        raise SourceError(
            f"no such file: {spec} (sources: a video file, /dev/videoN, an rtsp:// or http:// URL, synthetic:SEED)"
        )
    return AVSource(spec)


def encode_jpeg(image: np.ndarray, quality: int = 85, max_side: int | None = None) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG bytes, downscaled so the longer side is at most max_side."""
    from PIL import Image

    img = Image.fromarray(image)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
