"""Server settings: one pydantic-settings object, read from `CASA_*` environment variables and
overridden by `casa serve` flags. Separate from the model's config (model/config.py): these say how the
service runs, not what the model is.

List settings (auth keys, allowed origins) accept a comma-separated string in the environment, e.g.
`CASA_AUTH_KEYS=key1,key2`. Keys are secrets: `SecretStr` keeps them out of reprs and logs.

The alert sinks' URLs (webhook, MQTT broker) are checked here, when the settings are read, so that a
typo stops `casa serve` at start with a message instead of losing every alert later; server/alerts.py
parses them with the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from casa_live.model.checkpoint.assets import default_model_dir
from casa_live.server.protocol import Limits

# engine rows with --max-sessions auto: sessions are admitted while the server has headroom
# (server/overload.py), up to this many
AUTO_SESSION_ROWS = 128

DEFAULT_MODEL_DIR = default_model_dir()
MQTT_DEFAULT_PORT = 1883


def check_webhook_url(url: str) -> str:
    """`url` if it is an absolute http(s) URL with a host, else ValueError. The message never repeats
    the URL: webhook URLs often carry a token in their path or query."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: a bad one raises here, not at the first alert)
    except ValueError as e:
        raise ValueError(f"the alert webhook URL does not parse ({e})") from None
    if parts.scheme not in ("http", "https"):
        scheme = f"'{parts.scheme}://'" if parts.scheme else "no scheme"
        raise ValueError(
            f"the alert webhook must be an http:// or https:// URL, e.g. https://hooks.example.com/casa "
            f"(this one has {scheme})"
        )
    if not parts.hostname:
        raise ValueError("the alert webhook URL has no host, e.g. https://hooks.example.com/casa")
    return url


