"""The FastAPI application: `create_app(settings)`; nothing happens at import time.

The lifespan loads the checkpoint, warms the engine up (first-call allocations and lazy inits happen
before the first client, so /readyz means "fast now") and starts the one inference worker thread.

Routes: the browser demo (server/demo.py: `GET /`, `GET /web/*`, `GET /v1/demo-clip.webm`), `GET /healthz` (process up: liveness only), `GET /readyz` (can take a
session now: model loaded and warmed, a slot free, not draining; 503 with a reason otherwise, so a
load balancer routes new sessions elsewhere), `GET /metrics` (a plain
route: a mounted sub-app would answer 307), `GET /v1/models`, `POST /v1/captions` (upload a video), and
the websocket `/v1/stream`.

Websocket admission, before any session state exists: the Origin allowlist (when configured) refuses
cross-site websocket hijacking at the handshake (HTTP 403, i.e. close 1008 before accept); a missing or
wrong key is accepted only to send an `unauthorized` error and close 1008, so browsers can show why.
Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from casa_live.model.engine.engine import Engine
from casa_live.server import protocol as p
from casa_live.server.connection import serve_websocket
from casa_live.server.context import ServerContext
from casa_live.server.demo import mount_demo
from casa_live.server.errors import Capacity, Unauthorized, report
from casa_live.server.logs import install_redaction
from casa_live.server.metrics import CONTENT_TYPE
from casa_live.server.overload import Governor, OverloadConfig
from casa_live.server.settings import Settings
from casa_live.server.worker import Worker

log = logging.getLogger("casa.server")

# On shutdown, how long the alert sinks may take to deliver what they hold (after the sessions closed,
# so their forced-end alerts are in): bounded, so a receiver that is down cannot hold the exit up.
ALERT_FLUSH_SECONDS = 5.0

DRAINING = "the server is draining (it is stopping): reconnect, the load balancer picks another replica"


def load_engine(settings: Settings) -> Engine:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = getattr(torch, settings.dtype)
    if not Path(settings.model_dir).is_dir():
        raise FileNotFoundError(
            f"model directory {settings.model_dir} does not exist: pass --model-dir (or CASA_MODEL_DIR) pointing "
            "at a casa-live checkpoint (config.json, model.safetensors, tokenizer.json, generation_config.json)"
        )
    return Engine.from_checkpoint(
        settings.model_dir,
        device=settings.device,
        dtype=dtype,
        max_sessions=settings.session_rows,
        max_context_tokens=settings.max_context_tokens,
        vision_thread=settings.vision_thread,
        compile=settings.compile,
        max_pixels=settings.max_pixels,
    )


def warm_up(engine: Engine, threads: int = 0) -> None:
    """Run every decode bucket once (compiling them when compiled), then caption two frames in one
    row (first-frame and next-frame paths) and free the row."""
    if threads:
        torch.set_num_threads(threads)
    engine.warmup()
    row = engine.open()
    try:
        grey = np.full((engine.image_size, engine.image_size, 3), 128, np.uint8)
        for _ in range(2):
            for _ in engine.caption(row, grey):
                pass
        while engine.has_work():  # feed the last stop token
            engine.step()
    finally:
        engine.close(row)


def _origin_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    if not allowed:
        return True
    origin = ws.headers.get("origin")
    if origin is None:
        return True  # not a browser: Origin is how browsers mark cross-site requests
    return origin.rstrip("/").lower() in allowed


def _key_from(headers, query) -> str | None:  # type: ignore[no-untyped-def]
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return query.get("token")


def _key_ok(key: str | None, settings: Settings) -> bool:
    if not settings.auth_keys:
        return True
    if not key:
        return False
    candidate = key.encode()
    return any(hmac.compare_digest(candidate, k.get_secret_value().encode()) for k in settings.auth_keys)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    install_redaction()  # keys and cookies never reach a log line, at any level
    ctx = ServerContext(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        # Several threads run Python here (event loop, ingest, decode worker, vision). Each torch op
        # releases the GIL, and getting it back can wait a whole switch interval (5 ms by default)
        # behind another thread's Python: hundreds of ops per step turn that into seconds. A short
        # interval bounds the wait (docs/engine.md, "Threads and the GIL").
        switch = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        engine = await asyncio.to_thread(load_engine, settings)
        if settings.warmup:
            await asyncio.to_thread(warm_up, engine, settings.threads)
        ctx.engine, ctx.model_name = engine, engine.model.config.name
        ctx.worker = Worker(
            engine,
            ctx.metrics,
            asyncio.get_running_loop(),
            settings.threads,
            pace_per_session=settings.step_pacing_ms / 1000,
            max_interval=settings.max_step_interval_ms / 1000,
            governor=Governor(engine.max_sessions, OverloadConfig(run_frames=settings.overload_run_frames))
            if settings.overload_governor
            else None,
        )
        ctx.worker.start()
        ctx.alerts.start()  # no network wait: the sinks connect and deliver in the background
        ctx.metrics.stream_lag_seconds.set_function(ctx.max_lag)
        ctx.metrics.sessions_active.set(0)
        ctx.metrics.session_slots.set(engine.max_sessions)
        ctx.metrics.session_slots_free.set_function(ctx.free_slots)
        ctx.metrics.overloaded.set_function(lambda: float(ctx.overloaded()))
        ctx.metrics.frame_budget_headroom.set_function(ctx.headroom)
        ctx.metrics.frames_in_flight_cap.set_function(
            lambda: ctx.worker.governor.cap if ctx.worker and ctx.worker.governor else engine.max_sessions
        )
        ctx.metrics.build_info.labels(ctx.model_name, str(p.PROTOCOL_VERSION)).set(1)
        ctx.ready = True
        log.info(
            "model %s loaded and warmed in %.2f s (%d session slots)",
            ctx.model_name,
            time.perf_counter() - t0,
            settings.max_sessions,
        )
        try:
            yield
        finally:
            ctx.ready = False
            await asyncio.to_thread(ctx.worker.stop)
            await ctx.alerts.stop(ALERT_FLUSH_SECONDS)
            engine.shutdown()  # the lifespan made the engine (and its vision thread): it stops it
            sys.setswitchinterval(switch)

    app = FastAPI(title="casa-live", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    mount_demo(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """200 only while a new session would be admitted; a full replica answers 503 until a slot frees."""
        if not ctx.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not ctx.worker_alive:
            return JSONResponse({"status": "unavailable", "reason": "the inference worker stopped"}, 503)
        slots = {"slots": ctx.engine.max_sessions, "free": ctx.free_slots()}
        if ctx.draining:
            return JSONResponse({"status": "draining", "reason": "the server is stopping", **slots}, 503)
        if slots["free"] == 0:
            return JSONResponse({"status": "full", "reason": "every session slot is taken", **slots}, 503)
        if ctx.overloaded():
            return JSONResponse(
                {
                    "status": "overloaded",
                    "reason": "live frames are being shed: the server is past capacity",
                    **slots,
                },
                503,
            )
        return JSONResponse({"status": "ready", "model": ctx.model_name, **slots})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        engine = ctx.engine
        cfg = engine.model.config
        return {
            "object": "list",
            "data": [
                {
                    "id": ctx.model_name,
                    "object": "model",
                    "image_size": engine.image_size,
                    "image_tokens": cfg.image_tokens,
                    "fusion": cfg.casa.fusion,
                    "max_sessions": engine.max_sessions,
                    "sessions_active": len(ctx.sessions),
                    "protocol_version": p.PROTOCOL_VERSION,
                    "defaults": ctx.default_settings().model_dump(),
                }
            ],
        }

    @app.post("/v1/captions")
    async def captions(request: Request) -> Response:
        from casa_live.server.upload import caption_upload

        if not _key_ok(_key_from(request.headers, request.query_params), settings):
            return JSONResponse(
                {"error": {"code": "unauthorized", "message": "missing or wrong API key"}}, status_code=401
            )
        if ctx.draining:
            ctx.metrics.sessions_rejected_total.labels("draining").inc()
            ctx.metrics.errors_total.labels("capacity").inc()
            return JSONResponse(
                {"error": {"code": "capacity", "message": DRAINING}},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        if not ctx.ready or not ctx.worker_alive:
            ctx.metrics.sessions_rejected_total.labels("unavailable").inc()
            ctx.metrics.errors_total.labels("capacity").inc()
            return JSONResponse(
                {"error": {"code": "capacity", "message": "the model is not serving now; retry later"}},
                status_code=503,
            )
        return await caption_upload(ctx, request)

    @app.websocket(p.STREAM_PATH)
    async def stream(ws: WebSocket) -> None:
        m = ctx.metrics
        if not _origin_allowed(ws, settings.allowed_origins):
            m.sessions_rejected_total.labels("origin").inc()
            log.warning("websocket refused: Origin not in the allowlist")
            await ws.close(p.CloseCode.POLICY)  # before accept: the handshake fails with 403
            return
        await ws.accept()
        if not _key_ok(_key_from(ws.headers, ws.query_params), settings):
            m.sessions_rejected_total.labels("unauthorized").inc()
            event, code = report(
                Unauthorized("missing or wrong API key: send 'Authorization: Bearer KEY' or ?token=KEY"), m
            )
            await ws.send_text(p.dump(event))
            await ws.close(code)
            return
        if ctx.draining:
            m.sessions_rejected_total.labels("draining").inc()
            event, code = report(Capacity(DRAINING), m)
            await ws.send_text(p.dump(event))
            await ws.close(code)
            return
        if not ctx.ready or not ctx.worker_alive:
            # no inference thread to serve the session: try again later (another replica, a restart)
            m.sessions_rejected_total.labels("unavailable").inc()
            if ctx.ready:
                log.error("websocket refused: the inference worker thread is not running")
            event, code = report(
                Capacity(
                    "the server cannot caption now (the model is loading or its worker stopped); retry later"
                ),
                m,
            )
            await ws.send_text(p.dump(event))
            await ws.close(code)
            return
        await serve_websocket(ws, ctx)

    return app
