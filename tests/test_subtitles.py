"""SRT and WebVTT: server/subtitles.py is the one formatter. The upload endpoint's files are well formed
for captions that would break a cue (a blank line, `-->`, padding, an empty or zero-length caption) and
equal what the command-line streamer's writers write for the same segments."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import FPS, client, world_frames
from subtitle_helpers import assert_monotonic, parse_srt, parse_vtt

from casa_live.clients.writers import Segment, open_writers
from casa_live.server import upload
from casa_live.server.session import Session
from casa_live.server.subtitles import cue_text, format_timestamp, to_srt, to_vtt

# (caption, its cue text): what the model might say, and what a well-formed cue holds instead.
HOSTILE = [
    ("two\n\nlines --> x", "two\nlines -> x"),
    ("-->", "->"),
    ("  padded  \r\n\n\n  --->\n", "padded\n->"),
    ("", None),  # no cue text: no cue, and the next cue keeps the numbering
    (" \n \n", None),
    ("plain", "plain"),
]
N = len(HOSTILE)


def test_cue_text_and_timestamps() -> None:
    for caption, text in HOSTILE:
        assert cue_text(caption) == (text or "")
    assert "-->" not in cue_text("---->>-->") and "-->" not in cue_text("-" * 9 + ">")
    assert format_timestamp(3723.4567, ",") == "01:02:03,457"
    assert format_timestamp(-1.0, ".") == "00:00:00.000"
    segs = [Segment(0, 1.0, 1.0, "zero length"), Segment(1, 2.0, 1.5, "ends before it starts")]
    for cues in (parse_srt(to_srt(segs)), parse_vtt(to_vtt(segs))):
        assert_monotonic(cues[:1])
        assert all(end > start for start, end, _ in cues)
    assert to_srt([]) == "" and to_vtt([]) == "WEBVTT\n\n"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_upload_subtitles_are_well_formed_and_match_the_writers(model_dir, tmp_path: Path, monkeypatch, fmt):
    """The real upload path (decode, engine, session) with the captions swapped for hostile ones after
    the session is flushed: what the endpoint formats is exactly what it answers."""
    from casa_live.model.world.video import encode_video

    served: list = []

    class HostileSession(Session):
        async def flush(self, deadline: float | None = None) -> None:
            await super().flush(deadline)
            assert self.segments is not None and len(self.segments) == N
            self.segments = [
                s.model_copy(update={"text": caption, "end": s.start if i == 1 else s.end})  # one zero-length
                for i, (s, (caption, _)) in enumerate(zip(self.segments, HOSTILE))
            ]
            served.extend(self.segments)

    monkeypatch.setattr(upload, "Session", HostileSession)
    data = encode_video(list(world_frames(N)), fps=FPS, fmt="mp4")
    with client(model_dir) as app:
        r = app.post(f"/v1/captions?format={fmt}&max_new_tokens=2", content=data)
    assert r.status_code == 200, r.text
    assert len(served) == N

    cues = parse_srt(r.text) if fmt == "srt" else parse_vtt(r.text)
    expected = [(s, text) for s, (_, text) in zip(served, HOSTILE) if text]
    assert [c[2] for c in cues] == [text for _, text in expected]
    assert [c[0] for c in cues] == [round(s.start, 3) for s, _ in expected]
    assert_monotonic(cues)

    # The streamer's writers, fed the same segments one at a time, write the same file.
    path = tmp_path / f"out.{fmt}"
    (writer,) = open_writers(**{fmt: path})
    for s in served:
        writer.write(Segment(s.frame, s.start, s.end, s.text, s.ttft_ms, s.latency_ms))
    writer.close()
    assert path.read_text(encoding="utf-8") == r.text
