"""`casa stream --ask/--ask-every/--interactive`: questions about the stream, and their answers.

Design (docs/protocol.md, "response.create and response.cancel"):
- Questions are `response.create` events, answered on a side branch of the session about its latest
  captioned frame. They wait in one queue that outlives the connection: the `--ask` questions go in
  before the first session, again every `ask_every` seconds of stream time (the pts of the frames
  sent), and each line typed on stdin (read by a daemon thread) goes in as it is typed.
- One task per connection, the asker (`send`), sends them, at most MAX_RESPONSES_IN_FLIGHT at once
  (the server refuses a fifth), with the response id as the event id, so that an `error` about one
  names it. Each `response.done` (or such an error) becomes an `Answer`: a line on stdout and a JSONL
  record.
- Before `session.close` the streamer waits (bounded, `settle`) for the answers in flight, since
  closing a session discards its questions; questions a dropped connection took with it are asked
  again on the next session (`connection_ended`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import threading
import time
from typing import Protocol, TextIO

from casa_live.clients import wire
from casa_live.clients.printer import LivePrinter
from casa_live.clients.writers import Answer, CaptionWriter


class Tally(Protocol):
    """The stream's counters that questions add to (StreamStats)."""

    asked: int
    answered: int


class Questions:
    """The questions of one stream: a queue across connections, and the ones in flight on the
    current connection. Runs on the streamer's event loop (the stdin reader hands lines over)."""

    def __init__(
        self,
        questions: list[str],
        ask_every: float | None,
        max_new_tokens: int | None,
        writers: list[CaptionWriter],
        printer: LivePrinter,
        tally: Tally,
    ) -> None:
        self.questions, self.ask_every, self.max_new_tokens = questions, ask_every, max_new_tokens
        self.writers, self.printer, self.tally = writers, printer, tally
        self.answers: list[Answer] = []
        self._queue: collections.deque[tuple[str, str]] = collections.deque()  # (response id, question)
        self._asked: dict[str, str] = {}  # response id -> question, sent on this connection, not done
        self._wake = asyncio.Event()  # a question queued, or one done
        self._seq = 0
        self._next_at = ask_every  # stream time of the next --ask-every round

    def in_flight(self, rid: str | None) -> bool:
        """Whether `rid` names a question sent on this connection and not answered yet."""
        return rid is not None and rid in self._asked

    # ---- queueing -----------------------------------------------------------------------------
    def queue(self, question: str) -> bool:
        """Queue a question with the next response id; False (and a message) for one the server
        would refuse (blank, or above MAX_QUESTION_CHARS)."""
        from pydantic import ValidationError

        question = question.strip()
        rid = f"q{self._seq + 1}"
        try:
            wire.response_create(rid, question, self.max_new_tokens)
        except ValidationError as e:
            why = "; ".join(err["msg"] for err in e.errors())
            self.printer.message(f"question not asked: {why} (at most {wire.MAX_QUESTION_CHARS} characters)")
            return False
        self._seq += 1
        self._queue.append((rid, question))
        self._wake.set()
        return True

    def ask_again(self, stream_time: float) -> None:
        """--ask-every: queue the --ask questions again once the stream reaches the next round."""
        every = self.ask_every
        if not every or self._next_at is None or stream_time < self._next_at:
            return
        while self._next_at <= stream_time:
            self._next_at += every
        for question in self.questions:
            self.queue(question)

    def start_reader(self, loop: asyncio.AbstractEventLoop, stdin: TextIO | None) -> None:
        """--interactive: a daemon thread reads stdin; each non-blank line is queued as a question. A
        daemon, not asyncio.to_thread: a read blocked on a terminal must not hold up the exit."""
        stream = stdin or sys.stdin

        def read() -> None:
            for line in iter(stream.readline, ""):
                if line.strip():
                    try:
                        loop.call_soon_threadsafe(self.queue, line)
                    except RuntimeError:  # the loop is closed: the stream is over
                        return

        self.printer.message(
            "interactive: type a question and press Enter; it is asked about the current frame"
        )
        threading.Thread(target=read, name="casa-questions", daemon=True).start()

    # ---- one connection -----------------------------------------------------------------------
    async def send(self, ws, draining: asyncio.Event) -> None:
        """The asker: send queued questions, at most MAX_RESPONSES_IN_FLIGHT in flight. A question
        whose send fails stays queued for the next session."""
        from websockets.exceptions import ConnectionClosed

        while True:
            while not self._queue or len(self._asked) >= wire.MAX_RESPONSES_IN_FLIGHT or draining.is_set():
                self._wake.clear()
                await self._wake.wait()
            rid, question = self._queue[0]
            try:
                await ws.send(wire.response_create(rid, question, self.max_new_tokens))
            except ConnectionClosed:
                return
            self._queue.popleft()
            self._asked[rid] = question
            self.tally.asked += 1

    async def settle(
        self,
        receiver: asyncio.Task,
        asker: asyncio.Task,
        draining: asyncio.Event,
        interrupted: asyncio.Event,
        close_timeout: float,
    ) -> None:
        """Before session.close: closing a session discards its questions, so wait (bounded) for the
        answers in flight, and, unless interrupted, for the questions still queued to be asked and
        answered."""
        if draining.is_set():
            return
        deadline = time.monotonic() + (min(close_timeout, 3.0) if interrupted.is_set() else close_timeout)

        def waiting() -> bool:
            return bool(self._asked) or (not interrupted.is_set() and bool(self._queue))

        while waiting() and not receiver.done() and not asker.done():
            left = deadline - time.monotonic()
            if left <= 0:
                self.printer.message(
                    f"warning: {len(self._asked) + len(self._queue)} question(s) got no answer within "
                    f"{close_timeout:.0f} s; closing anyway"
                )
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, 0.25))

    def answered(self, result: wire.ResponseResult, offset: int) -> None:
        """A `response.done`; `offset` turns the session's frame index into the stream's."""
        question = self._asked.pop(result.id, None)
        if question is None:
            return  # not one of ours (or already settled)
        frame = None if result.frame is None else offset + result.frame
        self._record(
            Answer(
                result.id,
                question,
                frame,
                result.pts,
                result.text,
                result.status,
                result.ttft_ms,
                result.latency_ms,
            )
        )
        if result.status in ("completed", "incomplete"):
            self.tally.answered += 1

    def refused(self, rid: str, message: str) -> None:
        """The server answered the question's response.create with an error."""
        question = self._asked.pop(rid)
        self._record(Answer(rid, question, None, None, "", "failed", error=message))

    def connection_ended(self, retry: bool) -> None:
        """Questions this connection took with it: asked again on the next session (`retry`: the
        stream goes on there), or recorded as failed when the stream ends here."""
        if not self._asked:
            return
        lost = list(self._asked.items())
        self._asked.clear()
        if retry:
            self._queue.extendleft(reversed(lost))
            return
        for rid, question in lost:
            self._record(
                Answer(rid, question, None, None, "", "failed", error="no answer before the session ended")
            )

    def stream_ended(self) -> None:
        """Questions typed too late, or requeued after the last session: recorded as failed."""
        for rid, question in self._queue:
            self._record(Answer(rid, question, None, None, "", "failed", error="the stream ended first"))
        self._queue.clear()

    def _record(self, answer: Answer) -> None:
        self.answers.append(answer)
        for w in self.writers:
            w.write_answer(answer)
        self.printer.answer(answer)
        self._wake.set()
