"""`casa stream --watch`: yes/no alert rules the server scores on every captioned frame, and their alerts.

Design (docs/protocol.md, "Watches"):
- Each `--watch QUESTION` becomes a watch with the id w1, w2, ... in the order given, all with the
  same rule (threshold, min_frames, clear_frames, cooldown_s). The list goes in the session.update
  that starts every session, so a reconnected session watches the same things.
- The server debounces the scores into `alert.started` / `alert.ended`; each becomes an `Alert` (the
  watch's question added, the frame in the stream's numbering): a line on stdout and a JSONL record.
  A frame's alerts come before its segment, whose `watch_scores` go into the caption record.
- A connection that ends with an alert still active (it dropped: no `alert.ended` came) gets an end
  of its own, reason `connection_lost`, on the last frame scored, so that every start in the records
  has its end. A reconnected session scores afresh and starts its alerts again.
"""

from __future__ import annotations

from typing import Any, Protocol

from casa_live.clients import wire
from casa_live.clients.printer import LivePrinter
from casa_live.clients.writers import Alert, CaptionWriter


class Tally(Protocol):
    """The stream's counter that alerts add to (StreamStats)."""

    alerts: int


def watch_rules(
    questions: list[str],
    threshold: float = 0.5,
    min_frames: int = 1,
    clear_frames: int = 1,
    cooldown_s: float = 0.0,
) -> list[dict[str, Any]]:
    """The session.update `watches` for these questions: ids w1, w2, ... in order, one rule for all.
    Checked with the rest of the settings (wire.session_update) before anything is sent."""
    rule = {
        "threshold": threshold,
        "min_frames": min_frames,
        "clear_frames": clear_frames,
        "cooldown_s": cooldown_s,
    }
    return [{"id": f"w{i}", "question": q.strip(), **rule} for i, q in enumerate(questions, 1)]


class Watches:
    """The alerts of one stream, across its connections (event loop only)."""

    def __init__(
        self, rules: list[dict[str, Any]], writers: list[CaptionWriter], printer: LivePrinter, tally: Tally
    ) -> None:
        self.questions = {r["id"]: r["question"] for r in rules}
        self.writers, self.printer, self.tally = writers, printer, tally
        self.alerts: list[Alert] = []
        self._active: set[str] = set()  # watch ids with an alert started on this connection, not ended
        self._last: dict[str, tuple[int, float, float]] = {}  # watch id -> (frame, pts, score) last seen

    def started(self, event: wire.AlertStarted, offset: int) -> None:
        """`offset` turns the session's frame index into the stream's."""
        frame = offset + event.frame
        self._active.add(event.watch_id)
        self._last[event.watch_id] = (frame, event.pts, event.score)
        self.tally.alerts += 1
        question = self._question(event.watch_id)
        self._record(
            Alert("started", event.watch_id, question, frame, event.pts, event.score, None, event.metadata)
        )

    def ended(self, event: wire.AlertEnded, offset: int) -> None:
        if event.watch_id not in self._active:
            return  # started on a connection whose end was already recorded (connection_lost)
        self._active.discard(event.watch_id)
        question = self._question(event.watch_id)
        frame = offset + event.frame
        self._record(
            Alert(
                "ended", event.watch_id, question, frame, event.pts, event.score, event.reason, event.metadata
            )
        )

    def scored(self, frame: int, pts: float, scores: dict[str, float] | None) -> None:
        """A segment's `watch_scores` (`frame` in the stream's numbering): the last frame scored, where
        an alert cut off with its connection ends."""
        for wid, score in (scores or {}).items():
            self._last[wid] = (frame, pts, score)

    def connection_ended(self) -> None:
        """Alerts the connection left active: no `alert.ended` will come for them."""
        for wid in sorted(self._active):
            frame, pts, score = self._last[wid]
            self._record(Alert("ended", wid, self._question(wid), frame, pts, score, "connection_lost"))
        self._active.clear()

    def _question(self, wid: str) -> str:
        return self.questions.get(wid, "")  # a watch the client did not set (a newer server's): no text

    def _record(self, alert: Alert) -> None:
        self.alerts.append(alert)
        for w in self.writers:
            w.write_alert(alert)
        self.printer.alert(alert)
