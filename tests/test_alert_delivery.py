"""Watch alerts (server/alerts.py): the debounce against a reference written here, and delivery through
real components: an HTTP receiver on a local port for the webhook, a real `mosquitto` broker for MQTT
(skipped, naming the Debian package, where it is not installed), the settings and `casa serve` flags,
and the app lifespan starting and stopping the sinks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from casa_live.cli.main import build_parser
from casa_live.cli.serve import settings_from_args
from casa_live.server.alerts import (
    Alert,
    AlertDispatcher,
    AlertTracker,
    MqttSink,
    WebhookSink,
    mqtt_topic,
    sign,
)
from casa_live.server.metrics import Metrics
from casa_live.server.settings import Settings, mqtt_address

SECRET = "webhook-test-secret"


def alert(n: int = 0, session: str = "s1", watch: str = "w1", event: str = "started") -> Alert:
    return Alert(
        session_id=session,
        metadata={"camera": "door é"},
        watch_id=watch,
        question="is the door open?",
        event=event,  # type: ignore[arg-type]
        frame=n,
        pts=n / 2,
        score=0.75,
        caption=f"frame {n}",
        time=1_700_000_000.0 + n,
    )


def count(metrics: Metrics, sink: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "casa_alert_deliveries_total", {"sink": sink, "outcome": outcome}
    )
    assert value is not None, (sink, outcome)  # every series exists from the start
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------ debounce


def feed(tracker: AlertTracker, scores: list[float], start: int = 0, dt: float = 0.5) -> list[str | None]:
    return [tracker.observe(start + i, (start + i) * dt, s) for i, s in enumerate(scores)]


def test_tracker_starts_after_min_frames_above_and_a_frame_below_resets_the_count() -> None:
    t = AlertTracker(threshold=0.5, min_frames=3, clear_frames=2, cooldown_s=0)
    assert feed(t, [0.9, 0.9, 0.1, 0.9, 0.9]) == [None] * 5  # the low frame restarted the count
    assert not t.active
    assert t.observe(5, 2.5, 0.5) == "started"  # score == threshold counts as above
    assert t.active


def test_tracker_ends_after_clear_frames_below_and_a_frame_above_resets_the_count() -> None:
    t = AlertTracker(threshold=0.5, min_frames=1, clear_frames=3, cooldown_s=0)
    assert t.observe(0, 0.0, 0.9) == "started"
    assert feed(t, [0.1, 0.1, 0.6, 0.1, 0.1], start=1) == [None] * 5
    assert t.observe(6, 3.0, 0.0) == "ended"
    assert not t.active
    assert t.observe(7, 3.5, 0.9) == "started"  # no cooldown: the next frame above starts again


def test_tracker_cooldown_is_stream_time_and_the_count_goes_on_meanwhile() -> None:
    t = AlertTracker(threshold=0.5, min_frames=2, clear_frames=1, cooldown_s=5.0)
    assert t.observe(0, 0.0, 0.9) is None
    assert t.observe(1, 1.0, 0.9) == "started"
    assert t.observe(2, 2.0, 0.1) == "ended"  # the cooldown runs until pts 7.0
    # frames above at pts 3..6 reach min_frames but are cooling down; the count keeps going
    assert [t.observe(i, float(i), 0.9) for i in range(3, 7)] == [None] * 4
    assert t.observe(7, 7.0, 0.9) == "started"  # first frame past the cooldown, count still >= 2


def test_tracker_a_frame_below_during_the_cooldown_resets_the_count() -> None:
    t = AlertTracker(threshold=0.5, min_frames=2, clear_frames=1, cooldown_s=5.0)
    feed(t, [0.9, 0.9, 0.1], dt=1.0)  # started at pts 1, ended at pts 2
    assert [t.observe(i, float(i), s) for i, s in [(3, 0.9), (4, 0.9), (5, 0.1), (6, 0.9)]] == [None] * 4
    assert t.observe(7, 7.0, 0.9) == "started"  # the run of 6, 7 reaches 2 just past the cooldown
    t2 = AlertTracker(threshold=0.5, min_frames=2, clear_frames=1, cooldown_s=5.0)
    feed(t2, [0.9, 0.9, 0.1], dt=1.0)
    assert [t2.observe(i, float(i), s) for i, s in [(6, 0.1), (7, 0.9)]] == [None, None]
    assert t2.observe(8, 8.0, 0.9) == "started"


def test_tracker_force_end() -> None:
    t = AlertTracker(threshold=0.5, min_frames=1, clear_frames=1, cooldown_s=2.0)
    assert t.end(0, 0.0) is False  # nothing active: nothing changes
    assert t.observe(1, 0.5, 0.9) == "started"
    assert t.end(2, 1.0) is True
    assert not t.active
    assert t.end(3, 1.5) is False
    assert t.observe(4, 2.5, 0.9) is None  # a forced end starts the cooldown too (until pts 3.0)
    assert t.observe(5, 3.0, 0.9) == "started"


def test_tracker_rejects_counts_below_one_and_a_negative_cooldown() -> None:
    for bad in ({"min_frames": 0}, {"clear_frames": 0}, {"cooldown_s": -1.0}):
        args = {"threshold": 0.5, "min_frames": 1, "clear_frames": 1, "cooldown_s": 0.0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            AlertTracker(**args)


def reference_events(
    ops: list[tuple[str, float, float]], threshold: float, min_frames: int, clear_frames: int, cooldown: float
) -> list[str | bool | None]:
    """The rules read literally: at each frame, look back over the frames since the last start or end
    for the run that would change the state; a forced end is an end."""
    out: list[str | bool | None] = []
    active, since, ended_at = False, [], None
    for kind, pts, score in ops:
        if kind == "end":
            out.append(active)
            if active:
                active, since, ended_at = False, [], pts
            continue
        since.append(score >= threshold)
        run = 0
        for above in reversed(since):
            if above == active:  # above while active, or below while inactive, breaks the run
                break
            run += 1
        if not active and run >= min_frames and (ended_at is None or pts - ended_at >= cooldown):
            active, since = True, []
            out.append("started")
        elif active and run >= clear_frames:
            active, since, ended_at = False, [], pts
            out.append("ended")
        else:
            out.append(None)
    return out


OPS = st.lists(
    st.tuples(
        st.sampled_from(["frame"] * 9 + ["end"]),
        st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),  # pts step
        st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),  # score, the threshold among them
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    OPS,
    st.sampled_from([0.3, 0.5, 0.7]),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from([0.0, 0.5, 1.0, 3.0]),
)
def test_tracker_matches_the_reference(ops, threshold, min_frames, clear_frames, cooldown) -> None:
    pts, steps = 0.0, []
    for kind, step, score in ops:
        pts += step
        steps.append((kind, pts, score))
    t = AlertTracker(threshold, min_frames, clear_frames, cooldown)
    got: list[str | bool | None] = []
    for i, (kind, at, score) in enumerate(steps):
        got.append(t.end(i, at) if kind == "end" else t.observe(i, at, score))
    assert got == reference_events(steps, threshold, min_frames, clear_frames, cooldown)


# ------------------------------------------------------------------------------------------- payload


def test_alert_json_is_compact_sorted_utf8_with_every_field() -> None:
    a = replace(alert(3), event="ended", reason="session_closed", caption=None)
    body = a.to_json()
    assert body.startswith(b'{"caption":null,') and b", " not in body and b": " not in body
    assert "door é".encode() in body  # UTF-8, not \\u escapes
    assert json.loads(body) == {
        "session_id": "s1",
        "metadata": {"camera": "door é"},
        "watch_id": "w1",
        "question": "is the door open?",
        "event": "ended",
        "frame": 3,
        "pts": 1.5,
        "score": 0.75,
        "caption": None,
        "time": 1_700_000_003.0,
        "reason": "session_closed",
    }
    fields = {k: v for k, v in alert().__dict__.items() if k != "time"}
    assert abs(Alert(**fields).time - time.time()) < 5  # stamped when raised
    with pytest.raises(ValueError, match="forced ends only"):
        replace(alert(), reason="watch_removed")  # a start has no reason
    with pytest.raises(ValueError, match="'started' or 'ended'"):
        replace(alert(), event="begun")


def test_topic_escapes_ids_so_they_stay_one_level_each() -> None:
    topic = mqtt_topic("cam/1+#", "w 2%")
    assert topic == "casa/alerts/cam%2F1%2B%23/w%202%25"
    _, _, session, watch = topic.split("/")
    assert (unquote(session), unquote(watch)) == ("cam/1+#", "w 2%")
    assert mqtt_topic("plain-id_1.x", "w") == "casa/alerts/plain-id_1.x/w"


# ------------------------------------------------------------------------------------------- webhook


class Receiver:
    """An HTTP server on a free local port that records each POST (time, headers, body) and answers
    the statuses of `script` in turn, then 200."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((time.monotonic(), dict(self.headers), body))
                self.send_response(receiver.script.pop(0) if receiver.script else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/casa?token=t0ken"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[bytes]:
        return [body for _, _, body in self.requests]


def test_webhook_delivers_signed_bodies_in_order() -> None:
    metrics = Metrics()
    alerts = [alert(n) for n in range(20)]

    async def run(url: str) -> None:
        sink = WebhookSink(url, SECRET, metrics=metrics)
        sink.start()
        for a in alerts:
            sink.publish(a)
        await until(lambda: count(metrics, "webhook", "delivered") == 20, what="20 deliveries")
        await sink.stop(1.0)

    with Receiver() as rx:
        asyncio.run(run(rx.url))
    assert rx.bodies() == [a.to_json() for a in alerts]
    for _, headers, body in rx.requests:
        assert headers["Content-Type"] == "application/json"
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Casa-Signature"], expected)
        assert sign(body, SECRET) == expected
    assert [count(metrics, "webhook", o) for o in ("retried", "failed", "dropped")] == [0, 0, 0]


def test_webhook_without_a_secret_sends_no_signature() -> None:
    async def run(url: str) -> None:
        sink = WebhookSink(url, None)
        sink.start()
        sink.publish(alert())
        await sink.stop(5.0)  # stop delivers what is queued first

    with Receiver() as rx:
        asyncio.run(run(rx.url))
    assert len(rx.requests) == 1 and "X-Casa-Signature" not in rx.requests[0][1]


def test_webhook_retries_with_exponential_backoff_and_the_third_try_delivers() -> None:
    metrics = Metrics()

    async def run(url: str) -> None:
        sink = WebhookSink(url, SECRET, tries=4, backoff_s=0.1, metrics=metrics)
        sink.start()
        sink.publish(alert(1))
        await until(lambda: count(metrics, "webhook", "delivered") == 1, what="the delivery")
        await sink.stop(1.0)

    with Receiver(script=[500, 500]) as rx:
        asyncio.run(run(rx.url))
    assert rx.bodies() == [alert(1).to_json()] * 3
    (t0, _, _), (t1, _, _), (t2, _, _) = rx.requests
    assert t1 - t0 >= 0.1 and t2 - t1 >= 0.2  # backoff_s, then 2 * backoff_s
    assert count(metrics, "webhook", "retried") == 2
    assert count(metrics, "webhook", "delivered") == 1
    assert count(metrics, "webhook", "failed") == 0


def test_webhook_receiver_down_publish_returns_at_once_and_drops_then_fails(caplog) -> None:
    metrics = Metrics()
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there

    async def run() -> float:
        sink = WebhookSink(url, SECRET, queue_size=10, tries=3, backoff_s=0.01, metrics=metrics)
        sink.start()
        t0 = time.perf_counter()
        for n in range(100):
            sink.publish(alert(n))
        elapsed = time.perf_counter() - t0
        # nothing ran on the loop meanwhile: 10 queued, the other 90 dropped at once
        assert count(metrics, "webhook", "dropped") == 90
        await until(lambda: count(metrics, "webhook", "failed") == 10, what="10 failed deliveries")
        await sink.stop(1.0)
        return elapsed

    with caplog.at_level(logging.DEBUG, logger="casa.alerts"):
        elapsed = asyncio.run(run())
    assert elapsed < 0.010, f"100 publishes took {elapsed * 1000:.1f} ms"
    assert count(metrics, "webhook", "retried") == 20  # 2 more tries for each of the 10
    assert count(metrics, "webhook", "delivered") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one per failure streak
    assert "127.0.0.1" in warnings[0].getMessage() and "/hook" not in warnings[0].getMessage()


def test_webhook_full_queue_drops_the_newest_and_keeps_the_order() -> None:
    metrics = Metrics()

    async def run(url: str) -> None:
        sink = WebhookSink(url, None, queue_size=5, metrics=metrics)
        sink.start()
        for n in range(15):  # without yielding to the loop: the queue fills at 5
            sink.publish(alert(n))
        await sink.stop(5.0)
        sink.publish(alert(99))  # stopped: dropped, counted

    with Receiver() as rx:
        asyncio.run(run(rx.url))
    assert rx.bodies() == [alert(n).to_json() for n in range(5)]
    assert count(metrics, "webhook", "dropped") == 11
    assert count(metrics, "webhook", "delivered") == 5


def test_webhook_stop_is_bounded_and_counts_what_it_cuts() -> None:
    metrics = Metrics()
    url = f"http://127.0.0.1:{free_port()}/hook"

    async def run() -> float:
        sink = WebhookSink(url, None, tries=4, backoff_s=10.0, metrics=metrics)
        sink.start()
        for n in range(3):
            sink.publish(alert(n))
        await asyncio.sleep(0.2)  # the first alert failed once and waits out its 10 s backoff
        t0 = time.perf_counter()
        await sink.stop(0.3)
        return time.perf_counter() - t0

    assert asyncio.run(run()) < 2.0
    assert count(metrics, "webhook", "failed") == 1  # the one in flight
    assert count(metrics, "webhook", "dropped") == 2  # never tried


def test_webhook_publish_from_another_thread_hops_onto_the_loop() -> None:
    metrics = Metrics()

    async def run(url: str) -> None:
        sink = WebhookSink(url, None, metrics=metrics)
        sink.start()
        await asyncio.to_thread(sink.publish, alert(7))
        await until(lambda: count(metrics, "webhook", "delivered") == 1, what="the delivery")
        await sink.stop(1.0)

    with Receiver() as rx:
        asyncio.run(run(rx.url))
    assert rx.bodies() == [alert(7).to_json()]


def test_webhook_sink_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        WebhookSink("ftp://example.com/x", None)
    with pytest.raises(ValueError, match="at least 3"):
        WebhookSink("http://example.com/x", None, tries=2)


# ---------------------------------------------------------------------------------------------- MQTT


def mosquitto_binary() -> str:
    # Debian installs it in /usr/sbin, which is not on a normal user's PATH
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None
    )
    if found is None:
        pytest.skip("mosquitto is not installed: `apt-get install mosquitto` (Debian package mosquitto)")
    return found


