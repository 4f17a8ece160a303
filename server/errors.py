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

from server.metrics import Metrics
from server.protocol import CLIENT_EVENT_TYPES, CloseCode, Error, ErrorCode

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


def from_validation_error(exc: ValidationError, *, raw: object = None) -> CasaError:
    """Classify a failed client-event parse: bad JSON, an unknown `type`, or invalid content."""
    errors = exc.errors(include_url=False)
    kinds = {e["type"] for e in errors}
    expected = ", ".join(CLIENT_EVENT_TYPES)
    if "json_invalid" in kinds:
        return BadJSON(f"text messages must be JSON objects with a 'type': {errors[0]['msg']}")
    if kinds & {"model_attributes_type", "model_type", "dict_type"} and all(not e["loc"] for e in errors):
        return BadJSON("text messages must be JSON objects with a 'type' field")
    if "union_tag_invalid" in kinds:
        tag = errors[0].get("ctx", {}).get("tag", "?")
        return UnknownType(f"unknown event type {tag!r}; the server accepts {expected}")
    if "union_tag_not_found" in kinds:
        return UnknownType(f"the event has no 'type' field; the server accepts {expected}")
    event_type = errors[0]["loc"][0] if errors and errors[0]["loc"] else None
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or '(event)'}: {e['msg']}" for e in errors)
    event_id = raw.get("event_id") if isinstance(raw, dict) and isinstance(raw.get("event_id"), str) else None
    if event_type == "session.update":
        return InvalidSettings(f"session.update rejected, settings unchanged: {detail}", event_id=event_id)
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
    event = Error(code=exc.code, message=exc.message, fatal=exc.fatal, event_id=exc.event_id)
    return event, (exc.close_code if exc.fatal else None)
