"""Watch alerts: the debounce that turns per-frame yes/no scores into started/ended events, and their
delivery beyond the websocket (a webhook, an MQTT broker). Nothing here knows the model: the session
scores its watches and feeds the scores to one `AlertTracker` per watch, then hands each event, as an
`Alert`, to `ServerContext.alerts` (an `AlertDispatcher`). docs/operations.md "Alert delivery" is the
operator's view of it.

Design choices:
- The debounce runs on stream time (pts), not the wall clock, so an uploaded file captioned faster than
  real time raises the same alerts as the same video streamed live.
- Delivery never slows the session nor fails it: `publish` only enqueues (bounded), and a full queue
  drops the alert and counts it. A receiver that is down costs alerts, never captions.
- At-least-once: a webhook attempt that timed out may have reached the receiver, and MQTT QoS 1 may
  resend after a reconnect. Receivers deduplicate on (session_id, watch_id, event, frame).
- One delivery worker per sink keeps each sink's alerts in the order they were raised.
- Logs are one line when a sink starts failing and one when it recovers (`_Streak`), not one per
  alert: a receiver down for an hour would otherwise write thousands of identical lines. The counts
  are in `casa_alert_deliveries_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args
from urllib.parse import quote, urlsplit

import httpx
import paho.mqtt.client as mqtt
from prometheus_client import Counter

from casa_live.server.metrics import DELIVERY_OUTCOMES, Metrics
from casa_live.server.settings import Settings, check_webhook_url, mqtt_address

log = logging.getLogger("casa.alerts")

AlertEvent = Literal["started", "ended"]
EndReason = Literal["watch_removed", "session_closed"]
SIGNATURE_HEADER = "X-Casa-Signature"
TOPIC_PREFIX = "casa/alerts"


# ------------------------------------------------------------------------------------------ debounce


class AlertTracker:
    """The debounce of one watch: a frame is above when score >= threshold.

    - inactive -> started after `min_frames` consecutive frames above, unless an alert of this tracker
      ended less than `cooldown_s` of stream time (pts) before; a blocked start keeps counting, so the
      alert starts at the first frame past the cooldown whose run is still >= `min_frames`;
    - active -> ended after `clear_frames` consecutive frames below;
    - a contrary frame resets the run being counted; the runs restart from zero at each start and end.

    `frame` is not used by the decisions (they depend on the scores, their order and pts); it is taken
    so that every call names the frame it is about, as the `Alert` built from its answer does.
    """

    def __init__(self, threshold: float, min_frames: int, clear_frames: int, cooldown_s: float) -> None:
        if min_frames < 1 or clear_frames < 1:
            raise ValueError(f"min_frames and clear_frames must be >= 1 (got {min_frames}, {clear_frames})")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0 (got {cooldown_s})")
        self.threshold = threshold
        self.min_frames = min_frames
        self.clear_frames = clear_frames
        self.cooldown_s = cooldown_s
        self._active = False
        self._run = 0  # consecutive frames above (inactive) or below (active)
        self._ended_pts: float | None = None  # pts of the last end: the cooldown runs from it

    @property
    def active(self) -> bool:
        return self._active

    def observe(self, frame: int, pts: float, score: float) -> AlertEvent | None:
        """Feed one scored frame; "started" or "ended" when the alert changes state on it, else None."""
        above = score >= self.threshold
        if above != self._active:  # counts toward the change: above while inactive, below while active
            self._run += 1
        else:
            self._run = 0
        if not self._active:
            if self._run >= self.min_frames and not self._cooling(pts):
                self._active, self._run = True, 0
                return "started"
        elif self._run >= self.clear_frames:
            self._active, self._run, self._ended_pts = False, 0, pts
            return "ended"
        return None

    def end(self, frame: int, pts: float) -> bool:
        """Force the active alert to end (its watch was removed, its session closed); whether one was
        active. A forced end starts the cooldown like any other end; an inactive tracker is unchanged."""
        if not self._active:
            return False
        self._active, self._run, self._ended_pts = False, 0, pts
        return True

    def _cooling(self, pts: float) -> bool:
        return self._ended_pts is not None and pts - self._ended_pts < self.cooldown_s


# ------------------------------------------------------------------------------------------- payload


@dataclass(frozen=True)
class Alert:
    """One alert event, as every sink delivers it (`to_json` is the body sent, and signed)."""

    session_id: str
    metadata: dict[str, str]  # the session's client-chosen labels
    watch_id: str
    question: str
    event: AlertEvent
    frame: int
    pts: float  # stream seconds of `frame`
    score: float  # the watch's score on `frame`
    caption: str | None  # the caption of `frame`, when it has one
    time: float = field(default_factory=time.time)  # unix seconds when the alert was raised
    reason: EndReason | None = None  # None for a debounced start or end; why a forced end was forced

    def __post_init__(self) -> None:
        if self.event not in ("started", "ended"):
            raise ValueError(f"an alert's event is 'started' or 'ended', not {self.event!r}")
        if self.reason is not None and (self.event != "ended" or self.reason not in get_args(EndReason)):
            raise ValueError(f"reason {self.reason!r} is for forced ends only: watch_removed, session_closed")

    def to_json(self) -> bytes:
        """Compact, sorted-key JSON in UTF-8: the same alert gives the same bytes, whichever sink."""
        return json.dumps(
            dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"), sort_keys=True
        ).encode()


def sign(body: bytes, secret: str) -> str:
    """The `X-Casa-Signature` value of a webhook body: `sha256=` + hex HMAC-SHA256 of the exact bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def mqtt_topic(session_id: str, watch_id: str) -> str:
    """`casa/alerts/{session_id}/{watch_id}`, each id percent-encoded (every byte but ASCII letters,
    digits and `-._~`), so `/` (%2F), `+` (%2B), `#` (%23) and `%` (%25) in an id cannot add a topic level
    nor a wildcard. Subscribers decode a level with `urllib.parse.unquote`."""
    return f"{TOPIC_PREFIX}/{quote(session_id, safe='')}/{quote(watch_id, safe='')}"


