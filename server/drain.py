"""Graceful drain: what the server does between SIGTERM and exit (docs/scaling.md).

Order, chosen so that no session is cut and a load balancer never sends a new one here:
1. `ctx.draining` is set: `/readyz` answers 503 `draining` (the replica leaves the rotation), new
   websockets get `capacity` / 1013 "draining" and uploads 503, while the listening socket stays open
   (a closed port would turn the load balancer's next try into a connection error, not a clean retry).
2. Every open session gets `session.draining` with its deadline, has its frames in flight captioned,
   then `session.closed` (reason `draining`) and close 1012 (service restart): clients reconnect, and
   the load balancer routes them to another replica.
3. The process exits once every session is closed and every upload in progress has been answered,
   or when the grace period (`drain_seconds`) ends.

uvicorn's own SIGTERM handling closes the listening socket and then fails every websocket with 1012
at once, with no event first. `DrainingServer` runs the drain before that: uvicorn's signal handler
only sets `should_exit`, and its `shutdown` is where the sockets are closed, so the drain goes first
in an override of `shutdown`. A second SIGTERM or Ctrl-C (uvicorn's `force_exit`) ends the drain early.
uvicorn re-raises the signal it caught once it has stopped (the process then dies of SIGTERM, status
143); after a drain the stop was orderly, so SIGTERM is not re-raised and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

import uvicorn

from casa_live.server.context import ServerContext

log = logging.getLogger("casa.server")

# Sessions must be closed this long before the grace period ends, so their close frames get out and
# uvicorn's own shutdown finds nothing left to cut.
CLOSE_MARGIN = 1.0


async def drain(ctx: ServerContext, grace: float, abort: Callable[[], bool] = lambda: False) -> int:
    """Drain every open session within `grace` seconds; returns how many were still open at the end."""
    start = time.monotonic()
    deadline = start + grace
    ctx.drain_deadline = max(start, deadline - min(CLOSE_MARGIN, grace / 4))
    ctx.draining = True
    ctx.metrics.draining.set(1)
    sessions = list(ctx.sessions)
    log.info("draining %d session(s) for up to %.1f s before stopping", len(sessions), grace)
    for session in sessions:
        ctx.drain_tasks.add(asyncio.create_task(session.drain(ctx.drain_deadline)))
    while (ctx.sessions or ctx.uploads) and time.monotonic() < deadline and not abort():
        await asyncio.sleep(0.05)
    left = len(ctx.sessions)
    for task in ctx.drain_tasks:
        task.cancel()
    log.info(
        "drain finished in %.2f s: %s",
        time.monotonic() - start,
        f"{left} session(s) still open, cut now" if left else "every session closed",
    )
    return left


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains the app's sessions first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    async def shutdown(self, sockets: list | None = None) -> None:
        if self.ctx.ready:
            await drain(self.ctx, self.ctx.settings.drain_seconds, abort=lambda: self.force_exit)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [sig for sig in captured if sig != signal.SIGTERM]
        await super().shutdown(sockets)
