"""The casa-live websocket protocol: the single source of truth for both ends of `/v1/stream`.

Design choices (documented for users in docs/protocol.md):
- JSON text messages are typed pydantic events, one class per `type`, joined in a discriminated union
  (`ClientEvent`, `ServerEvent`) in the style of the OpenAI Realtime API: control flows as text,
  media as binary.
- Binary messages carry media. Their first byte is the kind (moshi's framing): 0x01 one image with a
  pts, 0x02 the next chunk of a container stream (pts come from the container), 0x03 one encoded
  access unit with a pts. pts are signed 64-bit big-endian microseconds; times in JSON are seconds.
- Client settings models forbid unknown keys, so a typo is an `invalid_settings` error and never a
  silently ignored field. Client events themselves ignore extra keys (forward compatibility).
- This module imports only pydantic and the standard library: the clients import it without the
  server's dependencies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from casa_live.model.engine.settings import MIN_TEMPERATURE as ENGINE_MIN_TEMPERATURE
from casa_live.model.engine.settings import SETTING_BOUNDS

PROTOCOL_VERSION = 1
STREAM_PATH = "/v1/stream"

# Codecs accepted for 0x03 encoded packets, and image formats accepted for 0x01 frames.
PACKET_CODECS = ("h264", "vp8", "vp9")
IMAGE_FORMATS = ("jpeg", "png", "webp")
CONTAINER_FORMATS = ("webm", "matroska", "mp4", "mpegts", "ivf")


class ErrorCode(str, Enum):
    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_SETTINGS = "invalid_settings"
    INVALID_REQUEST = "invalid_request"  # a response.create / response.cancel the server cannot take
    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNSUPPORTED_CODEC = "unsupported_codec"
    RATE_LIMITED = "rate_limited"
    CAPACITY = "capacity"
    UNAUTHORIZED = "unauthorized"
    SESSION_TIMEOUT = "session_timeout"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    NORMAL = 1000  # session.close, or the server ended the session (timeout) after flushing
    POLICY = 1008  # authentication failed, or the Origin is not allowed
    TOO_BIG = 1009  # a message above the transport limit
    INTERNAL = 1011  # the server failed for this session
    SERVICE_RESTART = 1012  # the server drained this session (it is stopping): reconnect, to another replica
    TRY_AGAIN = 1013  # capacity: every model slot is taken (or the server is draining), retry later


# ---------------------------------------------------------------------------------------------------
# Binary messages
# ---------------------------------------------------------------------------------------------------


class BinaryKind(IntEnum):
    IMAGE = 0x01  # kind, int64 pts_us, one JPEG / PNG / WebP image
    CONTAINER = 0x02  # kind, the next bytes of a WebM / Matroska / fragmented MP4 / MPEG-TS / IVF stream
    PACKET = 0x03  # kind, int64 pts_us, one encoded access unit (H.264 Annex B, VP8, VP9)


_PTS = struct.Struct(">q")
# |pts| above this is refused (bad_frame): 2**53 us (about 285 years) is exact as a float in seconds and
# leaves the decoder's int64 time arithmetic (rescaling to other time bases) far from overflow.
MAX_PTS_US = 1 << 53
HEADER_BYTES = {BinaryKind.IMAGE: 1 + _PTS.size, BinaryKind.CONTAINER: 1, BinaryKind.PACKET: 1 + _PTS.size}


class BinaryMessageError(ValueError):
    """A binary message that cannot be split into kind, pts and payload."""

    def __init__(self, message: str, *, unknown_kind: bool = False) -> None:
        super().__init__(message)
        self.unknown_kind = unknown_kind


@dataclass(frozen=True)
class BinaryMessage:
    kind: BinaryKind
    pts_us: int | None  # None for container chunks: their pts come from the container
    payload: bytes

    @property
    def pts(self) -> float | None:
        return None if self.pts_us is None else self.pts_us / 1e6


def pack_image(image: bytes, pts_us: int) -> bytes:
    """0x01: one encoded image (JPEG, PNG or WebP) shown at `pts_us` microseconds."""
    return bytes([BinaryKind.IMAGE]) + _PTS.pack(pts_us) + image


def pack_container(chunk: bytes) -> bytes:
    """0x02: the next chunk of a container stream; the first chunk must start with its header."""
    return bytes([BinaryKind.CONTAINER]) + chunk


def pack_packet(access_unit: bytes, pts_us: int) -> bytes:
    """0x03: one encoded access unit of the codec named by session.update input.codec."""
    return bytes([BinaryKind.PACKET]) + _PTS.pack(pts_us) + access_unit


def unpack(message: bytes) -> BinaryMessage:
    """Split a binary message; raises BinaryMessageError (a ValueError) with a fix-it message."""
    if not message:
        raise BinaryMessageError("empty binary message: the first byte must be the kind (0x01, 0x02 or 0x03)")
    try:
        kind = BinaryKind(message[0])
    except ValueError:
        raise BinaryMessageError(
            f"unknown binary message kind 0x{message[0]:02x}: use 0x01 (image), 0x02 (container) "
            "or 0x03 (encoded packet)",
            unknown_kind=True,
        ) from None
    header = HEADER_BYTES[kind]
    if len(message) <= header:
        raise BinaryMessageError(
            f"binary message of kind 0x{kind:02x} is {len(message)} bytes; it needs a {header}-byte header "
            "(kind + 8-byte big-endian pts in microseconds where the kind has one) and a non-empty payload"
        )
    pts_us = None if kind == BinaryKind.CONTAINER else _PTS.unpack_from(message, 1)[0]
    if pts_us is not None and abs(pts_us) > MAX_PTS_US:
        raise BinaryMessageError(
            f"binary message of kind 0x{kind:02x} has pts {pts_us} us; |pts| must be at most {MAX_PTS_US} us "
            "(2**53): send timestamps in microseconds from the start of the stream"
        )
    return BinaryMessage(kind, pts_us, bytes(message[header:]))


# ---------------------------------------------------------------------------------------------------
# JSON events
# ---------------------------------------------------------------------------------------------------


# Bounds of every session setting: the ranges the sampler computes safely, from their one source
# (model/engine/settings.py, which the engine checks again at its boundary, SessionSettings.validate).
MAX_PROMPT_CHARS = 2000
MIN_FPS = 0.01  # one frame per 100 s
MAX_FPS = 1000.0  # the schema's ceiling; the server's own max_fps is checked as well
MAX_NEW_TOKENS = int(SETTING_BOUNDS["max_new_tokens"][1])
MIN_TEMPERATURE = ENGINE_MIN_TEMPERATURE  # temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]
MAX_TEMPERATURE = SETTING_BOUNDS["temperature"][1]
MAX_TOP_K = int(SETTING_BOUNDS["top_k"][1])
MAX_REPETITION_PENALTY = SETTING_BOUNDS["repetition_penalty"][1]
MIN_EOS_BIAS, MAX_EOS_BIAS = SETTING_BOUNDS["eos_bias"]  # it multiplies (or divides) the stop logits
MAX_NO_REPEAT_NGRAM = int(SETTING_BOUNDS["no_repeat_ngram"][1])
MAX_SEED = int(SETTING_BOUNDS["seed"][1])
MAX_EVENT_ID_CHARS = 128
MAX_MARKER_ID_CHARS = 256


def _utf8(value: str | None) -> str | None:
    """Strings must be valid Unicode: a lone surrogate (JSON "\\ud800") cannot be tokenized or echoed."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the string holds a lone UTF-16 surrogate; send valid Unicode text") from None
    return value


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_id: str | None = Field(
        default=None, max_length=MAX_EVENT_ID_CHARS, description="optional client-chosen id"
    )

    _check_event_id = field_validator("event_id")(_utf8)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _bounded(name: str, description: str | None = None) -> Any:
    """An optional session setting bounded to its range in SETTING_BOUNDS."""
    lo, hi = SETTING_BOUNDS[name]
    return Field(default=None, ge=lo, le=hi, description=description)


