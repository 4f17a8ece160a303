"""`POST /v1/captions?watch=...`: when each watch's alert was active in an uploaded file.

A random-weight model scores, so thresholds near 0 and 1 make alerts certain or impossible (an ALWAYS
watch has one interval covering the whole file, a NEVER watch none); a threshold between the scores
the model gave makes intervals that end on the score, checked against a fold of the scores written
out here. `watch_intervals` is checked alone on hand-made events; then the typed refusals."""

from __future__ import annotations

import json
import shutil

import pytest
from server_helpers import FPS, client, world_frames

from casa_live.server import protocol as p
from casa_live.server.intervals import Interval, watch_intervals

N = 6
RED = "is there a red circle?"
EMPTY = "is the scene empty?"
ALWAYS, NEVER = 1e-9, 1 - 1e-9  # every score is above the first, none reaches the second


@pytest.fixture(scope="module")
def app(model_dir):
    with client(model_dir) as c:
        yield c


@pytest.fixture(scope="module")
def video() -> bytes:
    from casa_live.model.world.video import encode_video

    return encode_video(list(world_frames(N)), fps=FPS, fmt="mp4")


def post(app, video: bytes, *watches: str, **query):
    params = [("watch", w) for w in watches] + [(k, str(v)) for k, v in query.items()]
    return app.post("/v1/captions", params=params, content=video)


def captions(segments: list[dict]) -> list[tuple]:
    return [(s["frame"], s["start"], s["end"], s["text"], s["tokens"], s["reason"]) for s in segments]


@pytest.fixture(scope="module")
def always(app, video) -> dict:
    r = post(app, video, RED, EMPTY, watch_threshold=ALWAYS, max_new_tokens=3)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_always_watch_covers_the_whole_file(always):
    segments = always["segments"]
    assert always["frames_captioned"] == N and [s["frame"] for s in segments] == list(range(N))
    assert [(w["id"], w["question"], w["threshold"]) for w in always["watches"]] == [
        ("w1", RED, ALWAYS),
        ("w2", EMPTY, ALWAYS),
    ]
    for w in always["watches"]:
        assert set(w) == {
            "id",
            "question",
            "threshold",
            "min_frames",
            "clear_frames",
            "cooldown_s",
            "intervals",
        }
        scores = [s["watch_scores"][w["id"]] for s in segments]
        # the forced end at the close is not where it stopped: the interval runs to the last frame's end
        assert w["intervals"] == [
            {
                "start": 0.0,
                "end": segments[-1]["end"],
                "start_frame": 0,
                "end_frame": N,
                "max_score": max(scores),
                "open_at_end": True,
            }
        ]
        assert segments[-1]["end"] == pytest.approx(N / FPS)


