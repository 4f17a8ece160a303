"""Questions over a running stream, on the wire: response.create -> response.created ->
response.output_text.delta* -> response.done, cancel, the typed errors, and the metrics. The
answers' content is the bundled model's business (benchmarks/ask.py); here a random-weight model
answers, so the tests check the lifecycle, the bookkeeping and that the session goes on."""

from __future__ import annotations

import pytest
from server_helpers import client, errors, image_messages, jpeg, of_type, stream, world_frames

from casa_live.server import protocol as p


@pytest.fixture(scope="module")
def app(model_dir):
    with client(model_dir) as c:
        yield c


def ask(ws, question: str = "what is the red circle", **response) -> None:
    ws.send({"type": "response.create", "response": {"question": question, **response}})


def caption_one(ws, index: int) -> None:
    frame = world_frames(index + 1)[index]
    ws.send_bytes(p.pack_image(jpeg(frame), int(index / 2.0 * 1e6)))
    ws.until("caption.segment")


def check_lifecycle(events: list[dict], rid: str, frame: int, pts: float) -> dict:
    mine = [e for e in events if e.get("response", {}).get("id") == rid or e.get("response_id") == rid]
    kinds = [e["type"] for e in mine]
    assert kinds[0] == "response.created" and kinds[-1] == "response.done", kinds
    assert set(kinds[1:-1]) <= {"response.output_text.delta"}, kinds
    created, done = mine[0]["response"], mine[-1]["response"]
    assert created == {"id": rid, "frame": frame}
    assert done["frame"] == frame and done["pts"] == pytest.approx(pts)
    assert done["status"] in ("completed", "incomplete")
    text = "".join(e["delta"] for e in mine if e["type"] == "response.output_text.delta")
    assert done["text"] == text.strip()
    assert 0 <= done["ttft_ms"] <= done["latency_ms"]
    return done


def test_a_question_is_answered_about_the_latest_captioned_frame(app):
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=3)
        caption_one(ws, 0)
        caption_one(ws, 1)
        ask(ws, id="q1", max_new_tokens=3)
        events = ws.until("response.done")
        done = check_lifecycle(events, "q1", frame=1, pts=0.5)
        assert done["status"] == "incomplete" or len(done["text"].split()) <= 3
        caption_one(ws, 2)  # the session goes on, its captions untouched by the answer
        assert errors(ws.events) == []


def test_a_question_before_any_frame_waits_for_the_first_and_ids_are_assigned(app):
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=2)
        ask(ws, max_new_tokens=2)
        ws.send_bytes(image_messages(world_frames(1))[0])
        events = ws.until("response.done")
        # it started with the frame (the answer streams beside the frame's caption)
        assert of_type(events, "caption.delta") or of_type(events, "caption.segment")
        rid = of_type(events, "response.created")[0]["response"]["id"]
        assert rid.startswith("resp_")
        check_lifecycle(events, rid, frame=0, pts=0.0)


def test_cancel_ends_a_waiting_question(app):
    with stream(app) as ws:
        ask(ws, id="waits")  # no frame yet: it waits
        ws.send({"type": "response.cancel", "response_id": "waits"})
        done = ws.until("response.done")[-1]["response"]
        assert done["id"] == "waits" and done["status"] == "cancelled" and "frame" not in done
        assert done["text"] == "" and "ttft_ms" not in done  # no token was ever produced


@pytest.mark.parametrize(
    "response",
    [
        {"question": ""},
        {"question": "   "},
        {"question": "x" * (p.MAX_QUESTION_CHARS + 1)},
        {"question": "ok", "id": "x" * (p.MAX_RESPONSE_ID_CHARS + 1)},
        {"question": "ok", "max_new_tokens": 0},
        {"question": "ok", "max_new_tokens": 100_000},
        {"question": "ok", "extra": 1},
        {},
    ],
)
def test_invalid_requests_are_typed_errors_and_the_session_goes_on(app, response):
    with stream(app) as ws:
        ws.send({"type": "response.create", "response": response, "event_id": "e1"})
        error = ws.until("error")[-1]
        assert error["code"] == "invalid_request" and not error["fatal"] and error["event_id"] == "e1"
        ws.update(mode="offline", max_new_tokens=2)
        caption_one(ws, 0)


def test_duplicates_the_rate_limit_and_unknown_cancels(app):
    with stream(app) as ws:
        for i in range(p.MAX_RESPONSES_IN_FLIGHT):
            ask(ws, id=f"q{i}")  # all wait: no frame yet
        ask(ws, id="q0")
        assert ws.until("error")[-1]["code"] == "invalid_request"  # q0 is in flight
        ask(ws, id="one-too-many")
        assert ws.until("error")[-1]["code"] == "rate_limited"
        ws.send({"type": "response.cancel", "response_id": "nope"})
        assert ws.until("error")[-1]["code"] == "invalid_request"
        ws.update(mode="offline", max_new_tokens=2)
        caption_one(ws, 0)
        done = []
        while len(done) < p.MAX_RESPONSES_IN_FLIGHT:
            done += of_type(ws.until("response.done"), "response.done")
        assert sorted(d["response"]["id"] for d in done) == [
            f"q{i}" for i in range(p.MAX_RESPONSES_IN_FLIGHT)
        ]
        assert all(d["response"]["frame"] == 0 for d in done)
        ask(ws, id="q0")  # an id may be used again once its response is done
        assert ws.until("response.done")[-1]["response"]["id"] == "q0"


def test_metrics_count_responses_by_status(app):
    before = app.get("/metrics").text
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=2)
        caption_one(ws, 0)
        ask(ws, id="m", max_new_tokens=2)
        ws.until("response.done")
        ask(ws, id="c")
        ws.send({"type": "response.cancel", "response_id": "c"})
        status = ws.until("response.done")[-1]["response"]["status"]
    after = app.get("/metrics").text

    def count(text: str, status: str) -> float:
        line = next(
            x for x in text.splitlines() if x.startswith(f'casa_responses_total{{status="{status}"}}')
        )
        return float(line.split()[-1])

    answered = sum(count(after, s) - count(before, s) for s in ("completed", "incomplete"))
    assert answered == 1
    assert count(after, status) - count(before, status) >= 1
    assert "casa_response_time_to_first_token_seconds_count" in after


def test_session_close_answers_what_it_can_and_cancels_the_rest(app):
    with stream(app) as ws:
        ask(ws, id="never")  # no frame will come: it can never start
        ws.send({"type": "session.close"})
        events = ws.drain()
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "session.closed" and ws.close_code == 1000
    done = [e["response"] for e in events if e["type"] == "response.done"]
    assert [(d["id"], d["status"]) for d in done] == [("never", "cancelled")]
    assert kinds.index("response.done") < kinds.index("session.closed")
    with stream(app) as ws:
        ws.update(mode="offline", max_new_tokens=2)
        caption_one(ws, 0)
        ask(ws, id="answered", max_new_tokens=2)
        ws.send({"type": "session.close"})
        events = ws.drain()
    done = [e["response"] for e in events if e["type"] == "response.done"]
    assert [d["id"] for d in done] == ["answered"] and done[0]["status"] in ("completed", "incomplete")
    assert p.parse_server_event('{"type": "response.done", "response": {"id": "x", "text": "", '
                                '"status": "cancelled", "latency_ms": 1.0}}').response.frame is None  # fmt: skip
