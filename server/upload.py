"""`POST /v1/captions`: caption a whole uploaded video and answer JSON, SRT or WebVTT.

The body is the raw video file (`curl --data-binary @clip.mp4`), so no multipart parser is needed.
Query parameters: `format=json|srt|vtt` (default json) and any session setting (`prompt`, `fps`,
`max_new_tokens`, `temperature`, `top_k`, `repetition_penalty`, `no_repeat_ngram`, `seed`). SRT and
WebVTT come from server/subtitles.py, the formatter the command-line streamer's writers use too.

`question=...` (repeatable, at most MAX_RESPONSES_IN_FLIGHT) asks about the file's LAST frame: once
every frame is captioned, each question is a `response.create` on the same session, answered at once
(the session is between frames) on a side branch, and the JSON answer gets `"answers": [{question,
frame, pts, text, status}]` in the order asked. Questions need format=json (SRT and WebVTT hold
captions only) and a model with a question template; otherwise 400 `invalid_request`, before the body
is read.

`watch=...` (repeatable, at most MAX_WATCHES; ids w1, w2, ... in order) finds when something happens
in the file: each is a watch of the session (the websocket's yes/no alert rules, scored on every
frame and debounced the same way), with `watch_threshold`, `watch_min_frames`, `watch_clear_frames`
and `watch_cooldown` (seconds) for all of them. The JSON answer gets `"watches": [{id, question,
threshold, ..., intervals: [{start, end, start_frame, end_frame, max_score, open_at_end}]}]`
(server/intervals.py says what an interval is), and each segment its `watch_scores`. Watches need
format=json and a model with a question template; otherwise 400 `invalid_settings`, before the body
is read.

It runs exactly the streaming path: a `Session` in offline mode (every sampled frame captioned in full,
no real-time budget, backpressure instead of drops) whose ingest thread runs a seekable PyAV decode,
so an upload holds one model slot like a websocket session and batches with them.

Memory is bounded before anything is decoded: a `Content-Length` above `max_upload_bytes` is refused
(413) before the body is read; the body is streamed and refused at the cap when it is not declared;
at most `max_concurrent_uploads` bodies are held at once (503 `capacity` past it, counted in
`casa_sessions_rejected_total`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from casa_live.server import protocol as p
from casa_live.server.context import ServerContext
from casa_live.server.errors import CasaError, clip, report
from casa_live.server.intervals import WatchIntervals, watch_intervals
from casa_live.server.session import Session
from casa_live.server.subtitles import to_srt, to_vtt

FORMATS = {"json", "srt", "vtt"}
ANSWER_TIMEOUT = 60.0  # seconds to wait for the answers once the captions are done
# query parameter -> the Watch field it sets for every watch= of the upload
WATCH_RULE = {
    "watch_threshold": "threshold",
    "watch_min_frames": "min_frames",
    "watch_clear_frames": "clear_frames",
    "watch_cooldown": "cooldown_s",
}


class UploadAnswer(BaseModel):
    question: str
    frame: int | None = Field(description="the frame the answer saw: the last one captioned")
    pts: float | None
    text: str
    status: Literal["completed", "incomplete", "cancelled", "failed"]


class UploadResult(BaseModel):
    """The JSON answer of POST /v1/captions (docs/protocol.md, "HTTP endpoints"); the optional parts
    are present only when asked for (dumped with exclude_unset)."""

    model: str
    fps: float | None
    frames_received: int
    frames_captioned: int
    segments: list[p.CaptionSegment]  # without `type`; `watch_scores` only with watches
    answers: list[UploadAnswer] | None = Field(default=None, description="with question=, in the order asked")
    watches: list[WatchIntervals] | None = Field(default=None, description="with watch=, in the order given")
    warning: str | None = Field(default=None, description="the file broke off partway")

    def body(self) -> dict:
        return self.model_dump(exclude_unset=True, exclude={"segments": {"__all__": {"type", "event_id"}}})


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _invalid(ctx: ServerContext, message: str) -> JSONResponse:
    ctx.metrics.errors_total.labels("invalid_settings").inc()
    return _error(400, "invalid_settings", message)


def _invalid_request(ctx: ServerContext, message: str) -> JSONResponse:
    ctx.metrics.errors_total.labels("invalid_request").inc()
    return _error(400, "invalid_request", message)


def _check_questions(ctx: ServerContext, questions: list[str], fmt: str) -> JSONResponse | None:
    """A 400 for questions the upload cannot answer, or None."""
    if not questions:
        return None
    if fmt != "json":
        return _invalid_request(
            ctx,
            f"questions need format=json (format={fmt} holds captions only); drop question= or ask for json",
        )
    if len(questions) > p.MAX_RESPONSES_IN_FLIGHT:
        return _invalid_request(
            ctx, f"{len(questions)} questions; an upload answers at most {p.MAX_RESPONSES_IN_FLIGHT}"
        )
    for i, question in enumerate(questions):
        try:
            p.ResponseRequest(question=question)
        except ValidationError as exc:
            why = "; ".join(clip(e["msg"], 200) for e in exc.errors(include_url=False, include_input=False))
            return _invalid_request(ctx, f"question {i + 1} is refused: {why}")
    if ctx.engine.gen.template.question is None:
        return _invalid_request(
            ctx,
            "this model answers no questions (its checkpoint has no question template); serve a model that "
            "does, or drop question=",
        )
    return None


def _check_watches(
    ctx: ServerContext, questions: list[str], rule: dict[str, str], fmt: str
) -> list[p.Watch] | JSONResponse:
    """The upload's watches (ids w1, w2, ...), or a 400 `invalid_settings` naming what to fix."""
    if not questions:
        if rule:
            return _invalid(ctx, f"{', '.join(sorted(rule))} set without a watch: add watch=QUESTION")
        return []
    if fmt != "json":
        return _invalid(
            ctx, f"watches need format=json (format={fmt} holds captions only); drop watch= or ask for json"
        )
    if len(questions) > p.MAX_WATCHES:
        return _invalid(
            ctx, f"{len(questions)} watches; an upload has at most {p.MAX_WATCHES}, like a session"
        )
    fields = {WATCH_RULE[k]: v for k, v in rule.items()}
    params = {v: k for k, v in WATCH_RULE.items()}
    try:  # the rule alone first, so that its errors name the query parameter
        p.Watch(id="w", question="?", **fields)
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False, include_input=False):
            name = params.get(str(e["loc"][0]), str(e["loc"][0]))
            problems.append(f"{name}={clip(rule.get(name, ''), 40)} is refused: {clip(e['msg'], 200)}")
        return _invalid(ctx, "; ".join(problems))
    watches = []
    for i, question in enumerate(questions, 1):
        try:
            watches.append(p.Watch(id=f"w{i}", question=question, **fields))
        except ValidationError as exc:
            why = "; ".join(clip(e["msg"], 200) for e in exc.errors(include_url=False, include_input=False))
            return _invalid(ctx, f"watch {i} is refused: {why}")
    if ctx.engine.gen.template.question is None:
        return _invalid(
            ctx,
            "this model scores no watches (its checkpoint has no question template); serve a model that "
            "does, or drop watch=",
        )
    return watches


