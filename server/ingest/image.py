"""0x01 images: one JPEG, PNG or WebP per message, decoded with Pillow.

The format is sniffed from magic bytes: JPEG/PNG/WebP are accepted, other image formats are
`unsupported_codec`, anything else is `bad_frame`. `Image.open` reads only the header, so the
dimensions are checked against the server's limits before any pixel is decoded; Pillow's own
decompression-bomb guard stays in place (it is process-wide state, not ours to change). JPEG draft mode
decodes at reduced size when the target is the bundled model's small square (a processor that
resizes itself gets the full image: see server/ingest/frames.py). Any exception Pillow raises on a payload is
`bad_frame`: an image is client data, never a server error.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from casa_live.server.errors import BadFrame, CasaError, FrameTooLarge, UnsupportedCodec
from casa_live.server.ingest.frames import FrameLimits

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
ACCEPTED = ("jpeg", "png", "webp")


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
    """One JPEG/PNG/WebP -> the model's uint8 RGB input (see FrameLimits). Raises BadFrame,
    FrameTooLarge, UnsupportedCodec."""
    kind = sniff_image(payload)
    if kind is None:
        raise BadFrame("0x01 payload is not an image (expected JPEG, PNG or WebP after the 9-byte header)")
    if kind not in ACCEPTED:
        raise UnsupportedCodec(f"{kind} images are not accepted: send JPEG, PNG or WebP")
    try:
        img = Image.open(io.BytesIO(payload), formats=[kind.upper()])  # the header only
        if img.format is None or img.format.lower() != kind:
            raise BadFrame(f"the payload starts like {kind.upper()} but is not one")
        limits.check(*img.size)
        if limits.resize is not None:
            # the processor resizes the full decoded image (no draft mode: its output must equal
            # the processor's own on the original)
            return np.array(limits.resize(np.asarray(img.convert("RGB"))), dtype=np.uint8)
        if kind == "jpeg":
            img.draft("RGB", (limits.size, limits.size))  # DCT scaling: decode at >= the target size
        img = img.convert("RGB")
        if img.size != (limits.size, limits.size):
            img = img.resize((limits.size, limits.size), Image.Resampling.BILINEAR)
        return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    except CasaError:
        raise
    except Image.DecompressionBombError:
        raise FrameTooLarge(
            f"the {kind.upper()} image declares more pixels than this server decodes; "
            f"send at most {limits.max_width}x{limits.max_height}"
        ) from None
    except Exception as exc:  # truncated / corrupt: Pillow raises OSError, ValueError, SyntaxError, ...
        raise BadFrame(
            f"could not decode the {kind.upper()} image ({type(exc).__name__}); send one complete image "
            "per message"
        ) from None