MAX_WATCHES = 8  # per session
MAX_WATCH_ID_CHARS = 64
MAX_WATCH_FRAMES = 100
MAX_METADATA_KEYS = 16
MAX_METADATA_CHARS = 256


class Watch(_Strict):
    """A yes/no alert rule the model scores on every captioned frame (docs/protocol.md, "Watches")."""

    id: str = Field(min_length=1, max_length=MAX_WATCH_ID_CHARS, description="unique in the session")
    question: str = Field(
        min_length=1, max_length=1000, description="a yes/no question about the current frame"
    )
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="alert when P(yes) >= threshold")
    min_frames: int = Field(
        default=1, ge=1, le=MAX_WATCH_FRAMES, description="consecutive frames at or above it to start"
    )
    clear_frames: int = Field(
        default=1, ge=1, le=MAX_WATCH_FRAMES, description="consecutive frames below it to end"
    )
    cooldown_s: float = Field(
        default=0.0, ge=0.0, description="no new start within this many seconds (stream time) of an end"
    )

    _check_text = field_validator("id", "question")(_utf8)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the watch's question is blank; send the text of a yes/no question")
        return value


class SessionSettings(_Strict):
    """Per-session settings. In session.update every field is optional (None = keep the current value);
    session.created and session.updated echo the full effective settings. Every field is bounded to the
    range the sampler can compute (the constants above; docs/protocol.md lists them)."""

    prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="user prompt for the stream"
    )
    fps: float | None = Field(
        default=None, ge=MIN_FPS, le=MAX_FPS, description="frames captioned per second of video"
    )
    max_new_tokens: int | None = _bounded("max_new_tokens")
    min_new_tokens: int | None = _bounded("min_new_tokens", "stop tokens banned before this")
    temperature: float | None = _bounded(
        "temperature", f"0 = greedy, else {MIN_TEMPERATURE}-{MAX_TEMPERATURE}"
    )
    top_k: int | None = _bounded("top_k", "0 = no top-k filter")
    repetition_penalty: float | None = _bounded("repetition_penalty")
    no_repeat_ngram: int | None = _bounded("no_repeat_ngram")
    seed: int | None = _bounded("seed", "sampling seed (temperature > 0)")
    top_p: float | None = _bounded("top_p", "nucleus filter when sampling (1 = off), after top_k")
    eos_bias: float | None = _bounded(
        "eos_bias", "stop-token logit bias: below 1 captions run longer (1 = off)"
    )
    truncated_close: Literal["last_stop", "cut_word"] | None = Field(
        default=None,
        description="what closes a caption cut short by max_new_tokens or the deadline: the stop token the "
        "model emitted last (last_stop) or the cut word then the first stop token (cut_word)",
    )
    mode: Literal["live", "offline"] | None = Field(
        default=None,
        description="live: latest frame wins, stale frames are dropped, each frame's generation stops when "
        "its real-time budget 1/fps is spent; offline: every sampled frame is captioned in full "
        "(backpressure instead of drops), for files and evaluation",
    )

    watches: list[Watch] | None = Field(
        default=None,
        max_length=MAX_WATCHES,
        description="yes/no alert rules scored on every captioned frame; sending it replaces the list "
        "([] clears it)",
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        description=f"string keys and values (at most {MAX_METADATA_KEYS} keys, {MAX_METADATA_CHARS} "
        'characters each), echoed in every alert, e.g. {"camera": "door-3"}',
    )

    _check_prompt = field_validator("prompt")(_utf8)

    @field_validator("watches")
    @classmethod
    def _unique_watch_ids(cls, value: list[Watch] | None) -> list[Watch] | None:
        if value is not None:
            ids = [w.id for w in value]
            if dup := sorted({i for i in ids if ids.count(i) > 1}):
                raise ValueError(f"watch ids must be unique in the session; repeated: {', '.join(dup)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata has {len(value)} keys; at most {MAX_METADATA_KEYS}")
        for k, v in value.items():
            if len(k) > MAX_METADATA_CHARS or len(v) > MAX_METADATA_CHARS:
                raise ValueError(f"metadata keys and values are at most {MAX_METADATA_CHARS} characters")
            _utf8(k), _utf8(v)
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}; "
                f"below {MIN_TEMPERATURE} the sampler's division overflows"
            )
        return value


