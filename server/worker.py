"""The inference worker: one thread owns the model Engine; nothing else touches it.

Each tick:
1. run queued commands from the event loop (open / close / update a session's slot);
2. admit: every open slot whose engine row is free and whose mailbox holds a frame submits it;
3. one `engine.step()`: the vision tower for all newly submitted frames, then one forward over every
   row with work (frame prefills and token decodes of different sessions in one batch);
4. hand each session its tokens, with timings, on the event loop (`call_soon_threadsafe`).

The loop talks to the worker only through `Slot` handles, never engine rows: a prompt change reopens
the session's engine row at the next frame boundary and the row may change underneath. What the loop
needs to know about the engine (free rows) the worker publishes as plain counters after each tick.
The worker does not own the engine's lifetime: whoever made the engine shuts it down (server/app.py).

Latest frame wins: a live slot's mailbox holds one frame; a newer frame replaces it and the replaced
one is reported as dropped (stale). Offline slots queue every frame (the session applies backpressure).

Failure containment: anything that fails for one slot (its prompt, its frame's preprocessing, its
listener) is reported to that session only. A failing batched step cannot be pinned on one row, so the
rows that took part are reset (their text context is lost, the sessions go on) and told with a
non-fatal `internal` error; rows without work in that step are untouched; the thread keeps running.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from casa_live.model.engine.engine import (
    CapacityError,
    Engine,
    ScoreEvent,
    SessionSettings,
    StepFailed,
    TokenEvent,
)
from casa_live.model.engine.threads import name_this_thread
from casa_live.server.errors import (
    Capacity,
    CasaError,
    FrameFailed,
    InternalError,
    InvalidRequest,
    InvalidSettings,
)
from casa_live.server.metrics import Metrics
from casa_live.server.overload import Governor, Waiting

log = logging.getLogger("casa.worker")

# The deadline of a stream's first caption, and of one that restates the scene after a gap
# (Worker._restate), in frame budgets: it lists every object (up to 26 tokens for the bundled model,
# where a change is 3-10), and the session's next frame waits for it rather than being dropped.
RESTATE_BUDGETS = 2.0


@dataclass
class FrameJob:
    index: int  # frame index in the session (sampled frames, from 0)
    pts: float  # seconds
    image: np.ndarray  # (h, w, 3) uint8 at the engine processor's size (server/ingest/frames.py)
    received: float  # time.monotonic() when the frame was decoded
    budget: float | None  # live mode: seconds its caption may take from its start (1/fps); None offline


@dataclass
class FrameOutput:
    """What one step produced for one frame (delta text, or its end)."""

    job: FrameJob
    text: str
    at: float  # time.monotonic()
    done: bool = False
    reason: str | None = None
    tokens: int = 0  # tokens generated so far for this frame, stop token included
    first_token_at: float | None = None
    restated: bool = False  # the row started over before this frame (Worker._admit): it restates the scene


@dataclass
class AskJob:
    """A question (response.create) for the session's current frame."""

    id: str
    question: str
    max_new_tokens: int | None
    received: float  # time.monotonic() when the event arrived


@dataclass
class ResponseOutput:
    """What happened to one answer: it started on a frame, a piece of text, or its end."""

    id: str
    at: float  # time.monotonic()
    started: FrameJob | None = None  # the frame whose image the answer sees (when it starts)
    delta: str = ""
    status: str | None = None  # when done: completed | incomplete | cancelled | failed
    error: CasaError | None = None  # why it failed, when the client can do something about it
    token: bool = False  # the model produced a token (a stop token carries no text)


class Listener(Protocol):
    """A session, as the worker sees it. Every method runs on the event loop."""

    def worker_output(self, outputs: list[FrameOutput], kv_tokens: int) -> None: ...
    def worker_dropped(self, job: FrameJob, reason: str) -> None: ...
    def worker_failed(self, job: FrameJob | None, error: CasaError) -> None: ...
    def worker_responses(self, outputs: list[ResponseOutput]) -> None: ...
    def worker_scores(self, job: FrameJob, scores: dict[str, float]) -> None: ...


@dataclass
class _InFlight:
    job: FrameJob
    started: float = 0.0  # time.monotonic() when submitted to the engine
    started_tick: int = 0  # the worker's step count then
    tokens: int = 0
    first_at: float | None = None
    last_at: float | None = None
    frame: int = -1  # the engine's index of this frame in the row (Engine.submit_frame)
    budget: float | None = None  # seconds its caption may take (the job's, or more for a restatement)
    restated: bool = False  # the row started over before it


