"""`casa stream` against a real `casa serve` on 127.0.0.1 (a subprocess, a real socket, a real model).

The served model is the bundled one (checkpoints/default/) when it exists, otherwise a random
test-tiny checkpoint: then captions are noise and only their form is checked, and the ground-truth
check (caption colours and shapes match the synthetic clip) is skipped with the reason.
`live_server` is shared with test_browser_demo.py.

Questions (`--ask`, `--interactive`) need a model with a question template: `ask_server` serves the
bundled model when its generation config has one, and otherwise a random toy checkpoint (whose
template answers random words), so the lifecycle and the JSONL records are checked either way and the
answers against the world's ground truth only with the trained model. `ask_server` is shared with
test_browser_demo.py too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from subtitle_helpers import assert_monotonic, parse_srt, parse_vtt

REPO = Path(__file__).resolve().parents[1]
# CASA_TEST_TRAINED_MODEL points these tests at another trained checkpoint (e.g. a training run).
BUNDLED = Path(os.environ.get("CASA_TEST_TRAINED_MODEL") or REPO / "checkpoints" / "default")
HAVE_BUNDLED = (BUNDLED / "config.json").is_file() and (BUNDLED / "model.safetensors").is_file()
NEEDS_BUNDLED = "ground truth needs the trained bundled model (checkpoints/default/); serving a random one"
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")


@dataclass
class LiveServer:
    http: str  # http://127.0.0.1:PORT
    ws: str  # ws://127.0.0.1:PORT
    log: Path
    trained: bool
    answers: bool = False  # the served model has a question template


def answers_questions(model_dir: Path) -> bool:
    """Whether a checkpoint answers questions: its generation config has a question template."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return False
    template = json.loads(path.read_text()).get("template") or {}
    return bool(template.get("question"))


