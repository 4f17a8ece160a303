"""The websocket transport of one session: a receive task and an emit task joined by the session's
bounded outbound queue, plus a small stats ticker.

`Session` (server/session.py) knows nothing about websockets; this module owns the connection's
life: accept-time capacity errors, the idle and maximum-duration timeouts, the mapping of a session
error to a close code, and letting the last events out before the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from casa_live.server import protocol as p
from casa_live.server.errors import CasaError, SessionTimeout, report
from casa_live.server.session import CloseRequest, Session

if TYPE_CHECKING:
    from casa_live.server.context import ServerContext

log = logging.getLogger("casa.session")


async def serve_websocket(ws: WebSocket, ctx: ServerContext) -> None:
    """Run one accepted websocket connection to its end."""
    m = ctx.metrics
    session = Session(ctx)
    try:
        await session.start()
    except CasaError as exc:
        event, code = report(exc, m, session_id=session.id)
        m.sessions_rejected_total.labels("capacity").inc()
        await ws.send_text(p.dump(event))
        await ws.close(code or p.CloseCode.TRY_AGAIN)
        return
    m.sessions_active.inc()
    ctx.sessions.add(session)
    if ctx.draining:  # admitted just before the drain began: drain it with the others
        ctx.drain_tasks.add(asyncio.create_task(session.drain(ctx.drain_deadline)))
    emitter = asyncio.create_task(_emit(ws, session))
    ticker = asyncio.create_task(_tick(session, ctx.settings.stats_interval_seconds))
    outcome = "disconnected"
    try:
        outcome = await _receive(ws, session, ctx)
        if session.drained:
            outcome = "drained"
        elif outcome == "closed":
            session.finish("client", p.CloseCode.NORMAL)
    except Exception as exc:  # the one mapping point (errors.report) decides what the client sees
        outcome = "timeout" if isinstance(exc, SessionTimeout) else "error"
        code = session.send_error(exc)
        session.finish("session_timeout" if outcome == "timeout" else "error", code or p.CloseCode.INTERNAL)
    except asyncio.CancelledError:
        outcome = "shutdown"
        raise
    finally:
        # synchronous bookkeeping first: a cancelled task (server shutdown) may not await anything
        ticker.cancel()
        ctx.sessions.discard(session)
        session.close()
        m.sessions_active.dec()
        m.sessions_total.labels(outcome).inc()
        log.info(
            "session %s ended: %s (%d frames captioned, %d dropped)",
            session.id,
            outcome,
            session.captioned,
            session.dropped,
        )
        if outcome in ("closed", "timeout", "error", "drained"):  # let the last events and the close go out
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(emitter), 10.0)
        emitter.cancel()


async def _receive(ws: WebSocket, session: Session, ctx: ServerContext) -> str:
    s = ctx.settings
    started = time.monotonic()
    while True:
        left = s.max_session_seconds - (time.monotonic() - started)
        if left <= 0:
            raise SessionTimeout(
                f"the session reached its maximum duration of {s.max_session_seconds:g} s; reconnect"
            )
        try:
            message = await asyncio.wait_for(ws.receive(), min(s.idle_timeout_seconds, left))
        except asyncio.TimeoutError:
            if time.monotonic() - started >= s.max_session_seconds:
                continue  # reported at the top of the loop
            if session.unfinished or session.markers:
                continue  # the client waits for captions of what it sent: not idle
            raise SessionTimeout(
                f"no message for {s.idle_timeout_seconds:g} s; the session was closed (send frames or a marker "
                "to keep it open)"
            ) from None
        if message["type"] == "websocket.disconnect":
            return "disconnected"
        try:
            if message.get("text") is not None:
                close = await session.handle_text(message["text"])
                if close is not None:
                    await session.end_input()
                    await session.flush()
                    return "closed"
            elif message.get("bytes") is not None:
                await session.handle_binary(message["bytes"])
        except CasaError as exc:
            if exc.fatal:
                raise
            session.send_error(exc)


async def _emit(ws: WebSocket, session: Session) -> None:
    while True:
        event = await session.out.get()
        if isinstance(event, CloseRequest):
            if ws.client_state == WebSocketState.CONNECTED:
                await ws.close(event.code)
            return
        try:
            await ws.send_text(p.dump(event))
        except (WebSocketDisconnect, RuntimeError, OSError):
            return


async def _tick(session: Session, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        session.emit_stats_if_changed()
