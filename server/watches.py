"""A session's watches: the debounce of each one's scores into alerts, and where the alerts go.

The model scores every watch on every captioned frame (model/engine: `Engine.set_watches`); the
worker hands a frame's scores to the session, which hands them here. Each watch has an
`AlertTracker` (server/alerts.py); an alert that starts or ends is sent on the session's socket
(`alert.started` / `alert.ended`) and to the server's sinks (webhook, MQTT) through the
dispatcher. Replacing the list keeps the trackers of watches that did not change (same id, same
rule), so an active alert is not raised twice; a removed or changed watch's active alert ends with
reason `watch_removed`, and the session's end closes every active alert (`session_closed`), so an
alerting pipeline never holds an alert open forever. docs/protocol.md, "Watches".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from casa_live.server import protocol as p
from casa_live.server.alerts import Alert, AlertDispatcher, AlertTracker


@dataclass
class _Watched:
    watch: p.Watch
    tracker: AlertTracker
    last: tuple[int, float, float] | None = None  # (frame, pts, score) last scored


class SessionWatches:
    def __init__(
        self,
        session_id: str,
        alerts: AlertDispatcher,
        emit: Callable[[BaseModel], None],
        record: bool = False,
    ) -> None:
        self.session_id, self.alerts, self.emit = session_id, alerts, emit
        self.metadata: dict[str, str] = {}
        self.watched: dict[str, _Watched] = {}
        # with record (the upload endpoint): every alert event sent, in order
        self.events: list[p.AlertStarted | p.AlertEnded] | None = [] if record else None

    def __bool__(self) -> bool:
        return bool(self.watched)

    def replace(self, watches: list[p.Watch]) -> None:
        """The session's new list: unchanged watches keep their state, the others start afresh
        (an active alert of a removed or changed one ends, reason watch_removed)."""
        kept: dict[str, _Watched] = {}
        for w in watches:
            old = self.watched.get(w.id)
            if old is not None and old.watch == w:
                kept[w.id] = old
            else:
                tracker = AlertTracker(w.threshold, w.min_frames, w.clear_frames, w.cooldown_s)
                kept[w.id] = _Watched(w, tracker)
        for wid, old in self.watched.items():
            if kept.get(wid) is not old:
                self._force_end(old, "watch_removed")
        self.watched = kept

    def observe(self, frame: int, pts: float, scores: dict[str, float], caption: str | None) -> None:
        """One frame's scores (watch id -> P(yes)); raises the alerts they start or end."""
        for wid, score in scores.items():
            w = self.watched.get(wid)
            if w is None:  # removed since the frame was scored
                continue
            w.last = (frame, pts, score)
            event = w.tracker.observe(frame, pts, score)
            if event is not None:
                self._raise(w, event, frame, pts, score, caption, None)

    def close(self) -> None:
        """The session ends: every active alert ends (reason session_closed)."""
        for w in self.watched.values():
            self._force_end(w, "session_closed")
        self.watched = {}

    def _force_end(self, w: _Watched, reason: str) -> None:
        if w.last is None:
            return
        frame, pts, score = w.last
        if w.tracker.end(frame, pts):
            self._raise(w, "ended", frame, pts, score, None, reason)

    def _raise(
        self,
        w: _Watched,
        event: str,
        frame: int,
        pts: float,
        score: float,
        caption: str | None,
        reason: str | None,
    ) -> None:
        metadata = dict(self.metadata) or None
        wire: p.AlertStarted | p.AlertEnded
        if event == "started":
            wire = p.AlertStarted(watch_id=w.watch.id, frame=frame, pts=pts, score=score, metadata=metadata)
        else:
            wire = p.AlertEnded(
                watch_id=w.watch.id, frame=frame, pts=pts, score=score, metadata=metadata, reason=reason
            )
        if self.events is not None:
            self.events.append(wire)
        self.emit(wire)
        self.alerts.publish(
            Alert(
                session_id=self.session_id,
                metadata=dict(self.metadata),
                watch_id=w.watch.id,
                question=w.watch.question,
                event=event,  # type: ignore[arg-type]
                frame=frame,
                pts=pts,
                score=score,
                caption=caption,
                reason=reason,  # type: ignore[arg-type]
            )
        )