class Broker:
    """A mosquitto on 127.0.0.1:`port`, anonymous, from a two-line config."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port = binary, port
        self.config = workdir / f"mosquitto-{port}.conf"
        self.config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        self.log = workdir / f"mosquitto-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=out, stderr=out)

        def listening() -> bool:
            assert self.proc.poll() is None, f"mosquitto exited: {self.log.read_text()}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10.0, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def broker(tmp_path) -> Iterator[Broker]:
    b = Broker(mosquitto_binary(), free_port(), tmp_path)
    try:
        yield b
    finally:
        b.stop()


@contextlib.contextmanager
def subscriber(port: int) -> Iterator[list[mqtt.MQTTMessage]]:
    """A paho client subscribed to casa/alerts/# at QoS 1; yields the messages as they arrive."""
    received: list[mqtt.MQTTMessage] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="casa-test-subscriber")
    client.on_message = lambda c, u, message: received.append(message)
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("casa/alerts/#", qos=1)
    try:
        assert subscribed.wait(10), "the test subscriber was not subscribed"
        yield received
    finally:
        client.disconnect()
        client.loop_stop()


def test_mqtt_delivers_each_alert_on_its_topic_at_qos_1(broker) -> None:
    broker.start()
    metrics = Metrics()
    alerts = [alert(0, "cam/1+#", "door"), alert(1, "s2", "w 2"), alert(2, "s2", "w 2", "ended")]
    sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}", metrics=metrics)
    with subscriber(broker.port) as received:
        sink.start()
        wait_for(lambda: sink.connected, what="the sink to connect")
        for a in alerts:
            sink.publish(a)
        wait_for(lambda: len(received) == 3, what="3 messages")
        wait_for(lambda: count(metrics, "mqtt", "delivered") == 3, what="3 PUBACKs")
        asyncio.run(sink.stop(2.0))
    assert [m.topic for m in received] == [
        "casa/alerts/cam%2F1%2B%23/door",
        "casa/alerts/s2/w%202",
        "casa/alerts/s2/w%202",
    ]
    assert [m.payload for m in received] == [a.to_json() for a in alerts]
    assert {m.qos for m in received} == {1}
    assert [count(metrics, "mqtt", o) for o in ("failed", "dropped")] == [0, 0]


