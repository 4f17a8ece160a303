"""When each watch's alert was active in a recording: the upload endpoint's `watches` answer.

`POST /v1/captions?watch=QUESTION` runs the file as an offline session with watches; the session
records its alert events (`SessionWatches.events`) and its segments (each with `watch_scores`). This
folds them into intervals, with the same debounce a live stream gets (min_frames, clear_frames,
cooldown_s: server/alerts.py), so that an interval is exactly a period a live stream of the file
would have been alerting:

- An interval is half-open, in frames and in seconds: it starts at the frame that started the alert
  (`start_frame`, `start` its pts) and ends at the frame that ended it (`end_frame`, `end` its pts),
  which is not in it. With clear_frames > 1 the frames of the clearing run before it are in it: the
  alert was still active on them.
- An alert still active when the file ends is closed by the session's end (`alert.ended`, reason
  `session_closed`, on the last frame scored). That forced end is not where the event stopped being
  seen: the interval takes in the last frame and ends at that frame's end (its pts + 1/fps, the
  segment's `end`), `end_frame` one past it, and says so with `open_at_end`. So a watch whose answer
  is yes on every frame has one interval, covering the whole file.
- `max_score` is the highest score of the watch on the interval's frames.

docs/protocol.md, "HTTP endpoints".
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from casa_live.server import protocol as p


class Interval(BaseModel):
    start: float = Field(description="seconds: the pts of the frame that started the alert")
    end: float = Field(
        description="seconds: the pts of the frame that ended it, or the end of the file's last frame "
        "(open_at_end)"
    )
    start_frame: int = Field(description="the frame that started the alert (in the interval)")
    end_frame: int = Field(
        description="the frame that ended it (not in the interval), or one past the last frame (open_at_end)"
    )
    max_score: float = Field(description="the watch's highest P(yes) on the interval's frames")
    open_at_end: bool = Field(description="the alert was still active when the file ended")


class WatchIntervals(p.Watch):
    """A watch as the upload set it, and when its alert was active."""

    intervals: list[Interval] = Field(description="in time order; empty when the alert never started")


def watch_intervals(
    watches: list[p.Watch],
    events: list[p.AlertStarted | p.AlertEnded],
    segments: list[p.CaptionSegment],
    fps: float,
) -> list[WatchIntervals]:
    """Each watch's intervals from an offline session's alert events (in order) and segments."""
    by_frame = {s.frame: s for s in segments}

    def frame_end(frame: int, pts: float) -> float:
        segment = by_frame.get(frame)
        return segment.end if segment is not None else pts + 1.0 / fps

    def max_score(wid: str, start_frame: int, end_frame: int, fallback: float) -> float:
        scores = [
            s.watch_scores[wid]
            for s in segments
            if start_frame <= s.frame < end_frame and s.watch_scores and wid in s.watch_scores
        ]
        return max(scores, default=fallback)

    def interval(wid: str, started: p.AlertStarted, ended: p.AlertEnded | None) -> Interval:
        if ended is not None and ended.reason is None:  # the score fell: the ending frame is out
            end_frame, end, open_at_end = ended.frame, ended.pts, False
        else:  # a forced end (the file ended) on the last frame scored, which is in
            if ended is not None:
                last, pts = ended.frame, ended.pts
            else:  # no end recorded: active until the last segment
                last, pts = (
                    (segments[-1].frame, segments[-1].start) if segments else (started.frame, started.pts)
                )
            end_frame, end, open_at_end = last + 1, frame_end(last, pts), True
        return Interval(
            start=started.pts,
            end=end,
            start_frame=started.frame,
            end_frame=end_frame,
            max_score=max_score(wid, started.frame, end_frame, started.score),
            open_at_end=open_at_end,
        )

    found: dict[str, list[Interval]] = {w.id: [] for w in watches}
    open_: dict[str, p.AlertStarted] = {}
    for event in events:
        if isinstance(event, p.AlertStarted):
            open_[event.watch_id] = event
        elif (started := open_.pop(event.watch_id, None)) is not None and event.watch_id in found:
            found[event.watch_id].append(interval(event.watch_id, started, event))
    for wid, started in open_.items():  # no end recorded (the session was not closed): open at the end
        if wid in found:
            found[wid].append(interval(wid, started, None))
    return [WatchIntervals(**w.model_dump(), intervals=found[w.id]) for w in watches]