def _too_large(ctx: ServerContext, what: str) -> JSONResponse:
    cap = ctx.settings.max_upload_bytes
    ctx.metrics.errors_total.labels("frame_too_large").inc()
    return _error(
        413,
        "frame_too_large",
        f"{what}; uploads are limited to {cap} bytes ({cap / (1 << 20):g} MiB): send a shorter or smaller file, "
        "or stream it over the websocket",
    )


async def caption_upload(ctx: ServerContext, request: Request) -> Response:
    query = dict(request.query_params)
    query.pop("token", None)
    questions = request.query_params.getlist("question")
    query.pop("question", None)
    watch_questions = request.query_params.getlist("watch")
    query.pop("watch", None)
    rule = {k: query.pop(k) for k in WATCH_RULE if k in query}
    fmt = query.pop("format", "json")
    if fmt not in FORMATS:
        return _invalid(ctx, f"format is {clip(fmt, 40)!r}; it must be one of {sorted(FORMATS)}")
    refused = _check_questions(ctx, questions, fmt)
    if refused is not None:
        return refused
    watches = _check_watches(ctx, watch_questions, rule, fmt)
    if isinstance(watches, JSONResponse):
        return watches
    try:
        settings = p.SessionSettings.model_validate({**query, "mode": "offline"})
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(clip(part, 40) for part in e['loc'])}: {clip(e['msg'], 300)}"
            for e in exc.errors(include_url=False, include_input=False)[:8]
        )
        return _invalid(ctx, f"upload rejected: {detail}")
    cap = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            ctx.metrics.errors_total.labels("bad_frame").inc()
            return _error(
                400, "bad_frame", "the Content-Length header is not a byte count: send the body's size"
            )
        if len(declared) > 18 or int(declared) > cap:  # refused before a byte of the body is read
            return _too_large(ctx, f"the body declares {clip(declared, 40)} bytes")
    m = ctx.metrics
    if ctx.uploads >= ctx.settings.max_concurrent_uploads:
        m.sessions_rejected_total.labels("capacity").inc()
        m.errors_total.labels("capacity").inc()
        return _error(
            503,
            "capacity",
            f"{ctx.settings.max_concurrent_uploads} uploads are already in progress; retry later",
        )
    ctx.uploads += 1
    try:
        return await _caption(ctx, request, settings, fmt, cap, questions, watches)
    finally:
        ctx.uploads -= 1


