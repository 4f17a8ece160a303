"""`ServerContext`: what the routes, connections and sessions share (settings, metrics, the engine and
its worker, the live sessions, the upload budget, the drain state, the alert sinks). Its own module so
that app, connection, session and upload import it and not each other."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from casa_live.model.engine.settings import effective
from casa_live.server import protocol as p
from casa_live.server.alerts import AlertDispatcher
from casa_live.server.metrics import Metrics
from casa_live.server.settings import Settings

if TYPE_CHECKING:
    from casa_live.model.engine.engine import Engine
    from casa_live.server.worker import Worker


class LiveSession(Protocol):
    """What the context and the drain need of an open session (server/session.py's Session):
    typed here so that the session module depends on this one, never the reverse."""

    def current_lag(self, now: float) -> float: ...
    async def drain(self, deadline: float) -> None: ...


class ServerContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # watch alerts go out through here (server/alerts.py); no sink configured = counted only.
        # The lifespan starts and stops it.
        self.alerts = AlertDispatcher.from_settings(settings, self.metrics)
        self.engine: Engine | None = None  # set by the lifespan
        self.worker: Worker | None = None
        self.model_name = ""
        self.ready = False
        self.sessions: set[LiveSession] = set()
        self.uploads = 0  # uploads receiving or captioning now (at most settings.max_concurrent_uploads)
        # set once by server/drain.py on SIGTERM: no new sessions, open ones are drained by the deadline
        self.draining = False
        self.drain_deadline = 0.0  # time.monotonic() by which drained sessions are closed
        self.drain_tasks: set[asyncio.Task] = set()  # Session.drain of each open session

    def free_slots(self) -> int:
        """Engine rows free now (websocket sessions and uploads both hold one); 0 while draining.
        Read from the counter the worker publishes: the engine belongs to the worker's thread."""
        if self.worker is None or self.draining:
            return 0
        return self.worker.free_rows

    @property
    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.alive

    def default_settings(self) -> p.SessionSettings:
        gen = self.engine.gen
        return p.SessionSettings(
            prompt=gen.template.default_prompt,
            fps=min(gen.fps, self.settings.max_fps),
            mode="live",
            **effective(gen),  # every generation setting at the model's default
        )

    def overloaded(self) -> bool:
        """Live frames are being held back past capacity (server/overload.py)."""
        return (
            self.worker is not None and self.worker.governor is not None and self.worker.governor.overloaded
        )

    def headroom(self) -> float:
        """The share of a live frame's budget its caption leaves unused (1 with no governor)."""
        if self.worker is None or self.worker.governor is None:
            return 1.0
        return self.worker.governor.headroom

    def admits(self) -> bool:
        """With --max-sessions auto, a new session is admitted only while nothing is shed."""
        return self.settings.max_sessions != "auto" or not self.overloaded()

    def max_lag(self) -> float:
        now = time.monotonic()
        return max((s.current_lag(now) for s in list(self.sessions)), default=0.0)
