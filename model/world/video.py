"""Write and read real video files with PyAV (for the synthetic world, clients, tests, benchmarks).

Formats, picked by file extension or `fmt`:

| fmt    | container          | codec                                   | use                                  |
|--------|--------------------|-----------------------------------------|--------------------------------------|
| mp4    | MP4                | H.264 (libx264) if the wheel has it, else MPEG-4 part 2 | files, uploads         |
| fmp4   | fragmented MP4     | same as mp4 (moov first, one fragment per keyframe)     | streaming container bytes |
| webm   | WebM               | VP9 (libvpx-vp9), else VP8              | browsers, streaming container bytes  |
| mkv    | Matroska           | MJPEG                                   | intra-only, every frame a keyframe   |
| avi    | AVI                | MJPEG                                   |                                      |
| ts     | MPEG-TS            | H.264 / MPEG-4                          | streaming container bytes            |
| ivf    | IVF                | VP8                                     | raw VP8 packets                      |
| y4m    | YUV4MPEG2          | raw 4:2:0                               | Chromium's fake camera               |

Timestamps: frame i has pts i in a 1/fps time base, so a decoder reads it back at i / fps seconds.
Chromium: `--use-fake-device-for-media-stream --use-file-for-fake-video-capture=clip.y4m`.
Frames must have even width and height (4:2:0 chroma); uint8 RGB (H, W, 3).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FORMATS = ("mp4", "fmp4", "webm", "mkv", "avi", "ts", "ivf", "y4m")
_CONTAINER = {
    "mp4": "mp4",
    "fmp4": "mp4",
    "webm": "webm",
    "mkv": "matroska",
    "avi": "avi",
    "ts": "mpegts",
    "ivf": "ivf",
    "y4m": "yuv4mpegpipe",
}


def has_encoder(name: str) -> bool:
    """True when this PyAV build can encode with codec `name` (e.g. 'libx264')."""
    try:
        av.codec.Codec(name, "w")
    except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpegError for missing codecs
        return False
    return True


def default_codec(fmt: str) -> str:
    """The codec written for a format: the best this wheel can encode."""
    if fmt in ("mp4", "fmp4", "ts"):
        return "libx264" if has_encoder("libx264") else "mpeg4"
    if fmt == "webm":
        return "libvpx-vp9" if has_encoder("libvpx-vp9") else "libvpx"
    if fmt == "ivf":
        return "libvpx"
    if fmt in ("mkv", "avi"):
        return "mjpeg"
    if fmt == "y4m":
        return "rawvideo"
    raise ValueError(f"unknown video format {fmt!r}; choose one of {FORMATS}")


def format_for(path: str | Path) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in _CONTAINER:
        raise ValueError(
            f"cannot tell the video format of {str(path)!r}; use one of the extensions {FORMATS}"
        )
    return ext


def _codec_options(codec: str) -> dict[str, str]:
    # fast, low-latency settings: these files feed tests and live streams, not archives
    if codec == "libx264":
        return {"preset": "veryfast", "tune": "zerolatency"}
    if codec in ("libvpx", "libvpx-vp9"):
        return {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    return {}


def _write(target, frames: Iterable[np.ndarray], fps: float, fmt: str, codec: str | None) -> int:
    codec = codec or default_codec(fmt)
    options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"} if fmt == "fmp4" else {}
    rate = Fraction(fps).limit_denominator(1000)
    n = 0
    with av.open(target, "w", format=_CONTAINER[fmt], options=options) as container:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            h, w = frame.shape[:2]
            if stream is None:
                if h % 2 or w % 2 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise ValueError(f"frames must be (H, W, 3) uint8 with even H and W, got {frame.shape}")
                stream = container.add_stream(codec, rate=rate, options=_codec_options(codec))
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
                if fmt in ("mp4", "fmp4", "ts", "mkv", "avi"):
                    stream.codec_context.gop_size = max(1, round(fps))  # a keyframe every second
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = n
            vf.time_base = 1 / rate
            container.mux(stream.encode(vf))
            n += 1
        if stream is None:
            raise ValueError("no frames to write")
        container.mux(stream.encode(None))
    return n


def write_video(
    path: str | Path, frames: Iterable[np.ndarray], fps: float = 2.0, codec: str | None = None
) -> Path:
    """Write RGB frames (H, W, 3) uint8 to a video file; the format follows the extension."""
    path = Path(path)
    _write(str(path), frames, fps, format_for(path), codec)
    return path


def encode_video(
    frames: Iterable[np.ndarray], fps: float = 2.0, fmt: str = "fmp4", codec: str | None = None
) -> bytes:
    """The bytes of a video (default fragmented MP4, which streams chunk by chunk)."""
    if fmt not in _CONTAINER:
        raise ValueError(f"unknown video format {fmt!r}; choose one of {FORMATS}")
    buf = io.BytesIO()
    _write(buf, frames, fps, fmt, codec)
    return buf.getvalue()


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (F, H, W, 3) uint8 RGB
    times: list[float]  # presentation time of each frame, seconds
    codec: str
    container: str


def read_video(source: str | Path | bytes) -> DecodedVideo:
    """Decode every frame of a video file or bytes to RGB."""
    target = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    frames: list[np.ndarray] = []
    times: list[float] = []
    with av.open(target, "r") as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time) if frame.time is not None else float("nan"))
        name = container.format.name
    if not frames:
        raise ValueError("the video holds no decodable frames")
    return DecodedVideo(np.stack(frames), times, codec, name)