# -------------------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    name: str  # the `sink` label of casa_alert_deliveries_total

    def publish(self, alert: Alert) -> None: ...
    def start(self) -> None: ...
    async def stop(self, timeout: float) -> None: ...


class _Streak:
    """Failure logging of one sink: a warning when a streak of failures starts, an info line when it
    ends, nothing in between. A sink that flaps gets at most one warning per `quiet_s` (the rest go to
    debug, their recovery line too, so the lines still pair up)."""

    def __init__(self, what: str, consequence: str, quiet_s: float = 60.0) -> None:
        self.what = what
        self.consequence = consequence  # what failing means for the alerts, said once per streak
        self.quiet_s = quiet_s
        self.failures = 0
        self._loud = False
        self._warned_at = -float("inf")
        self._lock = threading.Lock()  # the MQTT callbacks run on paho's thread

    def fail(self, problem: str) -> None:
        with self._lock:
            self.failures += 1
            if self.failures > 1:
                return
            now = time.monotonic()
            loud = self._loud = now - self._warned_at >= self.quiet_s
            if loud:
                self._warned_at = now
        log.log(
            logging.WARNING if loud else logging.DEBUG,
            "%s: %s; %s (casa_alert_deliveries_total counts them)",
            self.what,
            problem,
            self.consequence,
        )

    def reset(self) -> None:
        with self._lock:
            self.failures = 0

    def ok(self, what_again: str) -> None:
        with self._lock:
            failures, loud, self.failures = self.failures, self._loud, 0
        if failures:
            log.log(
                logging.INFO if loud else logging.DEBUG,
                "%s: %s again after %d failure(s)",
                self.what,
                what_again,
                failures,
            )