class InputSettings(_Strict):
    """How binary media is to be read. `codec` is required before 0x03 packets; `container` optionally
    names the 0x02 container format (otherwise it is recognised from the first chunk's header)."""

    codec: str | None = Field(default=None, max_length=32, description="h264 | vp8 | vp9, for 0x03 packets")
    container: str | None = Field(
        default=None, max_length=32, description="webm | matroska | mp4 | mpegts | ivf, for 0x02"
    )


class Limits(BaseModel):
    max_message_bytes: int
    max_frame_width: int
    max_frame_height: int
    max_fps: float
    max_session_seconds: float
    idle_timeout_seconds: float
    max_input_rate: float = Field(description="binary messages per second before rate_limited")
    max_buffered_bytes: int | None = Field(
        default=None, description="input bytes held per session before decoding (an MP4 init segment's cap)"
    )


# --- client -> server ---


class SessionUpdate(_Event):
    type: Literal["session.update"] = "session.update"
    session: SessionSettings | None = None
    input: InputSettings | None = None


class InputMarker(_Event):
    type: Literal["input.marker"] = "input.marker"
    id: str = Field(
        max_length=MAX_MARKER_ID_CHARS,
        description="echoed in a `marker` event once all input before it is captioned",
    )

    _check_id = field_validator("id")(_utf8)


