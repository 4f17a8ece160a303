"""A session's input path (pipeline.py: one thread per session owns it all), split by input kind:
image.py (0x01), container.py (0x02 and uploads), packet.py (0x03); frames.py is what they share."""

from casa_live.server.ingest.container import ContainerStream, decode_file, mp4_init_bytes, sniff_container
from casa_live.server.ingest.frames import FrameLimits, Resampler, to_rgb
from casa_live.server.ingest.image import decode_image, sniff_image
from casa_live.server.ingest.packet import PacketDecoder
from casa_live.server.ingest.pipeline import OFFLINE_CREDITS, Ingest, IngestListener

__all__ = [
    "OFFLINE_CREDITS",
    "ContainerStream",
    "FrameLimits",
    "Ingest",
    "IngestListener",
    "PacketDecoder",
    "Resampler",
    "decode_file",
    "decode_image",
    "mp4_init_bytes",
    "sniff_container",
    "sniff_image",
    "to_rgb",
]
