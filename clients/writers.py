"""Caption sinks for the command-line streamer: SRT, WebVTT and JSONL files.

Each `caption.segment` from the server becomes one `Segment` (media seconds from the first frame) and
goes to every open writer at once, then the file is flushed: a stream stopped by Ctrl-C or a lost
connection leaves files that are valid up to the last caption. Each answer to a question (`casa stream
--ask`, `--interactive`) becomes one `Answer`: the JSONL file gets it as a record of its own, with
`"type": "answer"` (caption records have no `type`), and each start and end of a watch's alert (`casa
stream --watch`) one `Alert`, a record with `"type": "alert"`; a caption record carries the frame's
`watch_scores` when the session has watches. Subtitles hold captions only. Times are what the server reports;
the cues (timestamps, cleaned text, `end > start`) come from server/subtitles.py, the formatter of the
upload endpoint's SRT and WebVTT, so a streamed file equals the upload's answer for the same segments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from casa_live.server.subtitles import SRT_SEP, VTT_HEADER, VTT_SEP, cue, cue_text


@dataclass
class Segment:
    """One frame's final caption, as the server sent it (times in media seconds)."""

    frame: int
    start: float
    end: float
    text: str
    ttft_ms: float | None = None
    latency_ms: float | None = None
    watch_scores: dict[str, float] | None = None  # watch id -> P(yes), when the session has watches

    def record(self) -> dict:
        row = asdict(self)
        if row["watch_scores"] is None:  # a stream without watches keeps the records it always had
            del row["watch_scores"]
        return row


@dataclass
class Answer:
    """One question's answer, as the server's `response.done` gave it (`frame` in the stream's
    numbering, `pts` in media seconds; both None when the answer never started)."""

    id: str
    question: str
    frame: int | None
    pts: float | None
    text: str
    status: str  # completed | incomplete | cancelled | failed
    ttft_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None  # why the server refused it, or why it got no answer (only then)

    def record(self) -> dict:
        row = {"type": "answer", **asdict(self)}
        if row["error"] is None:
            del row["error"]
        return row


@dataclass
class Alert:
    """One start or end of a watch's alert, as the server's `alert.started` / `alert.ended` gave it
    (`frame` in the stream's numbering, `pts` in media seconds), with the watch's question."""

    event: str  # started | ended
    watch_id: str
    question: str
    frame: int
    pts: float
    score: float  # the watch's P(yes) on that frame
    reason: str | None = None  # a forced end: watch_removed | session_closed | connection_lost
    metadata: dict[str, str] | None = None  # the session's metadata, echoed by the server

    def record(self) -> dict:
        row = {"type": "alert", **asdict(self)}
        for key in ("reason", "metadata"):
            if row[key] is None:
                del row[key]
        return row


class CaptionWriter:
    """Base: owns one text file, writes a segment at a time, flushes after each."""

    suffix = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: TextIO = open(self.path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._header()
        self._file.flush()

    def _header(self) -> None:
        pass

    def _write(self, segment: Segment) -> None:
        raise NotImplementedError

    def write(self, segment: Segment) -> None:
        self._write(segment)
        self._file.flush()

    def write_answer(self, answer: Answer) -> None:
        """Subtitles hold captions only; the JSONL writer records answers."""

    def write_alert(self, alert: Alert) -> None:
        """Subtitles hold captions only; the JSONL writer records alerts."""

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


class _CueWriter(CaptionWriter):
    """Shared SRT/WebVTT logic: skips captions with no cue text, numbers cues from 1."""

    sep = SRT_SEP

    def __init__(self, path: str | Path) -> None:
        self.count = 0
        super().__init__(path)

    def _write(self, segment: Segment) -> None:
        text = cue_text(segment.text)
        if not text:
            return
        self.count += 1
        self._file.write(cue(self.count, segment.start, segment.end, text, self.sep))


class SRTWriter(_CueWriter):
    suffix = ".srt"
    sep = SRT_SEP


class VTTWriter(_CueWriter):
    suffix = ".vtt"
    sep = VTT_SEP

    def _header(self) -> None:
        self._file.write(VTT_HEADER)


class JSONLWriter(CaptionWriter):
    """One JSON object per frame, empty captions included (they still carry timings), one per
    answer (`"type": "answer"`) and one per alert start or end (`"type": "alert"`)."""

    suffix = ".jsonl"

    def _write(self, segment: Segment) -> None:
        self._line(segment.record())

    def write_answer(self, answer: Answer) -> None:
        self._line(answer.record())
        self._file.flush()

    def write_alert(self, alert: Alert) -> None:
        self._line(alert.record())
        self._file.flush()

    def _line(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")


WRITERS: dict[str, type[CaptionWriter]] = {"srt": SRTWriter, "vtt": VTTWriter, "jsonl": JSONLWriter}


def open_writers(
    srt: str | None = None, vtt: str | None = None, jsonl: str | None = None
) -> list[CaptionWriter]:
    """Open the writers whose path is given; on failure, close the ones already open."""
    writers: list[CaptionWriter] = []
    try:
        for kind, path in (("srt", srt), ("vtt", vtt), ("jsonl", jsonl)):
            if path:
                writers.append(WRITERS[kind](path))
    except OSError:
        for w in writers:
            w.close()
        raise
    return writers