class WebhookSink:
    """POST each alert's `to_json()` to `url`, in order, from one asyncio task.

    `publish` enqueues (bounded: a full queue drops the alert); the task sends, signing the body when a
    secret is set, and retries any non-2xx answer or transport error after backoff_s, 2*backoff_s,
    4*backoff_s... for `tries` attempts in all, then counts the alert failed. Call `publish` from the
    loop that ran `start` (the session's); from another thread it hops onto that loop.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str | None,
        queue_size: int = 1000,
        tries: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        if tries < 3:
            raise ValueError(f"a webhook sink tries at least 3 times (got tries={tries})")
        if queue_size < 1 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("queue_size >= 1, backoff_s >= 0 and timeout_s > 0, please")
        self.url = check_webhook_url(url)
        self._secret = secret
        self.queue_size, self.tries, self.backoff_s, self.timeout_s = queue_size, tries, backoff_s, timeout_s
        self._counts = _counters(metrics, self.name)
        parts = urlsplit(url)
        # logs name the receiver by origin only: the path or query of a webhook often holds its token
        self._streak = _Streak(
            f"alert webhook {parts.scheme}://{parts.netloc.rpartition('@')[2]}",
            "alerts fail until it answers 2xx again",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Alert] | None = None  # None = not started, or stopped
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Start the delivery task on the running loop (the queue is made here, bound to that loop)."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.queue_size)
        self._client = httpx.AsyncClient(timeout=self.timeout_s, headers={"User-Agent": "casa-live"})
        self._task = self._loop.create_task(self._run(self._queue, self._client), name="casa-alert-webhook")

    def publish(self, alert: Alert) -> None:
        """Queue `alert`; never blocks, never raises (not started, stopped or full: dropped, counted)."""
        if self._queue is None or self._loop is None:
            self._counts["dropped"].inc()
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop in this thread
            on_loop = False
        if on_loop:
            self._enqueue(alert)
            return
        try:
            self._loop.call_soon_threadsafe(self._enqueue, alert)
        except RuntimeError:  # the loop is closed: the server is gone
            self._counts["dropped"].inc()

    def _enqueue(self, alert: Alert) -> None:
        if self._queue is None:
            self._counts["dropped"].inc()
            return
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self._counts["dropped"].inc()

    async def stop(self, timeout: float) -> None:
        """Deliver what is queued for up to `timeout` s, then cancel: the alert in flight counts as
        failed, those never tried as dropped."""
        queue, task, client = self._queue, self._task, self._client
        if queue is None or task is None or client is None:
            return
        self._queue = self._task = self._client = None  # alerts published from now on are dropped
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(queue.join(), timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._counts["dropped"].inc(queue.qsize())
        await client.aclose()

    async def _run(self, queue: asyncio.Queue[Alert], client: httpx.AsyncClient) -> None:
        while True:
            alert = await queue.get()
            try:
                await self._deliver(client, alert)
            except asyncio.CancelledError:
                self._counts["failed"].inc()
                raise
            except Exception:  # a bug here must not stop the deliveries that follow
                log.exception("alert webhook: could not deliver an alert")
                self._counts["failed"].inc()
            finally:
                queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, alert: Alert) -> None:
        body = alert.to_json()
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, self._secret)
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                self._counts["retried"].inc()
            try:
                response = await client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__} {e}".strip()
                continue
            if response.is_success:
                self._counts["delivered"].inc()
                self._streak.ok("delivering")
                return
            problem = f"HTTP {response.status_code}"
        self._counts["failed"].inc()
        self._streak.fail(f"gave up on an alert after {self.tries} tries (last: {problem})")


class MqttSink:
    """Publish each alert's `to_json()` at QoS 1 to `mqtt_topic(session_id, watch_id)` on the broker
    at `url` (mqtt://HOST[:PORT]).

    paho-mqtt runs the connection on its own thread: `start` only schedules the connect
    (`connect_async`), so a broker that is down never delays the server's start; paho reconnects after
    1, 2, 4... s, at most 30 s apart. paho keeps up to `queue_size` unacknowledged messages (those
    published while the broker is away included, sent when it is back); past that an alert is dropped.
    An alert counts as delivered on its PUBACK, as failed when the broker rejects it or it is still
    unacknowledged when the sink stops.
    """

    name = "mqtt"

    def __init__(self, url: str, queue_size: int = 1000, metrics: Metrics | None = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1 (got {queue_size})")
        self.host, self.port = mqtt_address(url)
        self.queue_size = queue_size
        self._counts = _counters(metrics, self.name)
        self._streak = _Streak(
            f"alert MQTT broker {self.host}:{self.port}",
            f"alerts wait for it, {queue_size} at most, then are dropped",
        )
        self._client: mqtt.Client | None = None  # None = not started, or stopped
        self._connected_once = False
        self._stopping = False
        # alerts paho accepted, and PUBACKs received: their difference is what is still in flight
        # (a PUBACK can arrive before `publish` has counted its message: only the difference is read)
        self._accepted = 0
        self._acked = 0
        self._settled = threading.Condition()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    def start(self) -> None:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            # unique per process, and named so that the broker's log says who connected
            client_id=f"casa-live-{socket.gethostname()}-{secrets.token_hex(3)}",
            clean_session=True,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(self.queue_size)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._stopping, self._accepted, self._acked = False, 0, 0
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client

    def publish(self, alert: Alert) -> None:
        """Hand `alert` to paho; never blocks, never raises (not started, stopped or queue full:
        dropped, counted)."""
        client = self._client
        if client is None:
            self._counts["dropped"].inc()
            return
        try:
            info = client.publish(mqtt_topic(alert.session_id, alert.watch_id), alert.to_json(), qos=1)
        except (ValueError, OSError) as e:  # a topic or payload paho refuses
            self._counts["failed"].inc()
            log.warning("alert MQTT: paho refused an alert: %s", e)
            return
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._counts["dropped"].inc()
        elif info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: kept, sent on connect
            with self._settled:
                self._accepted += 1
        else:
            self._counts["failed"].inc()

    async def stop(self, timeout: float) -> None:
        """Wait up to `timeout` s for the PUBACKs of the alerts in flight, then disconnect; those still
        unacknowledged count as failed. Blocking paho calls run on a worker thread."""
        client = self._client
        if client is None:
            return
        self._client = None  # alerts published from now on are dropped
        await asyncio.to_thread(self._close, client, timeout)

    def _close(self, client: mqtt.Client, timeout: float) -> None:
        with self._settled:
            self._settled.wait_for(lambda: self._acked >= self._accepted, timeout)
            self._counts["failed"].inc(max(0, self._accepted - self._acked))
            self._accepted = self._acked = 0
        self._stopping = True
        client.disconnect()
        # joins paho's thread: quick, unless a connect attempt is under way (paho's 5 s connect timeout)
        client.loop_stop()

    # paho's callbacks, on its network thread

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            self._streak.fail(f"the broker refused the connection ({reason_code})")
            return
        if self._connected_once:
            self._streak.ok("connected")
            return
        self._connected_once = True
        self._streak.reset()  # the tries before the first connection: this line says they are over
        log.info("alert MQTT: connected to %s:%d", self.host, self.port)

    def _on_connect_fail(self, client, userdata) -> None:  # type: ignore[no-untyped-def]
        self._streak.fail("cannot connect (paho retries, 1 to 30 s apart)")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if not self._stopping:
            self._streak.fail(f"disconnected ({reason_code}); reconnecting")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._counts["failed" if reason_code.is_failure else "delivered"].inc()
        with self._settled:
            self._acked += 1
            self._settled.notify_all()


def _counters(metrics: Metrics | None, sink: str) -> dict[str, Counter]:
    metrics = metrics or Metrics()  # a sink made alone (tests, scripts) counts on a registry of its own
    return {outcome: metrics.alert_deliveries_total.labels(sink, outcome) for outcome in DELIVERY_OUTCOMES}


# --------------------------------------------------------------------------------------- dispatcher


class AlertDispatcher:
    """Fans each alert out to every sink, and counts it in casa_alerts_total. With no sink, counting is
    all `publish` does."""

    def __init__(self, sinks: Sequence[Sink] = (), metrics: Metrics | None = None) -> None:
        self.sinks = list(sinks)
        self._alerts = (metrics or Metrics()).alerts_total

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> AlertDispatcher:
        sinks: list[Sink] = []
        if settings.alert_webhook is not None:
            secret = settings.alert_webhook_secret
            sinks.append(
                WebhookSink(
                    settings.alert_webhook,
                    secret.get_secret_value() if secret is not None else None,
                    metrics=metrics,
                )
            )
        if settings.mqtt_url is not None:
            sinks.append(MqttSink(settings.mqtt_url, metrics=metrics))
        return cls(sinks, metrics)

    def publish(self, alert: Alert) -> None:
        """Never blocks, never raises: each sink only enqueues."""
        self._alerts.labels(alert.event).inc()
        for sink in self.sinks:
            sink.publish(alert)

    def start(self) -> None:
        """On the event loop (the webhook's task lives there)."""
        for sink in self.sinks:
            sink.start()
            log.info("alert delivery: %s sink started", sink.name)

    async def stop(self, timeout: float) -> None:
        """Flush and stop every sink, together, each within `timeout` s; a sink that fails to stop is
        logged, and does not keep the others (or the server's shutdown) waiting."""
        results = await asyncio.gather(*(s.stop(timeout) for s in self.sinks), return_exceptions=True)
        for sink, result in zip(self.sinks, results):
            if isinstance(result, BaseException):
                log.error("alert delivery: the %s sink did not stop cleanly: %r", sink.name, result)
