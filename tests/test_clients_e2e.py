"""`casa stream` against a real `casa serve` on 127.0.0.1 (a subprocess, a real socket, a real model).

The served model is the bundled one (checkpoints/default/) when it exists, otherwise a random
test-tiny checkpoint: then captions are noise and only their form is checked, and the ground-truth
check (caption colours and shapes match the synthetic clip) is skipped with the reason.
`live_server` is shared with test_browser_demo.py.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, **env: str) -> Iterator[LiveServer]:
    """Run `casa serve` on a free port until it answers /readyz; stop it afterwards."""
    if HAVE_BUNDLED:
        model_dir = BUNDLED
    else:
        from casa_live.model.checkpoint.toy import toy_checkpoint

        model_dir = tmp / "tiny-model"
        if not model_dir.exists():
            toy_checkpoint(model_dir)
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
        yield LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", log, HAVE_BUNDLED)
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
