"""`POST /v1/captions?question=...`: questions about the last frame of an uploaded file, answered in the
JSON output once every frame is captioned. A random-weight model answers (random words), so the tests
check where the answers come from (the last frame), their form, that the captions are the same with or
without questions, and the typed refusals."""

from __future__ import annotations

import json
import shutil

import pytest
from server_helpers import FPS, client, world_frames

from casa_live.server import protocol as p

N = 4
COUNT = "how many objects are there?"
EMPTY = "is the scene empty?"


@pytest.fixture(scope="module")
def app(model_dir):
    with client(model_dir) as c:
        yield c


@pytest.fixture(scope="module")
def video() -> bytes:
    from casa_live.model.world.video import encode_video

    return encode_video(list(world_frames(N)), fps=FPS, fmt="mp4")


def post(app, video: bytes, *questions: str, **query):
    params = [("question", q) for q in questions] + [(k, str(v)) for k, v in query.items()]
    return app.post("/v1/captions", params=params, content=video)


def test_questions_are_answered_about_the_last_frame(app, video):
    r = post(app, video, COUNT, EMPTY, max_new_tokens=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["frames_captioned"] == N
    last = body["segments"][-1]
    assert [a["question"] for a in body["answers"]] == [COUNT, EMPTY]  # in the order asked
    for a in body["answers"]:
        assert set(a) == {"question", "frame", "pts", "text", "status"}
        assert a["frame"] == last["frame"] == N - 1 and a["pts"] == pytest.approx(last["start"])
        assert a["status"] in ("completed", "incomplete") and a["text"] == a["text"].strip()
    # the answers are on a side branch: the captions are token for token those of the same upload
    # without questions
    plain = post(app, video, max_new_tokens=4)
    assert plain.status_code == 200 and "answers" not in plain.json()

    def captions(segments: list[dict]) -> list[tuple]:
        return [(s["frame"], s["start"], s["end"], s["text"], s["tokens"], s["reason"]) for s in segments]

    assert captions(body["segments"]) == captions(plain.json()["segments"])


def test_questions_and_answer_metrics(app, video):
    def answered(text: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(
                ('casa_responses_total{status="completed"}', 'casa_responses_total{status="incomplete"}')
            )
        )

    before = answered(app.get("/metrics").text)
    assert post(app, video, COUNT, max_new_tokens=2).status_code == 200
    assert answered(app.get("/metrics").text) - before == 1


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_questions_need_format_json(app, fmt):
    r = post(app, b"never read", COUNT, format=fmt)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and "questions need format=json" in error["message"]


@pytest.mark.parametrize(
    ("questions", "words"),
    [
        (["   "], "question 1 is refused: Value error, the question is blank"),
        ([COUNT, "x" * (p.MAX_QUESTION_CHARS + 1)], "question 2 is refused: String should have at most"),
        ([COUNT] * (p.MAX_RESPONSES_IN_FLIGHT + 1), f"an upload answers at most {p.MAX_RESPONSES_IN_FLIGHT}"),
    ],
)
def test_bad_questions_are_refused_before_the_body_is_read(app, questions, words):
    r = post(app, b"never read", *questions)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and words in error["message"], error


def test_a_model_without_a_question_template_refuses_questions(model_dir, tmp_path, video):
    plain = shutil.copytree(model_dir, tmp_path / "no-questions")
    config = json.loads((plain / "generation_config.json").read_text())
    config["template"]["question"] = None
    (plain / "generation_config.json").write_text(json.dumps(config))
    with client(plain) as c:
        r = post(c, b"never read", COUNT)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and "no question template" in error["message"]
        r = post(c, video, max_new_tokens=2)  # without questions it captions as ever
        assert r.status_code == 200 and r.json()["frames_captioned"] == N
