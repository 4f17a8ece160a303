"""What every input kind shares: the frame size limits, the fps resampler and the conversion of a
decoded video frame to the model's uint8 RGB input.

The server decodes; the model's processor resizes (model/processor.py). A processor that resizes
uint8 images itself (Qwen-family checkpoints: aspect-preserving smart-resize, PIL bicubic) gets the
frame at its decoded size and its `resize` runs here, on the session's ingest thread, so the
engine's processor finds the frame already at its size and the model worker does no resizing. The
bundled model's square input keeps the fast path: swscale (or Pillow for images) scales straight
to size x size, as its processor expects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

from casa_live.server.errors import BadFrame, FrameTooLarge

Resize = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 -> (h, w, 3) uint8


@dataclass
class FrameLimits:
    size: int  # square model input side: frames come out (size, size, 3) uint8 when resize is None
    max_width: int
    max_height: int
    # the model processor's own uint8 resize (model/processor.py); frames are decoded at full size
    # and come out at whatever size it picks
    resize: Resize | None = None

    @classmethod
    def for_processor(cls, processor: object, size: int, max_width: int, max_height: int) -> FrameLimits:
        """Limits whose frames are what `processor` expects (its resize when it has one)."""
        resize = processor.resize if getattr(processor, "resize_uint8", False) else None  # type: ignore[attr-defined]
        return cls(size, max_width, max_height, resize)

    def check(self, width: int, height: int) -> None:
        if width > self.max_width or height > self.max_height:
            sees = "a resized copy" if self.resize is not None else f"{self.size}x{self.size}"
            raise FrameTooLarge(
                f"frame is {width}x{height}; this server accepts at most {self.max_width}x{self.max_height} "
                f"(the model sees {sees}): downscale before sending"
            )
        if width < 1 or height < 1:
            raise BadFrame(f"frame has empty dimensions {width}x{height}")


class Resampler:
    """Keep frames at `fps` by pts: a frame is kept when it reaches the next slot; a pts jump (seek,
    restart) re-anchors the grid instead of keeping a burst. Owned by one ingest thread."""

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


def to_rgb(frame: av.VideoFrame, limits: FrameLimits) -> np.ndarray:
    """A decoded video frame -> uint8 RGB for the model: (size, size, 3) resized by swscale (~1.6 ms
    at 720p), or converted at its own size and resized by the processor (limits.resize)."""
    limits.check(frame.width, frame.height)
    if limits.resize is not None:
        return limits.resize(frame.reformat(format="rgb24").to_ndarray())
    out = frame.reformat(width=limits.size, height=limits.size, format="rgb24", interpolation="BILINEAR")
    return out.to_ndarray()
