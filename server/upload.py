"""`POST /v1/captions`: caption a whole uploaded video and answer JSON, SRT or WebVTT.

The body is the raw video file (`curl --data-binary @clip.mp4`), so no multipart parser is needed.
Query parameters: `format=json|srt|vtt` (default json) and any session setting (`prompt`, `fps`,
`max_new_tokens`, `temperature`, `top_k`, `repetition_penalty`, `no_repeat_ngram`, `seed`).

It runs exactly the streaming path: a `Session` in offline mode (every sampled frame captioned in full,
no real-time budget, backpressure instead of drops) fed by a seekable PyAV decode in a thread, so an
upload holds one model slot like a websocket session and batches with them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from server import protocol as p
from server.decode import decode_file
from server.errors import CasaError, report
from server.session import LoopSink, Session

MAX_UPLOAD_BYTES = 512 << 20
FORMATS = {"json", "srt", "vtt"}


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segments: list[p.CaptionSegment]) -> str:
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
        for i, s in enumerate((s for s in segments if s.text), 1)
    ]
    return "\n".join(cues)


def to_vtt(segments: list[p.CaptionSegment]) -> str:
    cues = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in segments if s.text
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def caption_upload(ctx, request: Request) -> Response:  # type: ignore[no-untyped-def]
    query = dict(request.query_params)
    query.pop("token", None)
    fmt = query.pop("format", "json")
    if fmt not in FORMATS:
        return _error(400, "invalid_settings", f"format must be one of {sorted(FORMATS)}")
    try:
        settings = p.SessionSettings.model_validate({**query, "mode": "offline"})
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        ctx.metrics.errors_total.labels("invalid_settings").inc()
        return _error(400, "invalid_settings", detail)
    data = await request.body()
    if not data:
        return _error(
            400, "bad_frame", "empty body: POST the video file's bytes (curl --data-binary @clip.mp4)"
        )
    if len(data) > MAX_UPLOAD_BYTES:
        return _error(413, "frame_too_large", f"uploads are limited to {MAX_UPLOAD_BYTES >> 20} MiB")

    session = Session(ctx, record=True)
    m = ctx.metrics
    try:
        await session.start(settings)
    except CasaError as exc:
        event, _ = report(exc, m, session_id=session.id)
        status = 503 if exc.code == p.ErrorCode.CAPACITY else 400
        return _error(status, event.code.value, event.message)
    m.sessions_active.inc()
    outcome = "error"
    try:
        # its own thread, not the shared pool: the decoder blocks on backpressure for as long as the
        # file takes, and live sessions' image decodes must not queue behind it
        with ThreadPoolExecutor(1, thread_name_prefix="casa-upload") as pool:
            warning = await asyncio.get_running_loop().run_in_executor(
                pool, decode_file, data, session.limits, session.resampler.keep, LoopSink(session)
            )
        await asyncio.sleep(0)  # let the decode thread's last callbacks run
        await session.flush()
        outcome = "closed"
    except CasaError as exc:
        event, _ = report(exc, m, session_id=session.id)
        return _error(400, event.code.value, event.message)
    finally:
        session.close()
        m.sessions_active.dec()
        m.sessions_total.labels(outcome).inc()

    segments = session.segments or []
    if fmt == "srt":
        return PlainTextResponse(to_srt(segments), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(segments), media_type="text/vtt")
    body = {
        "model": ctx.model_name,
        "fps": session.settings.fps,
        "frames_received": session.received,
        "frames_captioned": session.captioned,
        "segments": [s.model_dump(exclude={"type", "event_id"}) for s in segments],
    }
    if warning:
        body["warning"] = warning
    return JSONResponse(body)
