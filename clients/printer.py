"""Live caption display for a terminal.

On a terminal, `caption.delta` text rewrites the current line (carriage return + erase line) as tokens
arrive, and each `caption.segment` replaces it with a final timestamped line. When stdout is a pipe or
a file, only the final lines are written, so `casa stream x.mp4 > captions.txt` gives clean text.
Answers to questions get lines of their own, `? QUESTION -> ANSWER (frame N)`, apart from the
captions' `[start --> end] text`, and so do the starts and ends of watch alerts, `[alert w1 started]
frame 31 @ 15.5s score 0.97 — QUESTION`. Status and warnings go to stderr and never tear the caption
line.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from casa_live.clients.writers import Alert, Answer, Segment
from casa_live.server.subtitles import format_timestamp

ERASE_LINE = "\r\x1b[K"


def stamp(seconds: float) -> str:
    return format_timestamp(seconds, ".")


class LivePrinter:
    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        *,
        live: bool | None = None,
        quiet: bool = False,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.live = self.out.isatty() if live is None else live
        self.quiet = quiet
        self._frame: int | None = None
        self._pts = 0.0
        self._text = ""
        self._dirty = False  # a partial line is on screen

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((100, 24)).columns - 1)

    def _clear(self) -> None:
        if self._dirty:
            self.out.write(ERASE_LINE)
            self._dirty = False

    def delta(self, frame: int, pts: float, text: str) -> None:
        if frame != self._frame:
            self._frame, self._pts, self._text = frame, pts, ""
        self._text += text
        if not self.live or self.quiet:
            return
        line = f"[{stamp(self._pts)}] {self._text.strip()}"
        self.out.write(ERASE_LINE + line[: self._width()])
        self.out.flush()
        self._dirty = True

    def segment(self, segment: Segment) -> None:
        self._frame, self._text = None, ""
        if self.quiet:
            return
        self._clear()
        self.out.write(f"[{stamp(segment.start)} --> {stamp(segment.end)}] {segment.text.strip()}\n")
        self.out.flush()

    def answer(self, answer: Answer) -> None:
        """`? QUESTION -> ANSWER (frame N)`; the status too when it is not `completed`. Printed even
        with `quiet` (that hides the captions): a question was asked to be answered."""
        text = answer.text.strip() or "(no words)"
        notes = [] if answer.frame is None else [f"frame {answer.frame}"]
        if answer.status != "completed":
            notes.append(answer.status)
        if answer.error:
            text = f"({answer.status}: {answer.error})"
            notes = notes[:-1]
        elif answer.frame is None and not answer.text.strip():
            text, notes = f"({answer.status})", []
        tail = f" ({', '.join(notes)})" if notes else ""
        self._line(f"? {_one_line(answer.question)} -> {_one_line(text)}{tail}")

    def alert(self, alert: Alert) -> None:
        """`[alert ID started] frame N @ PTSs score S — QUESTION`; an end forced by something other
        than the score says why (`[alert ID ended: session_closed]`). Printed even with `quiet`, like
        answers: alerts are what a watch was set for."""
        head = f"alert {alert.watch_id} {alert.event}" + (f": {alert.reason}" if alert.reason else "")
        self._line(
            f"[{head}] frame {alert.frame} @ {round(alert.pts, 3):g}s score {alert.score:.2f} — "
            f"{_one_line(alert.question)}"
        )

    def _line(self, text: str) -> None:
        """A line of its own on stdout between captions; on a terminal the partial caption goes on below."""
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()
        if self.live and not self.quiet and self._frame is not None:
            self.delta(self._frame, self._pts, "")

    def message(self, text: str) -> None:
        """A status or warning line on stderr; the partial caption line is erased first."""
        if self.live:
            self._clear()
            self.out.flush()
        self.err.write(text.rstrip() + "\n")
        self.err.flush()

    def finish(self) -> None:
        if self._dirty:
            self.out.write("\n")
            self.out.flush()
            self._dirty = False


def _one_line(text: str) -> str:
    return " ".join(text.split())