class SessionClose(_Event):
    type: Literal["session.close"] = "session.close"


# --- questions: the OpenAI Realtime response lifecycle, answered on a side branch of the stream ---

MAX_RESPONSE_ID_CHARS = 128
MAX_QUESTION_CHARS = 1000
MAX_RESPONSES_IN_FLIGHT = 4  # per session; a fifth is rate_limited


class ResponseRequest(_Strict):
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_RESPONSE_ID_CHARS,
        description="the client's id for the answer (default: the server assigns resp_...)",
    )
    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, description="asked about the current frame"
    )
    max_new_tokens: int | None = _bounded("max_new_tokens")

    _check_text = field_validator("id", "question")(_utf8)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the question is blank; send the text of a question")
        return value


class ResponseCreate(_Event):
    """Ask a question about what the stream shows now. It is answered on a side branch of the
    session: the captions never see it."""

    type: Literal["response.create"] = "response.create"
    response: ResponseRequest


class ResponseCancel(_Event):
    type: Literal["response.cancel"] = "response.cancel"
    response_id: str = Field(min_length=1, max_length=MAX_RESPONSE_ID_CHARS)


ClientEvent = Annotated[
    SessionUpdate | InputMarker | SessionClose | ResponseCreate | ResponseCancel, Field(discriminator="type")
]
CLIENT_EVENT_TYPES = ("session.update", "input.marker", "session.close", "response.create", "response.cancel")

# --- server -> client ---


class SessionCreated(_Event):
    type: Literal["session.created"] = "session.created"
    session_id: str
    model: str
    protocol_version: int = PROTOCOL_VERSION
    image_size: int = Field(
        description="the model's frame side: frames are resized to image_size x image_size (the bundled "
        "model), or within image_size^2 pixels with their aspect ratio kept (Qwen-family models)"
    )
    limits: Limits
    settings: SessionSettings
    input: InputSettings


class SessionUpdated(_Event):
    type: Literal["session.updated"] = "session.updated"
    settings: SessionSettings
    input: InputSettings


class CaptionDelta(_Event):
    type: Literal["caption.delta"] = "caption.delta"
    frame: int = Field(description="index of the captioned frame in this session, from 0")
    pts: float = Field(description="the frame's presentation time, seconds")
    text: str = Field(description="the next piece of the frame's caption")


class CaptionSegment(_Event):
    type: Literal["caption.segment"] = "caption.segment"
    frame: int
    start: float = Field(description="seconds: the frame's pts")
    end: float = Field(description="seconds: start + 1/fps (the frame's slot at the session fps)")
    text: str = Field(description="the frame's full caption (the concatenation of its deltas)")
    tokens: int = Field(description="tokens generated for the frame, stop token included")
    reason: Literal["stop", "length", "deadline"]
    ttft_ms: float = Field(description="frame received -> first token")
    latency_ms: float = Field(description="frame received -> caption final")
    watch_scores: dict[str, float] | None = Field(
        default=None, description="watch id -> P(yes) on this frame, when the session has watches"
    )
    restated: bool | None = Field(
        default=None,
        description="true when the caption restates the scene, as a stream's first does: frames before it "
        "were not captioned (a gap: dropped past capacity, or stale) and the model's captions narrate "
        "changes; absent otherwise",
    )


class Stats(_Event):
    type: Literal["stats"] = "stats"
    frames_received: int = Field(description="frames decoded from the input")
    frames_skipped: int = Field(description="frames above the session fps, skipped by design")
    frames_captioned: int
    frames_dropped: int = Field(description="frames dropped because a newer frame was waiting (live mode)")
    frames_dropped_reasons: dict[str, int] | None = Field(
        default=None,
        description="frames_dropped by reason (when any): stale (the session's previous caption was still "
        "running), overload (the server is past capacity and captions fewer frames, each in full)",
    )
    caption_rate: float | None = Field(
        default=None, description="captions finished per second over the last 10 s (the effective rate)"
    )
    lag_ms: float = Field(description="how far the latest caption trails the live stream")
    kv_tokens: int = Field(description="text tokens held in this session's KV cache")