def mqtt_address(url: str) -> tuple[str, int]:
    """(host, port) of `mqtt://HOST[:PORT]` (port 1883 by default), else ValueError. Plain TCP only, and
    nothing but a host and port: no credentials, path or query, which the sink would not use."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"the MQTT URL {url!r} does not parse ({e})") from None
    if parts.scheme != "mqtt":
        raise ValueError(
            f"the MQTT URL must be mqtt://HOST:PORT, e.g. mqtt://127.0.0.1:1883 (got {url!r}; only plain "
            "TCP brokers are supported, not mqtts:// or websockets)"
        )
    if not parts.hostname:
        raise ValueError(f"the MQTT URL {url!r} has no host: mqtt://HOST:PORT, e.g. mqtt://127.0.0.1:1883")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"the MQTT URL takes a host and a port only: mqtt://{parts.hostname}:{port or MQTT_DEFAULT_PORT} "
            "(no credentials, path or query)"
        )
    return parts.hostname, port or MQTT_DEFAULT_PORT


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    # An empty variable means the default: compose files pass `CASA_MODEL_DIR: ${CASA_MODEL_DIR:-}`
    # through, and an unset one must still serve the bundled model.
    model_config = SettingsConfigDict(env_prefix="CASA_", extra="ignore", env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_dir: Path = Field(default=DEFAULT_MODEL_DIR, description="checkpoint directory to serve")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_sessions: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=32,
        description="concurrent streams = engine batch rows; auto: admit while there is measured headroom "
        f"({AUTO_SESSION_ROWS} rows)",
    )
    overload_governor: bool = Field(
        default=True,
        description="past capacity, hold live frames back so that the captioned ones finish whole "
        "(server/overload.py); off: every frame starts at once and captions are cut at their deadline",
    )
    overload_run_frames: int = Field(
        default=6,
        ge=1,
        le=100,
        description="past capacity, a session whose frames are captioned one after another keeps its turn "
        "for this many in a row before the longest-waiting sessions get its place (server/overload.py); "
        "1: every other frame, each caption after a gap",
    )
    max_context_tokens: int | None = Field(
        default=None,
        ge=64,
        description="text KV cache bound per session; default: the checkpoint's context_tokens, else 1024",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Qwen-family models: the pixel budget of one frame, resized with its aspect ratio kept "
        "to multiples of 28 (smart-resize); sizes the CASA image buffer. None = the config's image_size^2 "
        "(448^2: at most 256 image tokens). The bundled model's input is square and ignores it",
    )
    warmup: bool = True
    vision_thread: bool = Field(
        default=True,
        description="encode frames on their own thread beside the decode thread (two cores busy); "
        "see docs/engine.md",
    )
    step_pacing_ms: float = Field(
        default=0.4,
        ge=0,
        description="under load, space decode steps by this many ms per open session (capped by "
        "max_step_interval_ms) so each step serves a larger batch; 0 = step as fast as possible",
    )
    max_step_interval_ms: float = Field(default=12.0, ge=0, description="cap of the step pacing")
    gil_switch_interval_ms: float = Field(
        default=0.2,
        gt=0,
        description="Python's thread switch interval while serving (sys.setswitchinterval); "
        "short, so the decode and vision threads never wait long for the GIL",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the fixed-shape decode step (CUDA: CUDA graphs); warmed up at start. "
        "Off by default on CPU: docs/engine.md has the measurements",
    )
    threads: int = Field(
        default=1,
        ge=0,
        description="torch intra-op threads of the model worker (0 = torch's default). One thread is fastest "
        "for small models on a shared CPU: intra-op parallelism on tiny matmuls mostly adds contention",
    )

    auth_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="empty = no authentication"
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="websocket Origin allowlist; empty = any origin (set it when keys are used from browsers)",
    )

    # limits
    max_message_bytes: int = Field(default=4 << 20, ge=1024)
    max_frame_width: int = Field(default=3840, ge=16)
    max_frame_height: int = Field(default=2160, ge=16)
    max_fps: float = Field(default=10.0, gt=0)
    max_session_seconds: float = Field(default=4 * 3600.0, gt=0)
    idle_timeout_seconds: float = Field(default=30.0, gt=0)
    max_input_rate: float = Field(default=120.0, gt=0, description="binary messages per second per session")
    max_buffered_bytes: int = Field(
        default=16 << 20,
        ge=1024,
        description="input bytes a session may hold before they are decoded (queued messages, a container "
        "stream's init segment); past it the receive loop waits, and a larger MP4 init segment is "
        "frame_too_large",
    )
    max_upload_bytes: int = Field(default=512 << 20, ge=1024, description="largest POST /v1/captions body")
    max_concurrent_uploads: int = Field(
        default=2, ge=1, description="uploads received or captioned at once; more get 503 (capacity)"
    )
    stats_interval_seconds: float = Field(default=1.0, gt=0)
    drain_seconds: float = Field(
        default=30.0,
        ge=0,
        description="grace period on SIGTERM: open sessions get session.draining, their frames in flight are "
        "captioned, then they close with 1012; the process exits when all are closed or this ends "
        "(docs/scaling.md). Keep Kubernetes' terminationGracePeriodSeconds above preStop + this",
    )
    log_level: str = "info"

    # alert delivery beyond the websocket (server/alerts.py, docs/operations.md "Alert delivery")
    alert_webhook: str | None = Field(
        default=None, description="POST every watch alert as JSON to this http(s) URL; None = no webhook"
    )
    alert_webhook_secret: SecretStr | None = Field(
        default=None,
        description="sign each webhook body with HMAC-SHA256 under this secret (X-Casa-Signature header)",
    )
    mqtt_url: str | None = Field(
        default=None,
        description="publish every watch alert to this broker, mqtt://HOST:PORT (QoS 1, topic "
        "casa/alerts/SESSION/WATCH); None = no MQTT",
    )

    @field_validator("alert_webhook")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        return None if value is None else check_webhook_url(value)

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt(cls, value: str | None) -> str | None:
        if value is not None:
            mqtt_address(value)
        return value

    @model_validator(mode="after")
    def _secret_needs_a_webhook(self) -> Settings:
        # a secret alone is a half-done configuration: say so rather than sign nothing
        if self.alert_webhook_secret is not None and self.alert_webhook is None:
            raise ValueError("alert_webhook_secret is set but alert_webhook is not: set both, or neither")
        return self

    @field_validator("auth_keys", "allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    @field_validator("allowed_origins")
    @classmethod
    def _normalise_origins(cls, value: list[str]) -> list[str]:
        return [origin.rstrip("/").lower() for origin in value]

    @property
    def session_rows(self) -> int:
        """Engine batch rows for sessions: max_sessions, or AUTO_SESSION_ROWS with auto."""
        return AUTO_SESSION_ROWS if self.max_sessions == "auto" else self.max_sessions

    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_frame_width=self.max_frame_width,
            max_frame_height=self.max_frame_height,
            max_fps=self.max_fps,
            max_session_seconds=self.max_session_seconds,
            idle_timeout_seconds=self.idle_timeout_seconds,
            max_input_rate=self.max_input_rate,
            max_buffered_bytes=max(self.max_buffered_bytes, self.max_message_bytes),
        )

    @property
    def transport_max_bytes(self) -> int:
        """The websocket transport limit (uvicorn ws_max_size): messages between max_message_bytes and
        this get a non-fatal frame_too_large error; above it the transport closes with 1009."""
        return 4 * self.max_message_bytes
