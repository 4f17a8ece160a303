"""Domain exceptions and the one place that maps them to the wire.

Everything that can go wrong in a session raises a `CasaError` subclass with a message that says how to
fix it. `report()` turns any exception into: the `error` event sent to the client, the close code (for
fatal errors), one increment of `casa_errors_total{code}` and one log line. Unexpected exceptions become
`internal` (fatal, 1011) and are logged with their traceback; their text never reaches the client.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from pydantic import ValidationError

from casa_live.server.metrics import Metrics
from casa_live.server.protocol import CLIENT_EVENT_TYPES, MAX_EVENT_ID_CHARS, CloseCode, Error, ErrorCode

log = logging.getLogger("casa.server")


class CasaError(Exception):
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    fatal: ClassVar[bool] = False
    close_code: ClassVar[CloseCode | None] = None

    def __init__(self, message: str, *, event_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.event_id = event_id


class BadJSON(CasaError):
    code = ErrorCode.BAD_JSON


class UnknownType(CasaError):
    code = ErrorCode.UNKNOWN_TYPE


class InvalidSettings(CasaError):
    code = ErrorCode.INVALID_SETTINGS


class InvalidRequest(CasaError):
    code = ErrorCode.INVALID_REQUEST


class BadFrame(CasaError):
    code = ErrorCode.BAD_FRAME


class FrameTooLarge(CasaError):
    code = ErrorCode.FRAME_TOO_LARGE


class UnsupportedCodec(CasaError):
    code = ErrorCode.UNSUPPORTED_CODEC


class RateLimited(CasaError):
    code = ErrorCode.RATE_LIMITED


class Capacity(CasaError):
    code = ErrorCode.CAPACITY
    fatal = True
    close_code = CloseCode.TRY_AGAIN


class Unauthorized(CasaError):
    code = ErrorCode.UNAUTHORIZED
    fatal = True
    close_code = CloseCode.POLICY


class SessionTimeout(CasaError):
    code = ErrorCode.SESSION_TIMEOUT
    fatal = True
    close_code = CloseCode.NORMAL


class FrameFailed(CasaError):
    """Non-fatal `internal`: one frame (or the engine step it was in) failed; the session goes on."""

    code = ErrorCode.INTERNAL


class InternalError(CasaError):
    code = ErrorCode.INTERNAL
    fatal = True
    close_code = CloseCode.INTERNAL


MAX_ECHO_CHARS = 120  # client-provided text quoted in an error message is cut to this


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """Client text made safe to quote: valid UTF-8 (lone surrogates escaped) and at most `limit` chars."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def echo_id(raw: object) -> str | None:
    """The event_id of a raw client event, if it can be echoed as is (a valid string within the schema's
    limit); otherwise None: an echo never makes the error event itself invalid."""
    if not isinstance(raw, dict):
        return None
    value = raw.get("event_id")
    if not isinstance(value, str) or len(value) > MAX_EVENT_ID_CHARS:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def from_validation_error(exc: ValidationError, *, raw: object = None) -> CasaError:
    """Classify a failed client-event parse: bad JSON, an unknown `type`, or invalid content."""
    try:
        return _classify(exc, raw)
    except Exception:  # classification must never turn a client mistake into a server error
        log.exception("could not classify a client event's validation error")
        return BadJSON("the text message is not a valid client event; see docs/protocol.md")


def _classify(exc: ValidationError, raw: object) -> CasaError:
    errors = exc.errors(include_url=False, include_input=False, include_context=True)
    kinds = {e["type"] for e in errors}
    expected = ", ".join(CLIENT_EVENT_TYPES)
    if "json_invalid" in kinds:
        return BadJSON(f"text messages must be JSON objects with a 'type': {clip(errors[0]['msg'])}")
    if kinds & {"model_attributes_type", "model_type", "dict_type"} and all(not e["loc"] for e in errors):
        return BadJSON("text messages must be JSON objects with a 'type' field")
    if "union_tag_invalid" in kinds:
        tag = errors[0].get("ctx", {}).get("tag", "?")
        return UnknownType(f"unknown event type {clip(tag)!r}; the server accepts {expected}")
    if "union_tag_not_found" in kinds:
        return UnknownType(f"the event has no 'type' field; the server accepts {expected}")
    event_type = clip(errors[0]["loc"][0], 40) if errors and errors[0]["loc"] else None
    detail = "; ".join(
        f"{'.'.join(clip(p, 40) for p in e['loc'][1:]) or '(event)'}: {clip(e['msg'], 300)}"
        for e in errors[:8]
    )
    if len(errors) > 8:
        detail += f"; and {len(errors) - 8} more"
    event_id = echo_id(raw)
    if event_type == "session.update":
        return InvalidSettings(f"session.update rejected, settings unchanged: {detail}", event_id=event_id)
    if event_type in ("response.create", "response.cancel"):
        return InvalidRequest(f"{event_type} rejected: {detail}", event_id=event_id)
    return BadJSON(f"malformed {event_type} event: {detail}", event_id=event_id)


def report(
    exc: BaseException, metrics: Metrics, *, session_id: str | None = None
) -> tuple[Error, CloseCode | None]:
    """The one mapping point: exception -> (error event, close code or None), counted and logged."""
    if not isinstance(exc, CasaError):
        log.error("session %s: internal error", session_id, exc_info=exc)
        exc = InternalError("internal server error; the session was closed, reconnect to start a new one")
    else:
        level = logging.WARNING if exc.fatal else logging.INFO
        log.log(level, "session %s: %s: %s", session_id, exc.code.value, exc.message)
    metrics.errors_total.labels(exc.code.value).inc()
    try:
        event = Error(code=exc.code, message=clip(exc.message, 2000), fatal=exc.fatal, event_id=exc.event_id)
    except ValidationError:  # an event_id the schema refuses: drop the echo, keep the error
        event = Error(code=exc.code, message=clip(exc.message, 2000), fatal=exc.fatal)
    return event, (exc.close_code if exc.fatal else None)