def test_mqtt_sink_started_while_the_broker_is_down_delivers_once_it_is_up(broker) -> None:
    metrics = Metrics()
    sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}", metrics=metrics)
    t0 = time.perf_counter()
    sink.start()
    sink.publish(alert(0))
    sink.publish(alert(1))
    assert time.perf_counter() - t0 < 0.1  # connect_async: nothing waits on the broker
    time.sleep(0.3)  # the first connect was refused; paho tries again 1 s later
    assert not sink.connected
    broker.start()
    with subscriber(broker.port) as received:
        # subscribed before the sink's next try: otherwise the broker had no one to give them to
        assert not sink.connected, "the sink reconnected before the test subscribed; rerun"
        wait_for(lambda: len(received) == 2, 20.0, "the 2 alerts published while the broker was down")
        wait_for(lambda: count(metrics, "mqtt", "delivered") == 2, what="2 PUBACKs")
        asyncio.run(sink.stop(2.0))
    assert [m.payload for m in received] == [alert(0).to_json(), alert(1).to_json()]


def test_mqtt_queue_full_drops_and_stop_fails_what_was_never_acknowledged() -> None:
    # no broker: paho keeps what it accepted for the next connection, up to queue_size
    metrics = Metrics()
    sink = MqttSink(f"mqtt://127.0.0.1:{free_port()}", queue_size=3, metrics=metrics)
    sink.publish(alert(0))  # not started: dropped
    sink.start()
    t0 = time.perf_counter()
    for n in range(5):
        sink.publish(alert(n))
    assert time.perf_counter() - t0 < 0.05
    assert count(metrics, "mqtt", "dropped") == 3  # 1 before start, 2 over the queue
    t0 = time.perf_counter()
    asyncio.run(sink.stop(0.2))
    assert time.perf_counter() - t0 < 5.0
    assert count(metrics, "mqtt", "failed") == 3
    assert count(metrics, "mqtt", "delivered") == 0


