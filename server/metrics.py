"""Prometheus metrics, in one place (docs/operations.md describes each one).

Choices:
- One `Metrics` object per app, on its own `CollectorRegistry` (no global state, so tests can build
  many apps and read exact deltas); `/metrics` serves that registry as a plain route.
- Prefix `casa_`, base units (seconds), counters end in `_total`; no session id or prompt as a label.
- Buckets are sized to the real-time budget of a 2 fps stream (500 ms per frame): fine resolution
  below 500 ms where the targets live (p95 frame latency < 100 ms on CPU, TTFT <= 30 ms on GPU),
  a few coarse buckets above it to show overload.
- Every label value is created at start so a dashboard sees zeros, not missing series.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from casa_live.server.protocol import ErrorCode

SESSION_OUTCOMES = ("closed", "disconnected", "timeout", "error", "shutdown", "drained")
REJECT_REASONS = ("capacity", "unauthorized", "origin", "unavailable", "draining")
DROP_REASONS = ("stale", "overload", "resample", "rate_limited", "closed")
RESPONSE_STATUSES = ("completed", "incomplete", "cancelled", "failed")
ALERT_EVENTS = ("started", "ended")
ALERT_SINKS = ("webhook", "mqtt")
DELIVERY_OUTCOMES = ("delivered", "retried", "failed", "dropped")

# seconds
_DECODE = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
_MODEL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
_LATENCY = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)
_TOKEN = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5)
_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the exposition for no dashboard use
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge(
            "casa_sessions_active", "Websocket sessions holding a model slot now.", registry=r
        )
        self.sessions_total = Counter(
            "casa_sessions_total",
            "Sessions that ended, by outcome (closed = session.close, disconnected = client went away, "
            "timeout = idle or max duration, error = fatal error, shutdown = cut by the server stopping, "
            "drained = closed with 1012 by a graceful drain after its frames in flight were captioned).",
            ["outcome"],
            registry=r,
        )
        self.sessions_rejected_total = Counter(
            "casa_sessions_rejected_total",
            "Websocket connections refused before a session started, by reason.",
            ["reason"],
            registry=r,
        )
        self.session_slots = Gauge(
            "casa_session_slots",
            "Session slots of this replica (max_sessions = engine batch rows).",
            registry=r,
        )
        self.session_slots_free = Gauge(
            "casa_session_slots_free",
            "Session slots free now: the headroom an autoscaler and /readyz look at (0 while draining).",
            registry=r,
        )
        self.overloaded = Gauge(
            "casa_overloaded",
            "1 while live frames are held back past capacity (server/overload.py; /readyz answers 503), else 0.",
            registry=r,
        )
        self.frame_budget_headroom = Gauge(
            "casa_frame_budget_headroom",
            "Share of a live frame's budget (1/fps) its caption leaves unused, moving average; 0 while overloaded.",
            registry=r,
        )
        self.frames_in_flight_cap = Gauge(
            "casa_frames_in_flight_cap",
            "Live frames the overload governor lets run at once (the session slots when it does not bind).",
            registry=r,
        )
        self.draining = Gauge(
            "casa_draining",
            "1 while the server drains its sessions before stopping (SIGTERM), else 0.",
            registry=r,
        )
        self.frames_received_total = Counter(
            "casa_frames_received_total",
            "Video frames decoded from client input (before fps sampling).",
            registry=r,
        )
        self.frames_dropped_total = Counter(
            "casa_frames_dropped_total",
            "Frames not captioned, by reason (stale = a newer frame came while its session's previous caption "
            "was running, latest wins; overload = it waited for a place past capacity, server/overload.py; "
            "resample = above "
            "the session fps; rate_limited = input faster than max_input_rate; closed = pending at session end).",
            ["reason"],
            registry=r,
        )
        self.frames_captioned_total = Counter(
            "casa_frames_captioned_total", "Frames whose caption was finished and sent.", registry=r
        )
        self.captions_restated_total = Counter(
            "casa_captions_restated_total",
            "Captions that restate the scene after a gap in a live stream (its row started over: the "
            "model's captions narrate changes, server/overload.py).",
            registry=r,
        )
        self.errors_total = Counter(
            "casa_errors_total", "Error events sent to clients, by protocol error code.", ["code"], registry=r
        )
        self.generated_tokens_total = Counter(
            "casa_generated_tokens_total", "Tokens sampled by the model, stop tokens included.", registry=r
        )

        self.frame_decode_seconds = Histogram(
            "casa_frame_decode_seconds",
            "Time to decode one input message to RGB frames at model size (image, or container/packet frame).",
            buckets=_DECODE,
            registry=r,
        )
        self.vision_encode_seconds = Histogram(
            "casa_vision_encode_seconds",
            "Vision tower time per frame (a batch of frames encoded together counts its share for each).",
            buckets=_MODEL,
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "casa_prefill_seconds",
            "Per engine step with frame prefills: time of the step that prefilled frame template tokens.",
            buckets=_MODEL,
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "casa_time_to_first_token_seconds",
            "Frame received (decoded) -> first caption token sampled.",
            buckets=_LATENCY,
            registry=r,
        )
        self.frame_latency_seconds = Histogram(
            "casa_frame_latency_seconds",
            "Frame received (decoded) -> caption final (segment emitted by the worker).",
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "casa_inter_token_seconds",
            "Time between consecutive tokens of one frame's caption.",
            buckets=_TOKEN,
            registry=r,
        )
        self.step_seconds = Histogram(
            "casa_step_seconds",
            "Duration of one batched engine step (all sessions).",
            buckets=_MODEL,
            registry=r,
        )
        self.batch_size = Histogram(
            "casa_batch_size", "Rows (sessions) with work in one engine step.", buckets=_BATCH, registry=r
        )
        self.kv_cache_tokens = Gauge(
            "casa_kv_cache_tokens", "Text tokens held in the KV cache, summed over sessions.", registry=r
        )
        self.stream_lag_seconds = Gauge(
            "casa_stream_lag_seconds",
            "How far the latest caption trails the live stream, worst session (0 when none).",
            registry=r,
        )
        self.responses_total = Counter(
            "casa_responses_total",
            "Answers to questions (response.create) that ended, by status (completed = a stop token, "
            "incomplete = cut by max_new_tokens, cancelled, failed).",
            ["status"],
            registry=r,
        )
        self.response_ttft_seconds = Histogram(
            "casa_response_time_to_first_token_seconds",
            "Question received -> first answer token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.response_latency_seconds = Histogram(
            "casa_response_latency_seconds",
            "Question received -> answer done (completed or incomplete answers).",
            buckets=_LATENCY,
            registry=r,
        )
        self.alerts_total = Counter(
            "casa_alerts_total",
            "Watch alerts raised, by event (started, ended; forced ends of a removed watch or a closed "
            "session count as ended), whether or not a sink is configured.",
            ["event"],
            registry=r,
        )
        self.alert_deliveries_total = Counter(
            "casa_alert_deliveries_total",
            "Alert deliveries to a sink, by sink and outcome (delivered = acknowledged: a 2xx answer or an "
            "MQTT PUBACK; retried = one more webhook attempt after a failed one; failed = given up after "
            "the last try, or cut by shutdown; dropped = not queued: the sink's queue was full or it was "
            "stopped).",
            ["sink", "outcome"],
            registry=r,
        )
        self.watch_scoring_seconds = Histogram(
            "casa_watch_scoring_seconds",
            "Model time spent scoring the watches of one frame (all its watches together).",
            buckets=_MODEL,
            registry=r,
        )
        self.build_info = Gauge(
            "casa_build_info", "Served model and protocol version.", ["model", "protocol"], registry=r
        )

        for outcome in SESSION_OUTCOMES:
            self.sessions_total.labels(outcome)
        for reason in REJECT_REASONS:
            self.sessions_rejected_total.labels(reason)
        for reason in DROP_REASONS:
            self.frames_dropped_total.labels(reason)
        for code in ErrorCode:
            self.errors_total.labels(code.value)
        for status in RESPONSE_STATUSES:
            self.responses_total.labels(status)
        for event in ALERT_EVENTS:
            self.alerts_total.labels(event)
        for sink in ALERT_SINKS:
            for outcome in DELIVERY_OUTCOMES:
                self.alert_deliveries_total.labels(sink, outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
