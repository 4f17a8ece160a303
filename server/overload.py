"""Graceful overload: past capacity, caption fewer live frames in full rather than cut them all.

Every live frame has a budget, one frame period (1/fps). Below capacity a frame starts as soon as
its session's row is free and its caption ends well inside the budget. Past capacity the batched
step slows down with every row that joins it, so if every waiting frame started at once, every
caption would run into its deadline and be cut: nobody would get a usable caption (a collapse,
not a degradation). The governor keeps the step fast enough instead: it caps the number of frames
in flight at once, and the frames beyond the cap wait for a place; a newer frame of the same
session replaces a waiting one (latest frame wins), which counts as dropped with reason `overload`.
Captions stay whole, and every session gets a share of the places in turn: the place that frees up
goes to the waiting session that started a frame longest ago, so the share of frames captioned is
the same for every stream. While places are short, a frame that has waited `max_wait` of its budget
goes after every fresher one and is dropped if it gets no place, which bounds a captioned frame's
lag by about 1.5 budgets.

Turns come in runs: a session whose frames are being captioned one after another keeps its place
for `run_frames` frames in a row before the longest-waiting sessions get it. A gap costs a caption:
across it, a model whose captions narrate changes has its row started over and restates the scene
(server/worker.py, `Worker._restate`; up to three times a change's length), and any other model
describes changes it did not see. Every other frame, nearly every caption would follow a gap; in
runs of six, about one in six does.

The cap follows the measured cost of a caption against its budget:
- every tick, the predicted service time of a long caption (the 75th percentile of the ticks the
  last captions took, times the tick's duration, a moving average) is compared with the budget: above `high` of it for
  `sustained` ticks in a row, the cap drops to the frames in flight scaled down in proportion (at
  most once per `settle_tick`). This
  acts within a few ticks of a burst (a camera fleet reconnecting at once), before any frame of the
  burst has run out of time;
- every finished frame's measured service time confirms it: above `over` of its budget, the cap
  shrinks to `decrease` x the frames in flight (at most once per `settle`); below `low` of it while
  frames wait, the cap grows by one, at most once per `grow_every` seconds (the load a new place
  adds shows in the tick time only after a few ticks).
While nothing waits the cap does not bind, so under capacity nothing changes. `overloaded` is true
while frames are being held back (or were, within `hold_s`): `/readyz` answers 503 `overloaded`
then, and `--max-sessions auto` admits no new session. docs/scaling.md, "Past capacity".
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class OverloadConfig:
    high: float = 0.85  # predicted service time / budget above which the cap is cut in proportion
    sustained: int = 3  # ... for this many ticks in a row (one slow tick, a prompt prefill, is not overload)
    over: float = 0.9  # measured service time / budget above which the cap shrinks by `decrease`
    low: float = 0.6  # ... below which it grows by one (while frames wait)
    decrease: float = 0.85
    settle: float = 0.5  # seconds between two decreases on measured service times
    settle_tick: float = 0.1  # ... on predicted ones
    hold_s: float = 2.0  # `overloaded` stays true this long after frames last waited
    ema: float = 0.2  # weight of the newest value in the moving averages
    prior_ticks: float = 10.0  # ticks a caption takes, before one has been measured
    tick_window: int = 200  # captions whose tick counts give the percentile
    quantile: float = 0.75
    grow_every: float = 0.1  # seconds between two growths of the cap
    # While places are short, a live frame that has waited this share of its budget goes after
    # every fresher one and is dropped (`overload`) if it gets no place: started, its lag would
    # be its wait plus up to its whole budget. Its session keeps its turn for its next frame,
    # less than a period away.
    max_wait: float = 0.5
    # While places are short, a session whose frames were captioned one after another keeps its
    # turn for this many frames in a row (a run) before the sessions that waited longest get its
    # place. Each gap costs a caption: across one, a model narrating changes restates the scene
    # (longer, server/worker.py) and any other describes changes it did not see, so runs of a few
    # seconds rather than every other frame.
    run_frames: int = 6


@dataclass(frozen=True)
class Waiting:
    """A live frame waiting for a place."""

    last_started: float  # when its session's previous frame started (the longest ago goes first)
    received: float  # when it arrived
    budget: float  # seconds its caption may take (one frame period)
    run: int = 0  # its session's frames started in a row before it, each following the last (0: after a gap)


class Governor:
    def __init__(
        self, limit: int, config: OverloadConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """limit: the most frames in flight at once (the engine's session rows)."""
        self.cfg = config or OverloadConfig()
        self.limit = limit
        self.cap = limit
        self.clock = clock
        self.ratio = 0.0  # moving average of measured service time / budget
        self.tick_s = 0.0  # moving average of a tick's duration
        self.ticks = self.cfg.prior_ticks  # the `quantile` of the ticks the last captions took
        self.tick_counts: collections.deque[int] = collections.deque(maxlen=self.cfg.tick_window)
        self.last_growth = -1e9
        self.budget = 0.0  # moving average of the live frames' budgets
        self.last_decrease = -1e9
        self.last_waiting = -1e9  # when frames last had to wait for a place
        self.waiting = 0  # frames waiting for a place at the last admission round
        self.slow_ticks = 0  # ticks in a row whose prediction was above `high`

    def choose(self, in_flight: int, waiting: Sequence[Waiting], now: float) -> tuple[list[int], list[int]]:
        """The waiting live frames (one a session) to start now and to drop, as indices into
        `waiting`. As many start as there are places: first the frames that continue a run (the
        session's previous frames captioned one after another, fewer than `run_frames` of them),
        then in turn, the sessions that started a frame longest ago first. While places are
        short, a frame that has waited `max_wait` of its budget goes after every fresh one, and
        is dropped if it gets no place: started, its lag would be its wait plus up to its whole
        budget. A late frame still takes a place no fresh frame wants, so no place idles for want
        of a fresh frame. A frame that continues a run is never late: it waited for its own
        session's previous caption (a restatement may take two budgets), not for a place."""
        n = self.admit(in_flight, len(waiting))
        in_run = {i for i, w in enumerate(waiting) if 0 < w.run < self.cfg.run_frames}
        turn = sorted(range(len(waiting)), key=lambda i: (i not in in_run, waiting[i].last_started))
        if n >= len(waiting):
            return turn, []
        late = {
            i
            for i in turn
            if i not in in_run and now - waiting[i].received >= self.cfg.max_wait * waiting[i].budget
        }
        order = [i for i in turn if i not in late] + [i for i in turn if i in late]
        start = order[:n]
        return start, [i for i in order[n:] if i in late]

    def admit(self, in_flight: int, wanting: int) -> int:
        """How many of the `wanting` frames may start now, with `in_flight` running."""
        n = max(0, min(wanting, self.cap - in_flight))
        self.waiting = wanting - n
        if self.waiting:
            self.last_waiting = self.clock()
        return n

    def tick(self, seconds: float, in_flight: int) -> None:
        """An engine step took `seconds` with `in_flight` live frames running."""
        c = self.cfg
        self.tick_s = seconds if self.tick_s == 0.0 else (1 - c.ema) * self.tick_s + c.ema * seconds
        if not self.budget or in_flight < 2:
            return
        predicted = self.tick_s * self.ticks / self.budget
        self.slow_ticks = self.slow_ticks + 1 if predicted > c.high else 0
        now = self.clock()
        if self.slow_ticks >= c.sustained and now - self.last_decrease >= c.settle_tick:
            self.cap = max(1, min(self.cap, int(in_flight * c.high / predicted)))
            self.last_decrease = now

    def done(
        self, service_s: float, budget_s: float | None, in_flight: int, ticks: int | None = None
    ) -> None:
        """A frame's caption ended after `service_s` seconds (`ticks` engine steps) of its
        `budget_s` (None: offline, no budget); `in_flight`: live frames in flight when it ended,
        itself included."""
        if not budget_s:
            return
        c = self.cfg
        r = service_s / budget_s
        self.ratio = r if self.ratio == 0.0 else (1 - c.ema) * self.ratio + c.ema * r
        self.budget = budget_s if self.budget == 0.0 else (1 - c.ema) * self.budget + c.ema * budget_s
        if ticks:
            self.tick_counts.append(ticks)
            ordered = sorted(self.tick_counts)
            self.ticks = float(ordered[min(len(ordered) - 1, int(c.quantile * len(ordered)))])
        now = self.clock()
        if r > c.over and now - self.last_decrease >= c.settle:
            self.cap = max(1, min(self.cap, int(in_flight * c.decrease)))
            self.last_decrease = now
        elif r < c.low and self.waiting and self.cap < self.limit and now - self.last_growth >= c.grow_every:
            self.cap += 1
            self.last_growth = now

    def started(self, budget_s: float | None) -> None:
        """A live frame started: its budget is known before any frame has finished (a burst)."""
        if budget_s and not self.budget:
            self.budget = budget_s

    @property
    def overloaded(self) -> bool:
        """Frames are held back for lack of places now, or were within hold_s."""
        return self.clock() - self.last_waiting < self.cfg.hold_s

    @property
    def headroom(self) -> float:
        """The share of a frame's budget its caption leaves unused (moving average), 0 while
        overloaded."""
        return 0.0 if self.overloaded else max(0.0, 1.0 - self.ratio)