def test_mqtt_sink_rejects_other_schemes() -> None:
    for url in ("tcp://broker:1883", "mqtts://broker", "http://broker", "broker:1883"):
        with pytest.raises(ValueError, match="mqtt://HOST:PORT"):
            MqttSink(url)
    assert mqtt_address("mqtt://broker") == ("broker", 1883)
    assert mqtt_address("mqtt://10.0.0.2:1884/") == ("10.0.0.2", 1884)


# ----------------------------------------------------------------------------- settings and wiring


def test_env_and_flags_map_to_the_alert_settings(monkeypatch) -> None:
    monkeypatch.setenv("CASA_ALERT_WEBHOOK", "https://hooks.example.com/casa")
    monkeypatch.setenv("CASA_ALERT_WEBHOOK_SECRET", "from-env")
    monkeypatch.setenv("CASA_MQTT_URL", "mqtt://broker:1884")
    s = Settings()
    assert (s.alert_webhook, s.mqtt_url) == ("https://hooks.example.com/casa", "mqtt://broker:1884")
    assert isinstance(s.alert_webhook_secret, SecretStr) and "from-env" not in repr(s)
    assert s.alert_webhook_secret.get_secret_value() == "from-env"

    flags = ["--alert-webhook", "http://10.0.0.5:9000/in", "--alert-webhook-secret", "from-flag"]
    args = build_parser().parse_args(["serve", *flags, "--mqtt-url", "mqtt://127.0.0.1"])
    s = settings_from_args(args)  # flags win over the environment
    assert (s.alert_webhook, s.mqtt_url) == ("http://10.0.0.5:9000/in", "mqtt://127.0.0.1")
    assert s.alert_webhook_secret.get_secret_value() == "from-flag"

    monkeypatch.delenv("CASA_ALERT_WEBHOOK")
    monkeypatch.delenv("CASA_ALERT_WEBHOOK_SECRET")
    monkeypatch.delenv("CASA_MQTT_URL")
    s = Settings()
    assert s.alert_webhook is s.alert_webhook_secret is s.mqtt_url is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alert_webhook", "ftp://hooks.example.com/x", "http:// or https:// URL"),
        ("alert_webhook", "hooks.example.com/x", "no scheme"),
        ("alert_webhook", "https:///x", "no host"),
        ("alert_webhook", "http://host:99999/x", "does not parse"),
        ("mqtt_url", "mqtts://broker:8883", "only plain TCP"),
        ("mqtt_url", "mqtt://", "has no host"),
        ("mqtt_url", "mqtt://user:pw@broker", "host and a port only"),
        ("mqtt_url", "mqtt://broker/topic", "host and a port only"),
        ("alert_webhook_secret", "alone", "alert_webhook is not"),
    ],
)
def test_bad_alert_settings_are_rejected_with_a_clear_message(field, value, message) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_casa_serve_prints_a_bad_url_without_echoing_it(capsys) -> None:
    args = build_parser().parse_args(["serve", "--alert-webhook", "ftp://hooks.example.com/s3cr3t-t0ken"])
    assert args.func(args) == 2
    out = capsys.readouterr().out
    assert "error: alert_webhook: the alert webhook must be an http:// or https:// URL" in out
    assert "s3cr3t-t0ken" not in out and "Value error" not in out


