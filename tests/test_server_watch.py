"""Watches on the wire: session.update sets them (and metadata), every caption.segment carries the
frame's watch_scores, alerts start and end debounced (alert.started / alert.ended, metadata echoed),
active alerts end when a watch is removed or the session closes, invalid lists change nothing, and
every alert reaches a webhook receiver (signed) and an MQTT subscriber through a real broker. The
scores' values are the model's business (benchmarks/watch.py measures the bundled model's); a
random-weight model scores here, so thresholds near 0 and 1 make alerts certain or impossible."""

from __future__ import annotations

import json
import time

import pytest
from server_helpers import client, errors, image_messages, of_type, stream, world_frames
from test_alert_delivery import Broker, Receiver, free_port, mosquitto_binary, subscriber, wait_for

from casa_live.server.alerts import sign

ALWAYS, NEVER = 1e-9, 1 - 1e-9  # thresholds: every score is above the first, none reaches the second


@pytest.fixture(scope="module")
def app(model_dir):
    with client(model_dir) as c:
        yield c


def watch(wid: str, question: str = "is there a red circle?", **rule) -> dict:
    return {"id": wid, "question": question, **rule}


def caption_frames(ws, n: int, start: int = 0) -> list[dict]:
    events = []
    for index, message in enumerate(image_messages(world_frames(start + n))[start:], start):
        ws.send_bytes(message)
        events += ws.until("caption.segment")
        assert of_type(events, "caption.segment")[-1]["frame"] == index
    return events


def test_segments_carry_each_watch_score_and_alerts_are_debounced(app):
    with stream(app) as ws:
        updated = ws.update(
            mode="offline",
            max_new_tokens=3,
            watches=[
                watch("always", threshold=ALWAYS, min_frames=2),
                watch("never", "is there a blue square?", threshold=NEVER),
            ],
            metadata={"camera": "door-3"},
        )
        assert [w["id"] for w in updated["settings"]["watches"]] == ["always", "never"]
        assert updated["settings"]["watches"][0]["min_frames"] == 2
        assert updated["settings"]["metadata"] == {"camera": "door-3"}
        events = caption_frames(ws, 3)
        for seg in of_type(events, "caption.segment"):
            assert set(seg["watch_scores"]) == {"always", "never"}
            assert all(0.0 < s < 1.0 for s in seg["watch_scores"].values())
        started = of_type(events, "alert.started")
        # min_frames=2: the second frame at or above the threshold starts it, once
        assert [(a["watch_id"], a["frame"], a["pts"]) for a in started] == [("always", 1, 0.5)]
        assert started[0]["metadata"] == {"camera": "door-3"}
        assert started[0]["score"] == of_type(events, "caption.segment")[1]["watch_scores"]["always"]
        # the alert comes before the segment of the frame that raised it
        kinds = [e["type"] for e in events]
        assert kinds.index("alert.started") < [i for i, k in enumerate(kinds) if k == "caption.segment"][1]
        ws.send({"type": "session.close"})
        closing = ws.drain()
        ended = of_type(closing, "alert.ended")
        assert [(a["watch_id"], a["frame"], a["reason"]) for a in ended] == [("always", 2, "session_closed")]
        kinds = [e["type"] for e in closing]
        assert kinds.index("alert.ended") < kinds.index("session.closed")
        assert errors(closing) == []


def test_replacing_the_list_ends_removed_alerts_and_keeps_unchanged_ones(app):
    with stream(app) as ws:
        ws.update(
            mode="offline",
            max_new_tokens=2,
            watches=[watch("a", threshold=ALWAYS), watch("b", threshold=ALWAYS)],
        )
        events = caption_frames(ws, 1)
        assert sorted(a["watch_id"] for a in of_type(events, "alert.started")) == ["a", "b"]
        # "a" unchanged (its alert goes on, no second start), "b" changed (ended, started afresh)
        ws.update(
            watches=[watch("a", threshold=ALWAYS), watch("b", threshold=NEVER), watch("c", threshold=ALWAYS)]
        )
        events = caption_frames(ws, 1, start=1)
        ended = of_type(ws.events, "alert.ended")
        assert [(a["watch_id"], a["reason"]) for a in ended] == [("b", "watch_removed")]
        assert [a["watch_id"] for a in of_type(events, "alert.started")] == ["c"]
        ws.update(watches=[])  # cleared: the rest end, and segments carry no scores
        events = caption_frames(ws, 1, start=2)
        assert "watch_scores" not in of_type(events, "caption.segment")[0]
        assert sorted(a["watch_id"] for a in of_type(ws.events, "alert.ended")) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "watches, words",
    [
        ([watch(f"w{i}") for i in range(9)], "at most 8"),
        ([watch("w1"), watch("w1", "is there a star?")], "unique"),
        ([watch("w1", threshold=1.0)], "threshold"),
        ([watch("w1", min_frames=0)], "min_frames"),
        ([watch("w1", clear_frames=101)], "clear_frames"),
        ([watch("w1", cooldown_s=-1)], "cooldown_s"),
        ([watch("w1", "  ")], "blank"),
        ([watch("x" * 65)], "id"),
        ([watch("w1", "is there " * 200)], "1000"),
        ([watch("w1", "is there " * 90)], "fit"),  # within the protocol's bound, too long for the model
    ],
)
def test_an_invalid_list_is_refused_and_changes_nothing(app, watches, words):
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=2, watches=[watch("keep", threshold=NEVER)])
        ws.send({"type": "session.update", "session": {"watches": watches}, "event_id": "bad"})
        err = ws.until("error")[-1]
        assert err["code"] == "invalid_settings" and not err["fatal"] and err["event_id"] == "bad"
        assert words in err["message"], err["message"]
        events = caption_frames(ws, 1)
        assert set(of_type(events, "caption.segment")[0]["watch_scores"]) == {"keep"}


