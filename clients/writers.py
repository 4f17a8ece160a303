"""Caption sinks for the command-line streamer: SRT, WebVTT and JSONL files.

Each `caption.segment` from the server becomes one `Segment` (media seconds from the first frame) and
goes to every open writer at once, then the file is flushed: a stream stopped by Ctrl-C or a lost
connection leaves files that are valid up to the last caption. Times are what the server reports;
the only repair is forcing `end > start`, since an empty cue is invalid in both subtitle formats.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

MIN_CUE_SECONDS = 0.001


@dataclass
class Segment:
    """One frame's final caption, as the server sent it (times in media seconds)."""

    frame: int
    start: float
    end: float
    text: str
    ttft_ms: float | None = None
    latency_ms: float | None = None


def format_timestamp(seconds: float, sep: str) -> str:
    """`HH:MM:SS<sep>mmm`: sep is "," for SRT and "." for WebVTT."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, and "-->" would be read as a timing line.
    lines = [line.strip() for line in text.replace("-->", "->").splitlines()]
    return "\n".join(line for line in lines if line)


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

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


class _CueWriter(CaptionWriter):
    """Shared SRT/WebVTT logic: skips empty captions, numbers cues from 1."""

    sep = ","

    def __init__(self, path: str | Path) -> None:
        self.count = 0
        super().__init__(path)

    def _cue(self, index: int, timing: str, text: str) -> str:
        raise NotImplementedError

    def _write(self, segment: Segment) -> None:
        text = cue_text(segment.text)
        if not text:
            return
        self.count += 1
        end = max(segment.end, segment.start + MIN_CUE_SECONDS)
        timing = f"{format_timestamp(segment.start, self.sep)} --> {format_timestamp(end, self.sep)}"
        self._file.write(self._cue(self.count, timing, text))


class SRTWriter(_CueWriter):
    suffix = ".srt"
    sep = ","

    def _cue(self, index: int, timing: str, text: str) -> str:
        return f"{index}\n{timing}\n{text}\n\n"


class VTTWriter(_CueWriter):
    suffix = ".vtt"
    sep = "."

    def _header(self) -> None:
        self._file.write("WEBVTT\n\n")

    def _cue(self, index: int, timing: str, text: str) -> str:
        return f"{index}\n{timing}\n{text}\n\n"


class JSONLWriter(CaptionWriter):
    """One JSON object per frame, empty captions included (they still carry timings)."""

    suffix = ".jsonl"

    def _write(self, segment: Segment) -> None:
        self._file.write(json.dumps(asdict(segment), ensure_ascii=False) + "\n")


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