def test_dispatcher_from_settings_counts_every_alert_and_fans_out() -> None:
    metrics = Metrics()
    none = AlertDispatcher.from_settings(Settings(), metrics)
    assert none.sinks == []
    none.publish(alert())  # no sink: counted, nothing else
    none.publish(alert(event="ended"))
    none.publish(alert(event="ended"))
    assert metrics.registry.get_sample_value("casa_alerts_total", {"event": "started"}) == 1
    assert metrics.registry.get_sample_value("casa_alerts_total", {"event": "ended"}) == 2
    both = AlertDispatcher.from_settings(
        Settings(alert_webhook="http://127.0.0.1:1/x", alert_webhook_secret="k", mqtt_url="mqtt://h"),
        metrics,
    )
    assert [s.name for s in both.sinks] == ["webhook", "mqtt"]
    assert metrics.registry.get_sample_value("casa_watch_scoring_seconds_count") == 0


def test_the_app_lifespan_starts_and_stops_the_sinks(model_dir) -> None:
    from fastapi.testclient import TestClient

    from casa_live.server.app import create_app

    with Receiver() as rx:
        settings = Settings(
            model_dir=model_dir,
            warmup=False,
            max_sessions=1,
            alert_webhook=rx.url,
            alert_webhook_secret=SECRET,
        )
        app = create_app(settings)
        ctx = app.state.ctx
        with TestClient(app):
            ctx.alerts.publish(alert(5))  # from the test's thread: the sink hops onto the app's loop
            wait_for(lambda: len(rx.requests) == 1, what="the webhook delivery")
            ctx.alerts.publish(alert(6))  # delivered by the shutdown's flush at the latest
        (webhook,) = ctx.alerts.sinks
        assert webhook._task is None  # stopped by the lifespan
    assert rx.bodies() == [alert(5).to_json(), alert(6).to_json()]
    assert rx.requests[0][1]["X-Casa-Signature"] == sign(alert(5).to_json(), SECRET)