class Marker(_Event):
    type: Literal["marker"] = "marker"
    id: str


class Error(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    fatal: bool = Field(description="true: the server closes the connection after this event")


class SessionClosed(_Event):
    type: Literal["session.closed"] = "session.closed"
    reason: str = Field(description="client | session_timeout | idle_timeout | error | shutdown | draining")
    stats: Stats | None = None


class ResponseStarted(BaseModel):
    id: str
    frame: int = Field(description="the frame whose image the answer sees (the latest captioned)")


class ResponseCreated(_Event):
    type: Literal["response.created"] = "response.created"
    response: ResponseStarted


class ResponseOutputTextDelta(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    response_id: str
    delta: str


class ResponseResult(BaseModel):
    id: str
    frame: int | None = Field(default=None, description="the frame the answer saw (absent: it never started)")
    pts: float | None = Field(default=None, description="that frame's presentation time, seconds")
    text: str
    status: Literal["completed", "incomplete", "cancelled", "failed"] = Field(
        description="completed: ended by a stop token; incomplete: cut by max_new_tokens; cancelled: "
        "by response.cancel or the session's end; failed: an internal error (the session goes on)"
    )
    ttft_ms: float | None = Field(
        default=None, description="question received -> first answer token (absent: no token)"
    )
    latency_ms: float = Field(description="question received -> done")


class ResponseDone(_Event):
    type: Literal["response.done"] = "response.done"
    response: ResponseResult


class AlertStarted(_Event):
    """A watch's score stayed at or above its threshold for min_frames frames."""

    type: Literal["alert.started"] = "alert.started"
    watch_id: str
    frame: int = Field(description="the frame that started it")
    pts: float = Field(description="that frame's presentation time, seconds")
    score: float = Field(description="the watch's P(yes) on that frame")
    metadata: dict[str, str] | None = Field(default=None, description="the session's metadata")


class AlertEnded(_Event):
    """A watch's score stayed below its threshold for clear_frames frames, or the alert was ended
    by the watch's removal or the session's end (`reason`)."""

    type: Literal["alert.ended"] = "alert.ended"
    watch_id: str
    frame: int = Field(description="the frame that ended it (the last frame scored, on a forced end)")
    pts: float
    score: float = Field(description="the watch's P(yes) on that frame")
    metadata: dict[str, str] | None = None
    reason: Literal["watch_removed", "session_closed"] | None = Field(
        default=None, description="absent: the score fell; otherwise why the alert was ended"
    )


class SessionDraining(_Event):
    """The server is stopping (SIGTERM: a rollout, a scale-down, a node drain). It captions the frames
    already sent, then sends `session.closed` (reason `draining`) and closes with 1012; the client
    should stop sending and reconnect, which a load balancer routes to another replica."""

    type: Literal["session.draining"] = "session.draining"
    deadline_seconds: float = Field(description="seconds from now by which the server closes the session")
    reason: str = Field(default="shutdown", description="why the server drains (shutdown)")


# every event the server sends; ServerEvent adds the discriminator that parses them
AnyServerEvent = (
    SessionCreated
    | SessionUpdated
    | CaptionDelta
    | CaptionSegment
    | Stats
    | Marker
    | Error
    | SessionClosed
    | SessionDraining
    | ResponseCreated
    | ResponseOutputTextDelta
    | ResponseDone
    | AlertStarted
    | AlertEnded
)
ServerEvent = Annotated[AnyServerEvent, Field(discriminator="type")]

client_event_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
server_event_adapter: TypeAdapter[ServerEvent] = TypeAdapter(ServerEvent)


def parse_client_event(
    text: str | bytes,
) -> SessionUpdate | InputMarker | SessionClose | ResponseCreate | ResponseCancel:
    """Raises pydantic.ValidationError; the server maps it to bad_json / unknown_type / invalid_settings."""
    return client_event_adapter.validate_json(text)


def parse_server_event(text: str | bytes) -> AnyServerEvent:
    return server_event_adapter.validate_json(text)


def dump(event: BaseModel) -> str:
    """Serialise an event to its wire JSON (None-valued event_id left out)."""
    return event.model_dump_json(exclude_none=True)
