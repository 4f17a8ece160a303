"""Strict SRT and WebVTT readers for the tests: a malformed file (a blank line inside a cue, a `-->` in
the text, a bad timestamp, an empty cue) fails an assertion instead of being read leniently."""

from __future__ import annotations

import itertools


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Strict SRT reader: index line, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, text, blank line."""
    cues = []
    blocks = [b for b in text.strip("\n").split("\n\n") if b.strip()]
    for n, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(n), f"cue {n} has index line {lines[0]!r}"
        assert len(lines) >= 2, f"cue {n} has no timing line"
        start, arrow, end = lines[1].partition(" --> ")
        assert arrow, f"bad timing line {lines[1]!r}"
        assert len(lines) >= 3 and all(lines[2:]), f"cue {n} has no text"
        assert not any("-->" in line for line in lines[2:]), f"cue {n} has '-->' in its text"
        cues.append((_ts(start, ","), _ts(end, ","), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """Strict WebVTT reader: the header, then cues of an optional identifier, the timing line, text."""
    assert text.startswith("WEBVTT\n\n"), "WebVTT must start with the WEBVTT line and a blank line"
    cues = []
    for block in [b for b in text[len("WEBVTT\n\n") :].strip("\n").split("\n\n") if b.strip()]:
        lines = block.split("\n")
        timing = 1 if " --> " not in lines[0] else 0  # an optional cue identifier line
        assert len(lines) > timing + 1, f"cue without timing or text: {block!r}"
        start, arrow, end = lines[timing].partition(" --> ")
        assert arrow, f"bad timing line {lines[timing]!r}"
        body = lines[timing + 1 :]
        assert all(body) and not any("-->" in line for line in body), f"bad cue text {body!r}"
        cues.append((_ts(start, "."), _ts(end.split(" ")[0], "."), "\n".join(body)))
    return cues


def _ts(text: str, sep: str) -> float:
    hms, frac_sep, ms = text.strip().rpartition(sep)
    assert frac_sep and len(ms) == 3 and ms.isdigit(), f"bad timestamp {text!r}"
    h, m, s = (int(x) for x in hms.split(":"))
    assert m < 60 and s < 60
    return h * 3600 + m * 60 + s + int(ms) / 1000


def assert_monotonic(cues: list[tuple[float, float, str]]) -> None:
    assert cues, "no cues"
    for (s0, e0, _), (s1, e1, _) in itertools.pairwise(cues):
        assert s0 <= s1 and e0 <= e1, f"times go backwards: {s0}-{e0} then {s1}-{e1}"
    for s, e, _ in cues:
        assert e > s, f"empty cue {s}-{e}"
