"""The synthetic clips of the browser demo.

The server's demo routes (server/demo.py) serve `demo_clip_webm()` at `GET /v1/demo-clip.webm`, so the
page has a scene that the bundled model truly understands even where no camera exists. Tests feed the
same world to Chromium's fake camera with `write_camera_y4m()`. Everything is a pure function of the
seed (model/world/scene.py), so a test can regenerate the ground truth.
"""

from __future__ import annotations

import functools
import io
from fractions import Fraction
from pathlib import Path

DEMO_SEED = 211  # a lively scene: red, purple and yellow squares and crosses
DEMO_FRAMES = 40  # 20 s at the world's 2 fps; the page loops it


def demo_clip(seed: int = DEMO_SEED, frames: int = DEMO_FRAMES):
    """The world `Clip` behind the demo video (frames + ground truth)."""
    from casa_live.model.world.scene import WorldConfig, generate_clip

    return generate_clip(seed, WorldConfig(frames=frames))


@functools.lru_cache(maxsize=4)
def demo_clip_webm(seed: int = DEMO_SEED, frames: int = DEMO_FRAMES) -> bytes:
    """The demo clip as VP8 WebM at the world's fps, every frame a keyframe. Cached.

    Encoded here rather than with model/world/video.py's realtime defaults: at 128 px those leave blocking
    artefacts that the model (trained on clean renders) may misread; intra-only at a high bitrate costs
    ~0.5 MB for 20 s and keeps every frame clean and seekable for the <video> loop.
    """
    import av

    clip = demo_clip(seed, frames)
    rate = Fraction(clip.config.fps).limit_denominator(1000)
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream(
            "libvpx", rate=rate, options={"deadline": "good", "cpu-used": "4", "crf": "4"}
        )
        stream.width, stream.height = clip.frames.shape[2], clip.frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        stream.codec_context.gop_size = 1
        for i, image in enumerate(clip.frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def write_camera_y4m(
    path: str | Path, seed: int = DEMO_SEED, frames: int = DEMO_FRAMES, camera_fps: int = 10
) -> Path:
    """A Y4M file for Chromium's `--use-file-for-fake-video-capture` showing the world at its own pace.

    Chromium plays the file at the rate in its header and loops it; each world frame is repeated so the
    fake camera runs at an ordinary `camera_fps` while the scene changes at the world's fps.
    """
    from casa_live.model.world.video import write_video

    clip = demo_clip(seed, frames)
    repeat = max(1, round(camera_fps / clip.config.fps))
    return write_video(
        Path(path), (f for f in clip.frames for _ in range(repeat)), fps=clip.config.fps * repeat
    )
