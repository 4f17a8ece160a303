"""SRT and WebVTT text: the one formatter of timestamps, cue text and cues.

The upload endpoint (server/upload.py) answers whole files with `to_srt`/`to_vtt`; the command-line
streamer's writers (clients/writers.py) write the same cues one at a time as captions arrive, so an
upload and a stream of the same segments give the same file. Pure Python: no torch, no server state,
so the clients may import it (the server never imports the clients).

A cue is `index`, `start --> end`, the text, a blank line; WebVTT adds the `WEBVTT` header and uses
"." before the milliseconds where SRT uses ",". Cue text is cleaned because a caption is model output:
a blank line would end the cue early and a `-->` would be read as a timing line, either of which makes
a malformed file. A caption with no text left is no cue (both formats reject an empty cue), and a cue
is made at least `MIN_CUE_SECONDS` long, since both formats require `end > start`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

MIN_CUE_SECONDS = 0.001
SRT_SEP = ","
VTT_SEP = "."
VTT_HEADER = "WEBVTT\n\n"


class Timed(Protocol):
    """What a cue is made from: a server `CaptionSegment` or a client `Segment`."""

    start: float
    end: float
    text: str


def format_timestamp(seconds: float, sep: str) -> str:
    """`HH:MM:SS<sep>mmm`: sep is "," for SRT and "." for WebVTT; negative times clamp to zero."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def cue_text(text: str) -> str:
    """A caption as cue text: no blank or padded lines, no `-->` (an empty result means no cue)."""
    while "-->" in text:  # repeated: "--->" would become "-->" after one pass
        text = text.replace("-->", "->")
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def cue(index: int, start: float, end: float, text: str, sep: str) -> str:
    """One cue block, blank line included; `text` is already cleaned by `cue_text` and not empty."""
    end = max(end, start + MIN_CUE_SECONDS)
    return f"{index}\n{format_timestamp(start, sep)} --> {format_timestamp(end, sep)}\n{text}\n\n"


def _cues(segments: Iterable[Timed], sep: str) -> str:
    blocks = []
    for segment in segments:
        text = cue_text(segment.text)
        if text:
            blocks.append(cue(len(blocks) + 1, segment.start, segment.end, text, sep))
    return "".join(blocks)


def to_srt(segments: Iterable[Timed]) -> str:
    """A whole SRT file: one numbered cue per segment with text."""
    return _cues(segments, SRT_SEP)


def to_vtt(segments: Iterable[Timed]) -> str:
    """A whole WebVTT file: the header, then one cue per segment with text (numbered, as in SRT)."""
    return VTT_HEADER + _cues(segments, VTT_SEP)
