"""The client's side of the wire protocol: server/protocol.py builds and parses; this adds plain words.

The clients import nothing else of the server: protocol.py depends on pydantic and the standard
library only. Unknown server event types are skipped (a newer server may send more), and an unreadable
event becomes `None` for the caller to ignore.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from casa_live.server import protocol
from casa_live.server.protocol import (
    MAX_QUESTION_CHARS,
    MAX_RESPONSES_IN_FLIGHT,
    MAX_WATCH_FRAMES,
    MAX_WATCHES,
    STREAM_PATH,
    AlertEnded,
    AlertStarted,
    CaptionDelta,
    CaptionSegment,
    Error,
    InputMarker,
    Marker,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseOutputTextDelta,
    ResponseRequest,
    ResponseResult,
    SessionClose,
    SessionClosed,
    SessionCreated,
    SessionDraining,
    SessionSettings,
    SessionUpdate,
    SessionUpdated,
    Stats,
    Watch,
)

__all__ = [
    "MAX_QUESTION_CHARS",
    "MAX_RESPONSES_IN_FLIGHT",
    "MAX_WATCHES",
    "MAX_WATCH_FRAMES",
    "STREAM_PATH",
    "AlertEnded",
    "AlertStarted",
    "CaptionDelta",
    "CaptionSegment",
    "Error",
    "Marker",
    "ResponseCreated",
    "ResponseDone",
    "ResponseOutputTextDelta",
    "ResponseResult",
    "SessionClosed",
    "SessionCreated",
    "SessionDraining",
    "SessionSettings",
    "SessionUpdated",
    "Stats",
    "Watch",
    "container_chunk",
    "describe_error",
    "image_frame",
    "marker",
    "parse_event",
    "response_cancel",
    "response_create",
    "session_close",
    "session_update",
]

# What to tell a person for each error code; the server's own message follows.
ERROR_HINTS = {
    "unauthorized": "the server needs a valid key (--token or CASA_TOKEN)",
    "capacity": "the server is full; try again shortly",
    "invalid_settings": "a session setting was rejected",
    "bad_frame": "the server could not decode a frame",
    "frame_too_large": "a frame is larger than the server accepts (lower --max-side or --jpeg-quality)",
    "unsupported_codec": "the server does not decode this codec",
    "rate_limited": "frames are arriving faster than the server allows (lower --fps)",
    "session_timeout": "the session ran past the server's time limit",
    "internal": "the server hit an internal error",
    "invalid_request": "the server refused a question",
}


def image_frame(pts_seconds: float, data: bytes) -> bytes:
    return protocol.pack_image(data, round(pts_seconds * 1e6))


def container_chunk(data: bytes) -> bytes:
    return protocol.pack_container(data)


def session_update(session: dict[str, Any], input: dict[str, Any] | None = None) -> str:
    """Raises pydantic.ValidationError for a bad setting before anything is sent."""
    event = SessionUpdate(
        session=SessionSettings(**session) if session else None,
        input=protocol.InputSettings(**input) if input else None,
    )
    return protocol.dump(event)


def marker(marker_id: str) -> str:
    return protocol.dump(InputMarker(id=marker_id))


def session_close() -> str:
    return protocol.dump(SessionClose())


def response_create(response_id: str, question: str, max_new_tokens: int | None = None) -> str:
    """A question about the stream's current frame. The event_id is the response id, so an `error`
    the server answers to it (invalid_request, rate_limited) names the question it refuses.
    Raises pydantic.ValidationError for a question the server would refuse (blank, too long)."""
    request = ResponseRequest(id=response_id, question=question, max_new_tokens=max_new_tokens)
    return protocol.dump(ResponseCreate(response=request, event_id=response_id))


def response_cancel(response_id: str) -> str:
    return protocol.dump(ResponseCancel(response_id=response_id))


def parse_event(raw: str | bytes):
    """A typed server event, or None for binary, unknown or unreadable messages."""
    if isinstance(raw, bytes):
        return None
    try:
        return protocol.parse_server_event(raw)
    except ValidationError:
        return None


def describe_error(event: Error) -> str:
    code = event.code.value if hasattr(event.code, "value") else str(event.code)
    hint = ERROR_HINTS.get(code)
    parts = [p for p in (hint, event.message.strip()) if p]
    return f"{code}: {' - '.join(parts) if parts else 'no details'}"