async def _caption(
    ctx: ServerContext,
    request: Request,
    settings: p.SessionSettings,
    fmt: str,
    cap: int,
    questions: list[str],
    watches: list[p.Watch],
) -> Response:
    data = bytearray()
    try:
        async for part in request.stream():  # streamed with a cap: the body is never held past it
            if len(data) + len(part) > cap:
                return _too_large(ctx, "the body is larger")
            data += part
    except ClientDisconnect:
        return _error(400, "bad_frame", "the client went away before the body was complete")
    if not data:
        ctx.metrics.errors_total.labels("bad_frame").inc()
        return _error(
            400, "bad_frame", "empty body: POST the video file's bytes (curl --data-binary @clip.mp4)"
        )

    session = Session(ctx, record=True)
    m = ctx.metrics
    try:
        await session.start(settings)
        if watches:
            # through session.update, the websocket's path: it sets both the model's scoring and the
            # session's alert debounce
            await session.update(p.SessionUpdate(session=p.SessionSettings(watches=watches)))
    except CasaError as exc:
        session.close()  # a refused watch list (too long for the model) must not keep the slot
        event, _ = report(exc, m, session_id=session.id)
        if exc.code == p.ErrorCode.CAPACITY:
            m.sessions_rejected_total.labels("capacity").inc()
            return _error(503, event.code.value, event.message)
        return _error(400, event.code.value, event.message)
    m.sessions_active.inc()
    outcome = "error"
    discard = asyncio.create_task(_discard(session))
    try:
        assert session.ingest is not None
        warning = await session.ingest.decode_file(data)  # on the session's own ingest thread
        del data
        await session.flush()
        answers = await _answer(session, questions)
        outcome = "closed"
    except Exception as exc:  # typed errors are 400; anything else is ours, answered as JSON all the same
        event, _ = report(exc, m, session_id=session.id)
        return _error(400 if isinstance(exc, CasaError) else 500, event.code.value, event.message)
    finally:
        session.close()
        discard.cancel()
        m.sessions_active.dec()
        m.sessions_total.labels(outcome).inc()

    segments = session.segments or []
    if fmt == "srt":
        return PlainTextResponse(to_srt(segments), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(segments), media_type="text/vtt")
    result = UploadResult(
        model=ctx.model_name,
        fps=session.settings.fps,
        frames_received=session.received,
        frames_captioned=session.captioned,
        segments=segments,
    )
    if questions:
        result.answers = answers
    if watches:
        # session.close() above ended the alerts still active (session_closed): every one is recorded
        events = session.watches.events or []
        result.watches = watch_intervals(watches, events, segments, session.settings.fps or 2.0)
    if warning:
        result.warning = warning
    return JSONResponse(result.body())


async def _discard(session: Session) -> None:
    """Empty the session's event queue as it fills. The upload answers from the session's records
    (segments, answers, alert events); the queue is the websocket's, which its emit task reads. Unread,
    it would fill after OUT_QUEUE events (a minute or two of video: each caption token is an event)
    and log every event after that as dropped."""
    while True:
        await session.out.get()


async def _answer(session: Session, questions: list[str]) -> list[UploadAnswer]:
    """Ask each question once every frame is captioned (so about the last one), and wait until the
    session has no response in flight. A question still unanswered at ANSWER_TIMEOUT (no frame was
    ever captioned) is `failed`, with no frame."""
    if not questions:
        return []
    ids = [
        session.ask(p.ResponseCreate(response=p.ResponseRequest(id=f"q{i + 1}", question=q)))
        for i, q in enumerate(questions)
    ]
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while session.responses and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # answers end at the row's step boundaries: a few ms each
    done = {a.id: a for a in session.answers or []}
    answers = []
    for rid, question in zip(ids, questions, strict=True):
        a = done.get(rid)
        answers.append(
            UploadAnswer(question=question, frame=a.frame, pts=a.pts, text=a.text, status=a.status)
            if a is not None
            else UploadAnswer(question=question, frame=None, pts=None, text="", status="failed")
        )
    return answers