def test_metadata_is_bounded(app):
    with stream(app) as ws:
        ws.send({"type": "session.update", "session": {"metadata": {f"k{i}": "v" for i in range(17)}}})
        err = ws.until("error")[-1]
        assert err["code"] == "invalid_settings" and "at most 16" in err["message"]


def test_every_alert_reaches_the_webhook_and_the_mqtt_subscriber(model_dir, tmp_path):
    broker = Broker(mosquitto_binary(), free_port(), tmp_path)
    broker.start()
    try:
        with (
            Receiver() as receiver,
            subscriber(broker.port) as messages,
            client(
                model_dir,
                alert_webhook=receiver.url,
                alert_webhook_secret="s3cret",
                mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
            ) as c,
        ):
            with stream(c) as ws:
                session_id = ws.events[0]["session_id"]
                ws.update(
                    mode="offline",
                    max_new_tokens=2,
                    watches=[watch("door", threshold=ALWAYS)],
                    metadata={"camera": "door-3"},
                )
                events = caption_frames(ws, 2)
                ws.send({"type": "session.close"})
                ws.drain()
            sent = of_type(events, "alert.started")
            assert len(sent) == 1
            wait_for(
                lambda: len(receiver.requests) == 2 and len(messages) == 2, 15.0, "both alerts delivered"
            )
            for _, headers, body in receiver.requests:
                assert headers["X-Casa-Signature"] == sign(body, "s3cret")
            bodies = [json.loads(b) for b in receiver.bodies()]
            assert [b["event"] for b in bodies] == ["started", "ended"]
            first = bodies[0]
            assert first["session_id"] == session_id and first["metadata"] == {"camera": "door-3"}
            assert first["watch_id"] == "door" and first["question"] == "is there a red circle?"
            assert first["frame"] == 0 and first["score"] == sent[0]["score"]
            assert first["caption"] == of_type(events, "caption.segment")[0]["text"]
            assert first["time"] == pytest.approx(time.time(), abs=60)
            assert bodies[1]["reason"] == "session_closed"
            assert sorted(m.topic for m in messages) == [f"casa/alerts/{session_id}/door"] * 2
            assert sorted(json.loads(m.payload)["event"] for m in messages) == ["ended", "started"]
            assert all(m.qos == 1 for m in messages)
    finally:
        broker.stop()


def test_the_metrics_count_alerts_and_time_the_scoring(app):
    def scrape() -> str:
        return app.get("/metrics").text

    def value(text: str, name: str) -> float:
        line = next(
            line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")
        )
        return float(line.rsplit(" ", 1)[1])

    before = scrape()
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=2, watches=[watch("m", threshold=ALWAYS)])
        caption_frames(ws, 2)
    after = scrape()
    assert (
        value(after, 'casa_alerts_total{event="started"}')
        == value(before, 'casa_alerts_total{event="started"}') + 1
    )
    assert (
        value(after, 'casa_alerts_total{event="ended"}')
        == value(before, 'casa_alerts_total{event="ended"}') + 1
    )
    assert (
        value(after, "casa_watch_scoring_seconds_count")
        >= value(before, "casa_watch_scoring_seconds_count") + 2
    )
    # labels carry no client-chosen id or question: casa_alerts_total has the event label alone
    labelled = [line for line in after.splitlines() if line.startswith("casa_alerts_total{")]
    assert labelled and all(line.split("{")[1].startswith('event="') and "," not in line for line in labelled)