@dataclass(eq=False)
class Slot:
    """A session's seat in the engine. Fields below `listener` belong to the worker thread."""

    listener: Listener
    prompt: str | None
    settings: SessionSettings
    live: bool = True
    row: int = -1
    mailbox: collections.deque[FrameJob] = field(default_factory=collections.deque)
    inflight: _InFlight | None = None
    reset_to: tuple[str | None, SessionSettings] | None = None  # prompt change at the next frame
    closed: bool = False
    checked: SessionSettings | None = None  # the settings object last found computable
    questions: collections.deque[AskJob] = field(default_factory=collections.deque)  # waiting
    last_captioned: FrameJob | None = None  # the frame captioned last
    watches: list[tuple[str, str]] = field(default_factory=list)  # (id, question), scored per frame
    last_started: float = 0.0  # when its last frame started (the governor serves the longest waiting first)
    run: int = 0  # frames started in a row, each the successor of the one captioned before it


@dataclass
class _Answer:
    """A question being answered on a branch row."""

    job: AskJob
    slot: Slot


class Worker:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        threads: int = 0,
        pace_per_session: float = 0.0,
        max_interval: float = 0.0,
        governor: Governor | None = None,
    ) -> None:
        """governor: holds live frames back past capacity (server/overload.py); None: every frame
        starts as soon as its row is free."""
        self.engine, self.metrics, self.loop, self.threads = engine, metrics, loop, threads
        self.governor = governor
        self._ticks = 0  # engine steps run
        self._prev_step = (0.0, 0.0)  # perf_counter() at the last step's start and end
        self.pace_per_session, self.max_interval = pace_per_session, max_interval
        self._cv = threading.Condition()
        self._commands: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque()
        )
        self._slots: list[Slot] = []
        self._answers: dict[int, _Answer] = {}  # branch row -> the question it answers
        self._stop = False
        self._last_step = 0.0
        self._thread = threading.Thread(target=self._run, name="casa-worker", daemon=True)
        # published for the event loop (readiness, the free-slots gauge): an int, replaced whole
        self.free_rows = engine.max_sessions

    # ---- event-loop side API ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._commands.append((fn, future))
            self._cv.notify_all()
        return await asyncio.wrap_future(future)

    async def open(
        self, listener: Listener, prompt: str | None, settings: SessionSettings, live: bool
    ) -> Slot:
        slot = Slot(listener, prompt, settings, live)

        def do() -> Slot:
            slot.row = self._engine_open(prompt, settings)
            self._slots.append(slot)
            return slot

        try:
            return await self._call(do)
        except asyncio.CancelledError:  # the caller went away: if the open ran after all, free its row
            self.close(slot)
            raise

    async def update(self, slot: Slot, prompt: str | None, settings: SessionSettings, live: bool) -> None:
        """New sampling settings apply now; a new prompt reopens the row before the next frame."""

        def do() -> None:
            if slot.closed:
                return
            if prompt != slot.prompt:
                self._check_prompt(prompt)
                slot.reset_to = (prompt, settings)
            self.engine.update(slot.row, settings)
            slot.settings, slot.live = settings, live

        await self._call(do)

    async def set_watches(self, slot: Slot, watches: list[tuple[str, str]]) -> None:
        """Score these (id, question) watches on each of the slot's frames from now on, replacing
        any before. InvalidSettings when the model cannot score them (nothing changed then)."""

        def do() -> None:
            if slot.closed:
                return
            try:
                self.engine.set_watches(slot.row, [q for _, q in watches])
            except ValueError as exc:
                raise InvalidSettings(f"watches unchanged: {exc}") from None
            slot.watches = list(watches)

        await self._call(do)

    def close(self, slot: Slot) -> None:
        """Release the slot (fire and forget: the row is recycled on the worker thread)."""

        def do() -> None:
            if slot.closed or slot not in self._slots:  # already closed, or never opened
                slot.closed = True
                return
            slot.closed = True
            self._slots.remove(slot)
            self.engine.close(slot.row)
            self._discard_questions(slot)
            # the step loop sets this gauge only when a step runs: without this, the last session's
            # tokens would stay on the dashboard after it leaves
            self.metrics.kv_cache_tokens.set(sum(self.engine.kv_tokens(s.row) for s in self._slots))

        self._command(do)

    def ask(self, slot: Slot, job: AskJob) -> None:
        """Queue a question; it is answered on a branch as soon as the slot's row can branch (CASA:
        from its first frame's start; token insertion: at its next frame boundary)."""

        def do() -> None:
            if slot.closed:
                self._notify(
                    slot, "worker_responses", [ResponseOutput(job.id, time.monotonic(), status="cancelled")]
                )
            else:
                slot.questions.append(job)

        self._command(do)

    def cancel(self, slot: Slot, response_id: str) -> None:
        """End a question, waiting or being answered, with status cancelled."""

        def do() -> None:
            if self._discard_questions(slot, response_id):
                out = ResponseOutput(response_id, time.monotonic(), status="cancelled")
                self._notify(slot, "worker_responses", [out])

        self._command(do)

    def _discard_questions(self, slot: Slot, response_id: str | None = None) -> bool:
        """Drop the slot's questions (only `response_id`'s when given), waiting or being answered:
        their branches are freed, and the session's row never saw them. Whether any was found."""
        waiting = [j for j in slot.questions if response_id is None or j.id == response_id]
        for job in waiting:
            slot.questions.remove(job)
        running = [
            b
            for b, a in self._answers.items()
            if a.slot is slot and (response_id is None or a.job.id == response_id)
        ]
        for b in running:
            del self._answers[b]
            self.engine.close(b)
        return bool(waiting or running)

    def _command(self, fn: Callable[[], Any]) -> None:
        """Run fn on the worker thread (fire and forget)."""
        with self._cv:
            self._commands.append((fn, concurrent.futures.Future()))
            self._cv.notify_all()

    def offer(self, slot: Slot, job: FrameJob) -> None:
        """Queue a frame for captioning (from the event loop). Live: the newest frame replaces a
        waiting one: `stale` when it waited for its session's previous caption, `overload` when
        the row was free and the frame waited for a place (the governor's cap)."""
        replaced = None
        with self._cv:
            if slot.live and slot.mailbox:
                replaced = slot.mailbox.popleft()
                reason = "stale" if slot.inflight is not None else "overload"
            slot.mailbox.append(job)
            self._cv.notify_all()
        if replaced is not None:
            slot.listener.worker_dropped(replaced, reason)

    # ---- worker thread ------------------------------------------------------------------------

    def _engine_open(self, prompt: str | None, settings: SessionSettings) -> int:
        self._check_prompt(prompt)
        try:
            return self.engine.open(prompt, settings)
        except CapacityError:
            raise Capacity(
                f"all {self.engine.max_sessions} session slots are in use; retry later or ask the operator to "
                "raise --max-sessions"
            ) from None

    def _check_prompt(self, prompt: str | None) -> None:
        engine = self.engine
        n = len(engine.prompt_ids(prompt))
        limit = engine.max_prompt_tokens
        if n > limit:
            raise InvalidSettings(
                f"the prompt is {n} tokens; at most {limit} fit this model's context. Shorten it."
            )

    def _wake(self) -> None:
        """The vision pipeline's callback (vision thread): an encoded frame can start."""
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        name_this_thread("casa-worker")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.engine.set_frame_ready_callback(self._wake)
        try:
            self._loop()
        finally:
            self.engine.set_frame_ready_callback(None)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._commands and not self._ready():
                    self._cv.wait()
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled before it ran (the caller gave up): do nothing, claim nothing
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)
            self.free_rows = self.engine.free_rows()
            try:
                self._admit_questions()  # first: a branch copies the row before its next frame starts
                self._admit()
                if self.engine.has_work():
                    self._pace()
                    self._step()
                    # a backlog of more than a batch: the vision thread is the bottleneck, and
                    # the frames it has not reached would only wait (docs/engine.md)
                    if self.engine.vision_backlog() > self.engine.vision_batch:
                        self.engine.help_vision()
                else:  # nothing to step: encode queued frames beside the vision thread
                    self.engine.help_vision()
            except Exception:  # a bug here must not stop the one thread every session depends on
                log.exception("inference worker tick failed; continuing")
                time.sleep(0.01)

    def _pace(self) -> None:
        """Under load, space step starts by `pace_per_session` seconds per open session (at most
        `max_interval`): the rows that become ready meanwhile join the step, so each forward
        serves a larger batch, and the vision thread and the event loop get the CPU while the
        worker waits. A lone stream is not delayed (its interval is a fraction of a step).
        docs/engine.md has the measurements behind the defaults."""
        interval = min(self.max_interval, self.pace_per_session * len(self._slots))
        wait = self._last_step + interval - time.perf_counter()
        if wait > 0.0005:
            time.sleep(wait)
            self._admit()  # frames that arrived while waiting start in this step
        self._last_step = time.perf_counter()

    def _ready(self) -> bool:
        """Anything to do without a command: engine work, frames queued for the vision thread
        (the worker helps encode them when it has nothing to step), or a frame for a free row
        (lock held)."""
        if self.engine.has_work() or self.engine.vision_backlog():
            return True
        if any(s.questions and self.engine.can_ask(s.row) for s in self._slots):
            return True
        if not any(s.mailbox and s.inflight is None for s in self._slots):
            return False
        # past capacity a waiting frame is work only once a place frees up (no busy loop meanwhile)
        return self.governor is None or self._live_in_flight() < self.governor.cap

    def _live_in_flight(self) -> int:
        """Live frames in flight (the ones the governor counts: offline frames have no budget)."""
        return sum(1 for s in self._slots if s.inflight is not None and s.inflight.job.budget)

    def _admit_questions(self) -> None:
        """Start waiting questions on branches of rows at a frame boundary (a frame captioned, its
        caption closed), while branch rows are free."""
        now = time.monotonic()
        for slot in self._slots:
            outs = []
            while slot.questions and self.engine.can_ask(slot.row):
                job = slot.questions.popleft()
                try:
                    branch, frame = self.engine.ask(slot.row, job.question, job.max_new_tokens)
                except ValueError as exc:  # the question does not fit the model's window
                    outs.append(ResponseOutput(job.id, now, status="failed", error=InvalidRequest(str(exc))))
                    continue
                self._answers[branch] = _Answer(job, slot)
                outs.append(ResponseOutput(job.id, now, started=self._seen(slot, frame)))
            if outs:
                self._notify(slot, "worker_responses", outs)

    def _admit(self) -> None:
        # sessions with a frame waiting and a free row; past capacity the governor lets only some
        # start, the ones whose last frame started longest ago (each session gets its turn)
        free = [s for s in self._slots if s.inflight is None and s.mailbox]
        now = time.monotonic()
        if self.governor is not None and free:
            live: list[tuple[Slot, FrameJob]] = []
            with self._cv:
                for s in free:
                    if s.live and s.mailbox and s.mailbox[0].budget:
                        live.append((s, s.mailbox[0]))
            waiting = [
                Waiting(s.last_started, job.received, job.budget or 0.0, s.run if _follows(s, job) else 0)
                for s, job in live
            ]
            start, late = self.governor.choose(self._live_in_flight(), waiting, now)
            for i in late:
                self._drop_late(*live[i])
            live_slots = [s for s, _ in live]
            held = set(live_slots) - {live_slots[i] for i in start}
            free = [s for s in free if s not in held]
        for slot in free:
            with self._cv:
                job = slot.mailbox.popleft() if slot.mailbox else None
            if job is None:
                continue
            try:
                if slot.reset_to is not None:
                    prompt, settings = slot.reset_to
                    slot.reset_to = None
                    self._reopen(slot, prompt, settings)
                    if slot.closed:
                        continue
                follows = _follows(slot, job)
                restated = self._restate(slot, job)
                # the budget runs from the frame's start: a frame the governor held is not cut
                # for the time it waited (cutting at the deadline is a last resort). A stream's
                # first caption (its row fresh: a new session, or restated after a gap) lists the
                # whole scene, several times a change's length: it gets RESTATE_BUDGETS. A fleet
                # reconnecting at once starts all its first captions together.
                first = slot.last_captioned is None
                budget = job.budget if job.budget is None or not first else job.budget * RESTATE_BUDGETS
                deadline = None if budget is None else now + budget
                frame = self.engine.submit_frame(slot.row, job.image, deadline)
                slot.inflight = _InFlight(
                    job, started=now, started_tick=self._ticks, frame=frame, budget=budget, restated=restated
                )
                slot.last_started = now
                slot.run = slot.run + 1 if follows else 1
                if self.governor is not None:
                    self.governor.started(job.budget)
            except Exception:
                log.exception("frame %d could not be submitted", job.index)
                self._frame_failed(slot, job)

    def _restate(self, slot: Slot, job: FrameJob) -> bool:
        """After a gap (frames of the session not captioned since its last caption), a model whose
        captions narrate changes starts the row over: what changed across the gap is not one event
        a frame any more, and a stream's first caption restates the scene (GenerationConfig.
        restate_after_gap). The row keeps its settings and watches; questions wait for this frame."""
        last = slot.last_captioned
        if last is None or job.index == last.index + 1 or not self.engine.gen.restate_after_gap:
            return False
        self.engine.restart(slot.row, slot.prompt)
        slot.last_captioned = None  # the row holds no frame until this one starts
        self.metrics.captions_restated_total.inc()
        return True

    def _drop_late(self, slot: Slot, job: FrameJob) -> None:
        """Drop the slot's waiting live frame `job`, late past the governor's `max_wait` (reason
        `overload`), unless a newer frame has replaced it meanwhile: started, its lag would be
        its wait plus up to its whole budget."""
        with self._cv:
            if not slot.mailbox or slot.mailbox[0] is not job:
                return
            slot.mailbox.popleft()
        self._notify(slot, "worker_dropped", job, "overload")

    def _step(self) -> None:
        engine = self.engine
        for slot in self._slots:  # per row, before the batch: a row the sampler cannot compute never joins it
            if slot.checked is not slot.settings:
                if not _computable(slot.settings):
                    self._restore_defaults(slot)
                slot.checked = slot.settings  # checked once per settings object
        t0 = time.perf_counter()
        try:
            events = engine.step()
        except StepFailed as exc:  # the engine names the rows that took part
            log.error("engine step failed for rows %s; resetting them", exc.rows, exc_info=exc.__cause__)
            self._fail_answers([b for b in self._answers if b in exc.rows])
            self._reset_after_failure([s for s in self._slots if s.row in exc.rows])
            return
        except Exception:  # not the engine's own failure (nothing ran): the rows with a frame in flight
            log.exception("engine step failed; resetting the sessions with a frame in flight")
            self._fail_answers(list(self._answers))
            self._reset_after_failure([s for s in self._slots if s.inflight is not None])
            return
        dt = time.perf_counter() - t0
        now = time.monotonic()
        self._ticks += 1
        if self.governor is not None:
            # a caption's ticks come back to back under load: the interval between step starts
            # (pacing and the worker's own work included) is what a tick costs it; after an idle
            # gap, only the step itself
            back_to_back = t0 - self._prev_step[1] < 0.02
            self.governor.tick(t0 - self._prev_step[0] if back_to_back else dt, self._live_in_flight())
            self._prev_step = (t0, t0 + dt)
        m = self.metrics
        res = engine.last_result
        m.step_seconds.observe(dt)
        m.batch_size.observe(len(res.fed))
        for seconds in res.frame_vision_s:  # per frame (with the pipeline: its share of a batch)
            m.vision_encode_seconds.observe(seconds)
        if res.prefill_s:
            m.prefill_seconds.observe(res.prefill_s)
        by_row = {s.row: s for s in self._slots}
        outputs: dict[int, list[FrameOutput]] = {}
        answers: dict[Slot, list[ResponseOutput]] = {}
        scored = [ev for ev in events if isinstance(ev, ScoreEvent)]
        for ev in scored:  # told first: a frame's scores come before the next frame's tokens
            slot = by_row.get(ev.row)
            m.watch_scoring_seconds.observe(res.score_s / len(scored))  # each frame's share
            seen = None if slot is None else self._seen(slot, ev.frame)
            if slot is not None and seen is not None and len(ev.scores) == len(slot.watches):
                scores = {wid: round(x, 4) for (wid, _), x in zip(slot.watches, ev.scores)}
                self._notify(slot, "worker_scores", seen, scores)
        for ev in events:
            if isinstance(ev, ScoreEvent):
                continue
            if ev.row in self._answers:
                answer = self._answers[ev.row]
                status = None if not ev.done else ("completed" if ev.reason == "stop" else "incomplete")
                if ev.done:
                    del self._answers[ev.row]  # the engine freed the branch row
                answers.setdefault(answer.slot, []).append(
                    ResponseOutput(answer.job.id, now, delta=ev.text, status=status, token=True)
                )
                continue
            slot = by_row.get(ev.row)
            if slot is None or slot.inflight is None:
                continue
            if ev.reason == "error":  # the frame could not be encoded; the session goes on
                job, slot.inflight = slot.inflight.job, None
                self._frame_failed(slot, job)
                continue
            out = self._account(slot, ev, now)
            outputs.setdefault(ev.row, []).append(out)
            if ev.done:
                if self.governor is not None:
                    f = slot.inflight
                    self.governor.done(
                        now - f.started, f.budget, self._live_in_flight(), self._ticks - f.started_tick
                    )
                slot.last_captioned, slot.inflight = slot.inflight.job, None
        if events:
            m.generated_tokens_total.inc(
                sum(
                    1
                    for ev in events
                    if isinstance(ev, TokenEvent) and (ev.token is not None or ev.reason == "stop")
                )
            )
        for row, outs in outputs.items():
            self._notify(by_row[row], "worker_output", outs, engine.kv_tokens(row))
        for slot, outs in answers.items():
            self._notify(slot, "worker_responses", outs)
        m.kv_cache_tokens.set(sum(engine.kv_tokens(s.row) for s in self._slots))

    @staticmethod
    def _seen(slot: Slot, frame: int) -> FrameJob | None:
        """The session's frame that is the engine's frame `frame` of the slot's row: the one in
        flight (a CASA row's questions and watch scores see a frame from its start), else the
        one captioned last (token insertion: at the boundary after it)."""
        if slot.inflight is not None and slot.inflight.frame == frame:
            return slot.inflight.job
        return slot.last_captioned

    def _account(self, slot: Slot, ev: TokenEvent, now: float) -> FrameOutput:
        f = slot.inflight
        assert f is not None
        f.tokens += 1
        m = self.metrics
        if f.first_at is None:
            f.first_at = now
            m.time_to_first_token_seconds.observe(now - f.job.received)
        elif f.last_at is not None:
            m.inter_token_seconds.observe(now - f.last_at)
        f.last_at = now
        if ev.done:
            m.frame_latency_seconds.observe(now - f.job.received)
        return FrameOutput(f.job, ev.text, now, ev.done, ev.reason, f.tokens, f.first_at, f.restated)

    def _fail_answers(self, branches: list[int]) -> None:
        """Answers whose branch took part in a failed step: freed, told `failed` (the session goes on)."""
        now = time.monotonic()
        for b in branches:
            answer = self._answers.pop(b)
            self.engine.close(b)
            self._notify(
                answer.slot, "worker_responses", [ResponseOutput(answer.job.id, now, status="failed")]
            )

    def _reopen(self, slot: Slot, prompt: str | None, settings: SessionSettings) -> None:
        """Give the slot a fresh engine row (new prompt, or after a failure). If even that fails, the
        slot is lost: its session gets a fatal internal error and the connection closes."""
        self.engine.close(slot.row)
        slot.last_captioned = None  # the new row has seen no frame: questions wait for its first
        try:
            slot.row, slot.prompt, slot.settings = self._engine_open(prompt, settings), prompt, settings
            if slot.watches:  # they were checked when set: the same questions fit the new row
                self.engine.set_watches(slot.row, [q for _, q in slot.watches])
        except Exception:
            log.exception("could not reopen an engine row")
            slot.closed = True
            self._slots.remove(slot)
            self._notify(
                slot, "worker_failed", None, InternalError("the session lost its model slot; reconnect")
            )

    def _restore_defaults(self, slot: Slot) -> None:
        """Settings out of the sampler's range reached the worker (the server validates them first, so
        this guards other callers): the row keeps its context and goes on with default sampling."""
        log.error("row %d: sampling settings out of range; using the defaults", slot.row)
        slot.settings = SessionSettings()
        self.engine.update(slot.row, slot.settings)
        self._notify(
            slot,
            "worker_failed",
            None,
            FrameFailed("this session's sampling settings were out of range; the defaults apply now"),
        )

    def _reset_after_failure(self, slots: list[Slot]) -> None:
        for slot in slots:
            job = slot.inflight.job if slot.inflight else None
            slot.inflight = None
            self._reopen(slot, slot.prompt, slot.settings)
            if slot.closed:
                continue
            self._notify(
                slot,
                "worker_failed",
                job,
                FrameFailed(
                    "the model step failed (internal error); this session's caption context was reset and it continues"
                ),
            )

    def _frame_failed(self, slot: Slot, job: FrameJob) -> None:
        """One frame is lost to an internal error; its session is told and goes on."""
        self._notify(
            slot,
            "worker_failed",
            job,
            FrameFailed(f"frame {job.index} could not be captioned (internal error); the session continues"),
        )

    def _notify(self, slot: Slot, method: str, *args: Any) -> None:
        """Run a listener method on the event loop; a closed loop (shutdown) is not an error."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(getattr(slot.listener, method), *args)


def _follows(slot: Slot, job: FrameJob) -> bool:
    """The frame is the successor of the session's frame captioned last (no gap between them)."""
    return slot.last_captioned is not None and job.index == slot.last_captioned.index + 1


def _computable(settings: SessionSettings) -> bool:
    try:
        settings.validate()
    except ValueError:
        return False
    return True