def test_a_never_watch_has_no_interval_and_the_captions_are_unchanged(app, video, always):
    r = post(app, video, RED, watch_threshold=NEVER, max_new_tokens=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["watches"][0]["intervals"] == []
    assert all(set(s["watch_scores"]) == {"w1"} for s in body["segments"])
    # scored on a side branch: the captions are token for token those of an upload without watches,
    # whose segments carry no watch_scores and whose answer has no watches
    plain = post(app, video, max_new_tokens=3).json()
    assert "watches" not in plain and all("watch_scores" not in s for s in plain["segments"])
    assert captions(body["segments"]) == captions(plain["segments"]) == captions(always["segments"])
    # the same model on the same frames scores the same
    assert [s["watch_scores"]["w1"] for s in body["segments"]] == [
        s["watch_scores"]["w1"] for s in always["segments"]
    ]


def expected_intervals(
    scores: list[float], threshold: float, min_frames: int, clear_frames: int
) -> list[dict]:
    """The debounce written out for a file (no cooldown): start at the min_frames-th frame of a run
    above, end at the clear_frames-th frame of a run below; open at the end of the file."""
    intervals, active, run, start = [], False, 0, 0
    for i, score in enumerate(scores):
        run = run + 1 if (score >= threshold) != active else 0
        if not active and run >= min_frames:
            active, run, start = True, 0, i
        elif active and run >= clear_frames:
            intervals.append((start, i, False))
            active, run = False, 0
    if active:
        intervals.append((start, len(scores), True))
    return [
        {
            "start": start / FPS,
            "end": end / FPS,
            "start_frame": start,
            "end_frame": end,
            "max_score": max(scores[start:end]),
            "open_at_end": open_at_end,
        }
        for start, end, open_at_end in intervals
    ]


@pytest.mark.parametrize(("min_frames", "clear_frames"), [(1, 1), (2, 1), (1, 2)])
def test_intervals_follow_the_scores_debounced(app, video, always, min_frames, clear_frames):
    scores = [s["watch_scores"]["w1"] for s in always["segments"]]
    levels = sorted(set(scores))
    if len(levels) < 2:
        pytest.skip(f"the random model scored every frame the same ({levels}): no threshold splits them")
    threshold = levels[len(levels) // 2]  # some frames at or above it, some below
    r = post(
        app,
        video,
        RED,
        watch_threshold=threshold,
        watch_min_frames=min_frames,
        watch_clear_frames=clear_frames,
        max_new_tokens=3,
    )
    assert r.status_code == 200, r.text
    (w,) = r.json()["watches"]
    assert (w["threshold"], w["min_frames"], w["clear_frames"]) == (threshold, min_frames, clear_frames)
    want = expected_intervals(scores, threshold, min_frames, clear_frames)
    assert w["intervals"] == [
        {**i, "start": pytest.approx(i["start"]), "end": pytest.approx(i["end"])} for i in want
    ]


def test_intervals_from_events():
    """The fold alone: a score-ended interval, then one the session's close ended."""

    def segment(frame: int, score: float) -> p.CaptionSegment:
        return p.CaptionSegment(
            frame=frame, start=frame / 2, end=frame / 2 + 0.5, text="", tokens=1, reason="stop",
            ttft_ms=1.0, latency_ms=1.0, watch_scores={"w1": score},
        )  # fmt: skip

    scores = [0.1, 0.1, 0.1, 0.9, 0.8, 0.95, 0.7, 0.6, 0.2, 0.1, 0.9, 0.85]
    segments = [segment(i, s) for i, s in enumerate(scores)]
    events = [
        p.AlertStarted(watch_id="w1", frame=3, pts=1.5, score=0.9),
        p.AlertEnded(watch_id="w1", frame=8, pts=4.0, score=0.2),
        p.AlertStarted(watch_id="w1", frame=10, pts=5.0, score=0.9),
        p.AlertEnded(watch_id="w1", frame=11, pts=5.5, score=0.85, reason="session_closed"),
    ]
    watches = [p.Watch(id="w1", question=RED), p.Watch(id="w2", question=EMPTY)]
    w1, w2 = watch_intervals(watches, events, segments, fps=2.0)
    assert w1.intervals == [
        Interval(start=1.5, end=4.0, start_frame=3, end_frame=8, max_score=0.95, open_at_end=False),
        Interval(start=5.0, end=6.0, start_frame=10, end_frame=12, max_score=0.9, open_at_end=True),
    ]
    assert (w1.question, w2.id, w2.intervals) == (RED, "w2", [])


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("watches", "query", "words"),
    [
        ([f"is there a {i}?" for i in range(9)], {}, "9 watches; an upload has at most 8"),
        ([RED], {"watch_threshold": 1}, "watch_threshold=1 is refused: Input should be less than 1"),
        ([RED], {"watch_threshold": 0}, "watch_threshold=0 is refused: Input should be greater than 0"),
        (
            [RED],
            {"watch_threshold": "high"},
            "watch_threshold=high is refused: Input should be a valid number",
        ),
        ([RED], {"watch_min_frames": 0}, "watch_min_frames=0 is refused"),
        ([RED], {"watch_clear_frames": 101}, "watch_clear_frames=101 is refused"),
        ([RED], {"watch_cooldown": -1}, "watch_cooldown=-1 is refused"),
        ([RED, "  "], {}, "watch 2 is refused: Value error, the watch's question is blank"),
        (["x" * 1001], {}, "watch 1 is refused: String should have at most 1000 characters"),
        ([], {"watch_threshold": 0.5}, "watch_threshold set without a watch: add watch=QUESTION"),
        ([RED], {"format": "srt"}, "watches need format=json"),
        ([RED], {"format": "vtt"}, "watches need format=json"),
    ],
)
def test_bad_watches_are_refused_before_the_body_is_read(app, watches, query, words):
    r = post(app, b"never read", *watches, **query)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_settings" and words in error["message"], error


def test_a_watch_too_long_for_the_model_is_refused_and_frees_the_slot(model_dir, video):
    with client(model_dir, max_sessions=1) as c:
        r = post(c, video, "is there " * 90)  # within the protocol's bound, too long for the model
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "invalid_settings" and "fit" in error["message"], error
        # the only slot is free again (a slot kept would make this one 503 capacity); the worker runs
        # the refused upload's close before this open
        r = post(c, video, RED, max_new_tokens=2)
        assert r.status_code == 200 and len(r.json()["watches"]) == 1, r.text


def test_a_model_without_a_question_template_refuses_watches(model_dir, tmp_path, video):
    plain = shutil.copytree(model_dir, tmp_path / "no-questions")
    config = json.loads((plain / "generation_config.json").read_text())
    config["template"]["question"] = None
    (plain / "generation_config.json").write_text(json.dumps(config))
    with client(plain) as c:
        r = post(c, b"never read", RED)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "invalid_settings" and "scores no watches" in error["message"]


def test_a_long_upload_never_fills_the_session_queue(model_dir, video, monkeypatch, caplog):
    """The upload answers from the session's records; its event queue (read by nobody) must not fill:
    a few minutes of video are more than OUT_QUEUE events. A queue of 4 stands for it here."""
    import casa_live.server.session as session_module

    monkeypatch.setattr(session_module, "OUT_QUEUE", 4)
    with client(model_dir) as c, caplog.at_level("WARNING", logger="casa.session"):
        r = post(c, video, RED, watch_threshold=ALWAYS, max_new_tokens=3)
        assert r.status_code == 200 and r.json()["frames_captioned"] == N
    assert "outbound queue full" not in caplog.text
