"""0x03 encoded packets: one access unit per message into one PyAV codec context (H.264 Annex B, VP8,
VP9), no parser (no added frame of latency). Default slice threading: a frame-threaded standalone
context can hang the process when garbage-collected."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np

from casa_live.server.errors import BadFrame, CasaError, UnsupportedCodec
from casa_live.server.ingest.frames import FrameLimits, to_rgb
from casa_live.server.protocol import PACKET_CODECS

_US = Fraction(1, 1_000_000)


class PacketDecoder:
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
        self, payload: bytes, pts_us: int, keep: Callable[[float], bool]
    ) -> tuple[list[tuple[np.ndarray, float]], int]:
        """Returns (kept frames as (rgb, pts seconds), number of frames decoded). `pts_us` is bounded by
        the protocol (|pts| <= 2**53 us), so the decoder's int64 arithmetic cannot overflow."""
        packet = av.Packet(payload)
        packet.pts = pts_us
        packet.time_base = _US
        try:
            frames = self.ctx.decode(packet)
        except Exception as exc:  # FFmpeg's verdict on client data: never a server error
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise BadFrame(
                f"{self.codec} decoder rejected the packet ({reason}): send one complete access unit "
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
            t = float(frame.pts * _US) if frame.pts is not None else pts_us / 1e6
            if keep(t):
                try:
                    out.append((to_rgb(frame, self.limits), t))
                except CasaError:
                    raise
                except Exception as exc:
                    raise BadFrame(f"the decoded {self.codec} frame could not be converted ({exc})") from None
        return out, len(frames)