BUNDLED_ANSWERS = HAVE_BUNDLED and answers_questions(BUNDLED)
# A toy checkpoint (random weights) whose answers on the synthetic world are words: with seed 0 the
# tiny model mostly emits tokens that decode to nothing, so its answers would be empty.
ANSWERING_TOY_SEED = 2
NEEDS_BUNDLED_ANSWERS = (
    "the answers' ground truth needs the trained bundled model with a question template; serving a "
    "random toy checkpoint that answers random words"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, *, questions: bool = False, **env: str) -> Iterator[LiveServer]:
    """Run `casa serve` on a free port until it answers /readyz; stop it afterwards. The bundled model
    when it exists (with `questions`: when it also answers questions), else a random toy checkpoint."""
    trained = BUNDLED_ANSWERS if questions else HAVE_BUNDLED
    if trained:
        model_dir = BUNDLED
    else:
        from casa_live.model.checkpoint.toy import toy_checkpoint

        model_dir = tmp / ("tiny-model-answers" if questions else "tiny-model")
        if not model_dir.exists():
            toy_checkpoint(model_dir, seed=ANSWERING_TOY_SEED if questions else 0)
    port = free_port()
    log = tmp / f"server-{port}.log"
    environ = {
        **os.environ,
        "CASA_HOST": "127.0.0.1",
        "CASA_PORT": str(port),
        "CASA_MODEL_DIR": str(model_dir),
        "CASA_MAX_SESSIONS": "4",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    cmd = [
        "-m",
        "casa_live.cli.main",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-dir",
        str(model_dir),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *cmd], cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"casa serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"casa serve not ready after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield LiveServer(
            f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", log, trained, answers_questions(model_dir)
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    # Two slots, so test_capacity_is_a_clear_message can fill them.
    yield from start_server(tmp_path_factory.mktemp("live-server"), CASA_MAX_SESSIONS="2")


@pytest.fixture(scope="module")
def ask_server(tmp_path_factory) -> Iterator[LiveServer]:
    """A server whose model answers questions (the bundled one when it can, else a toy)."""
    yield from start_server(tmp_path_factory.mktemp("ask-server"), questions=True, CASA_MAX_SESSIONS="2")


def casa_stream(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "casa_live.cli.main", "stream", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def mentions(texts: list[str], vocabulary: tuple[str, ...]) -> list[str]:
    return [w for t in texts for w in re.findall(r"[a-z]+", t.lower()) if w in vocabulary]


def assert_matches_truth(texts: list[str], clip, min_mentions: int = 3, min_share: float = 0.8) -> None:
    """Colours and shapes named in the captions are those of the clip's objects (most of the time)."""
    truth_colours = {o.colour for t in clip.truth for o in t.objects}
    truth_shapes = {o.shape for t in clip.truth for o in t.objects}
    for vocab, truth in ((COLOURS, truth_colours), (SHAPES, truth_shapes)):
        said = mentions(texts, vocab)
        assert len(said) >= min_mentions, f"captions name too few {vocab}: {texts}"
        share = sum(w in truth for w in said) / len(said)
        assert share >= min_share, f"only {share:.0%} of {said} are in the clip ({sorted(truth)}): {texts}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------


@dataclass
class CliRun:
    done: subprocess.CompletedProcess
    srt: Path
    vtt: Path
    jsonl: Path


@pytest.fixture(scope="module")
def synthetic_run(live_server: LiveServer, tmp_path_factory) -> CliRun:
    out = tmp_path_factory.mktemp("cli")
    run = CliRun(None, out / "c.srt", out / "c.vtt", out / "c.jsonl")
    run.done = casa_stream("synthetic:3", "--server", live_server.ws, "--no-realtime", "--synthetic-seconds", "6",
                           "--srt", str(run.srt), "--vtt", str(run.vtt), "--jsonl", str(run.jsonl))  # fmt: skip
    return run


def test_synthetic_clip_comes_back_as_valid_srt_and_webvtt(synthetic_run: CliRun) -> None:
    done = synthetic_run.done
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(synthetic_run.jsonl)
    # Offline mode drops nothing: one row per frame of the 6 s clip at the world's 2 fps.
    assert [r["frame"] for r in rows] == list(range(12)), done.stderr
    assert [r["start"] for r in rows] == [i / 2 for i in range(12)]
    for r in rows:
        assert r["end"] > r["start"] and r["latency_ms"] >= r["ttft_ms"] >= 0
    cues = parse_srt(synthetic_run.srt.read_text())
    assert parse_vtt(synthetic_run.vtt.read_text()) == cues
    assert [c[2] for c in cues] == [r["text"].strip() for r in rows if r["text"].strip()]
    if cues:
        assert_monotonic(cues)
    # The live printer wrote one timestamped line per caption (stdout is a pipe: final lines only).
    assert done.stdout.count(" --> ") == len(rows)
    assert "sent 12 frames, captioned 12" in done.stderr


def test_synthetic_clip_captions_match_the_scene(synthetic_run: CliRun, live_server: LiveServer) -> None:
    if not live_server.trained:
        pytest.skip(NEEDS_BUNDLED)
    from casa_live.model.world.scene import WorldConfig, generate_clip

    rows = read_jsonl(synthetic_run.jsonl)
    assert_matches_truth([r["text"] for r in rows], generate_clip(3, WorldConfig(frames=12)))


def test_container_bytes_path(live_server: LiveServer, tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    done = casa_stream("synthetic:4", "--server", live_server.ws, "--no-realtime", "--send", "container",
                       "--synthetic-seconds", "4", "--jsonl", str(jsonl))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(jsonl)
    starts = [r["start"] for r in rows]
    assert len(rows) == 8 and starts == sorted(starts), (rows, done.stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a subprocess is POSIX")
def test_ctrl_c_flushes_files_and_exits_130(live_server: LiveServer, tmp_path: Path) -> None:
    srt, jsonl = tmp_path / "c.srt", tmp_path / "c.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "casa_live.cli.main", "stream", "synthetic:5", "--server", live_server.ws, "--realtime",
         "--synthetic-seconds", "120", "--srt", str(srt), "--jsonl", str(jsonl)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (jsonl.exists() and len(read_jsonl(jsonl)) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no captions within 60 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    rows = read_jsonl(jsonl)  # every line is complete JSON
    assert len(rows) >= 3 and rows[-1]["start"] < 60  # stopped early, not at the end of the clip
    cues = parse_srt(srt.read_text())
    assert len(cues) == sum(1 for r in rows if r["text"].strip())


def test_unreachable_server_is_a_clear_message(tmp_path: Path) -> None:
    done = casa_stream("synthetic:1", "--server", f"127.0.0.1:{free_port()}", timeout=30)
    assert done.returncode == 1
    assert "cannot reach the server" in done.stderr and "connection refused" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_source_and_bad_settings_are_usage_errors(live_server: LiveServer, tmp_path: Path) -> None:
    done = casa_stream(str(tmp_path / "nope.mp4"), "--server", live_server.ws, timeout=30)
    assert done.returncode == 2 and "no such file" in done.stderr
    done = casa_stream("synthetic:1", "--server", live_server.ws, "--fps", "1000", timeout=30)
    assert done.returncode == 2 and "invalid_settings" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_capacity_is_a_clear_message(live_server: LiveServer) -> None:
    from websockets.sync.client import connect

    with contextlib.ExitStack() as stack:
        for _ in range(2):  # fill both session slots
            ws = stack.enter_context(connect(live_server.ws + "/v1/stream"))
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        done = casa_stream("synthetic:1", "--server", live_server.ws, timeout=60)
    assert done.returncode == 1
    assert "capacity: the server is full; try again shortly" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------- questions

COUNT = "how many objects are there?"
ANSWER_KEYS = {"type", "id", "question", "frame", "pts", "text", "status", "ttft_ms", "latency_ms"}


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(caption records, answer records) of a JSONL file."""
    return [r for r in rows if "type" not in r], [r for r in rows if r.get("type") == "answer"]


def check_answers(answers: list[dict], captions: list[dict]) -> None:
    """Each answer names a captioned frame and its pts, with the lifecycle's timings."""
    starts = {c["frame"]: c["start"] for c in captions}
    for a in answers:
        assert set(a) == ANSWER_KEYS, a
        assert a["status"] in ("completed", "incomplete"), a
        assert a["frame"] in starts and a["pts"] == pytest.approx(starts[a["frame"]]), (a, starts)
        assert 0 <= a["ttft_ms"] <= a["latency_ms"], a
        assert a["text"] == a["text"].strip()


def test_ask_every_seconds_of_stream_time(ask_server: LiveServer, tmp_path: Path) -> None:
    jsonl = tmp_path / "ask.jsonl"
    done = casa_stream("synthetic:3", "--server", ask_server.ws, "--no-realtime", "--synthetic-seconds", "4",
                       "--ask", COUNT, "--ask-every", "1", "--jsonl", str(jsonl))  # fmt: skip
    assert done.returncode == 0, done.stderr
    captions, answers = split_rows(read_jsonl(jsonl))
    assert [c["frame"] for c in captions] == list(range(8)), done.stderr  # captions as without questions
    # at the start, then at 1, 2 and 3 s of stream time
    assert [a["id"] for a in answers] == ["q1", "q2", "q3", "q4"], answers
    assert all(a["question"] == COUNT for a in answers)
    check_answers(answers, captions)
    frames = [a["frame"] for a in answers]
    assert frames == sorted(frames), frames  # each round sees the stream further on
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"? {COUNT} -> ")]
    assert len(lines) == 4 and all(line.endswith(")") and "(frame " in line for line in lines), done.stdout
    assert done.stdout.count(" --> ") == 8  # the caption lines are still there, apart
    assert "answered 4 of 4 questions" in done.stderr
    if not ask_server.trained:
        return  # random words: the lifecycle is all there is to check
    from casa_live.model.world import questions
    from casa_live.model.world.scene import WorldConfig, generate_clip

    clip = generate_clip(3, WorldConfig(frames=8))
    right = [a["text"] == questions.answer(COUNT, clip.truth[a["frame"]].objects).answer for a in answers]
    assert sum(right) >= 3, (answers, [questions.answer(COUNT, t.objects).answer for t in clip.truth])


def test_interactive_questions_while_the_stream_runs(ask_server: LiveServer, tmp_path: Path) -> None:
    import queue
    import threading

    jsonl = tmp_path / "interactive.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "casa_live.cli.main", "stream", "synthetic:5", "--server", ask_server.ws,
         "--synthetic-seconds", "8", "--interactive", "--jsonl", str(jsonl)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()

    def wait_for(prefix: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.5)
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"no line starting {prefix!r} within 60 s")

    try:
        wait_for("[")  # the stream runs: a caption came
        proc.stdin.write(f"{COUNT}\n")
        proc.stdin.flush()
        assert wait_for(f"? {COUNT} -> ")
        proc.stdin.write("\nis the scene empty?\n")  # the blank line is no question
        proc.stdin.close()  # end of input: no more questions, the stream goes on to its end
        proc.wait(120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interactive: type a question" in err
    captions, answers = split_rows(read_jsonl(jsonl))
    assert [(a["id"], a["question"]) for a in answers] == [("q1", COUNT), ("q2", "is the scene empty?")]
    check_answers(answers, captions)
    assert captions[-1]["start"] > 3  # the stream went on after the questions, to the clip's end


def test_a_model_without_a_question_template_refuses_and_the_stream_goes_on(
    live_server: LiveServer, tmp_path: Path
) -> None:
    jsonl = tmp_path / "refused.jsonl"
    done = casa_stream("synthetic:2", "--server", live_server.ws, "--no-realtime", "--synthetic-seconds", "2",
                       "--ask", COUNT, "--jsonl", str(jsonl))  # fmt: skip
    assert done.returncode == 0, done.stderr
    captions, (answer,) = split_rows(read_jsonl(jsonl))
    assert len(captions) == 4
    if live_server.answers:
        check_answers([answer], captions)
        return
    assert answer["status"] == "failed" and answer["frame"] is None and answer["text"] == ""
    assert answer["error"].startswith("invalid_request: the server refused a question"), answer
    assert "no question template" in answer["error"]
    assert f"? {COUNT} -> (failed: invalid_request" in done.stdout


# ---------------------------------------------------------------------------------------------------
# watches: `ask_server` scores them (a model with a question template); a threshold of 1e-6 makes the
# alert certain whatever the model, so the lifecycle is checked with the random one as with a trained one


def test_watch_alerts_are_printed_and_recorded(ask_server: LiveServer, tmp_path: Path) -> None:
    jsonl = tmp_path / "watch.jsonl"
    square, empty = "is there a square?", "is the scene empty?"
    done = casa_stream("synthetic:3", "--server", ask_server.ws, "--no-realtime", "--synthetic-seconds", "3",
                       "--watch", square, "--watch", empty, "--watch-threshold", "1e-6", "--jsonl", str(jsonl))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(jsonl)
    captions = [r for r in rows if "type" not in r]
    alerts = [r for r in rows if r.get("type") == "alert"]
    assert [c["frame"] for c in captions] == list(range(6)), done.stderr
    assert all(set(c["watch_scores"]) == {"w1", "w2"} for c in captions)
    # the alerts the scores imply (min_frames = clear_frames = 1): with a random model every score
    # is above 1e-6, so both start on the first frame and the session's close ends them on the
    # last; a trained one is sure enough of a false answer to end one
    expected = []
    for wid, question in (("w1", square), ("w2", empty)):
        on = False
        for c in captions:
            if on != (c["watch_scores"][wid] >= 1e-6):
                on = not on
                expected.append(("started" if on else "ended", wid, question, c["frame"], None))
        if on:
            expected.append(("ended", wid, question, captions[-1]["frame"], "session_closed"))
    expected.sort(key=lambda e: (e[3], e[4] is not None, e[1]))
    assert [
        (a["event"], a["watch_id"], a["question"], a["frame"], a.get("reason")) for a in alerts
    ] == expected
    if not ask_server.trained:
        assert expected[0][:4] == ("started", "w1", square, 0) and len(expected) == 4
    for a in alerts:
        caption = captions[a["frame"]]
        assert (
            a["pts"] == pytest.approx(caption["start"])
            and a["score"] == caption["watch_scores"][a["watch_id"]]
        )
    assert rows.index(alerts[0]) < rows.index(captions[0])  # a frame's alerts come before its caption
    lines = done.stdout.splitlines()
    if expected[0][:4] == ("started", "w1", square, 0):
        assert f"[alert w1 started] frame 0 @ 0s score {alerts[0]['score']:.2f} — {square}" in lines, (
            done.stdout
        )
    closed = [e for e in expected if e[4] == "session_closed"]
    for _, wid, _, frame, _ in closed:
        assert (
            sum(line.startswith(f"[alert {wid} ended: session_closed] frame {frame} @ ") for line in lines)
            == 1
        )
    assert done.stdout.count(" --> ") == 6  # the caption lines are still there, apart
    assert f"{sum(e[0] == 'started' for e in expected)} alerts" in done.stderr
