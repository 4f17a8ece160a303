"""What every input kind shares: the frame size limits, the fps resampler and the conversion of a
decoded video frame to the model's (size, size, 3) uint8 RGB."""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from server.errors import BadFrame, FrameTooLarge


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
    """A decoded video frame -> (size, size, 3) uint8, resized by swscale (~1.6 ms at 720p)."""
    limits.check(frame.width, frame.height)
    out = frame.reformat(width=limits.size, height=limits.size, format="rgb24", interpolation="BILINEAR")
    return out.to_ndarray()
