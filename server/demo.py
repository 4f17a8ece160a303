"""The browser demo's routes: `GET /` (the page), `GET /web/*` (its assets), `GET /v1/demo-clip.webm`.

The page is the client in `clients/web/`; the server only serves its files. It finds them as package
data (`importlib.resources`), not by importing the clients package's code, so the server does not
depend on a layer above it (docs/design.md). The clip is a scene of the synthetic world the bundled
model was trained on (`model/world/demo.py`), so the page has something the model truly understands
even where no camera exists.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

PLACEHOLDER = """<!doctype html><html><head><meta charset="utf-8"><title>casa-live</title></head>
<body><h1>casa-live</h1><p>The demo page (clients/web/index.html) is not installed.
Stream to <code>ws://HOST/v1/stream</code>; see docs/protocol.md.</p></body></html>"""


def web_dir() -> Path:
    """The demo page's folder (clients/web in a checkout, casa_live/clients/web in a wheel)."""
    return Path(str(files("casa_live.clients"))) / "web"


def mount_demo(app: FastAPI) -> None:
    """Add the demo routes to `app`."""
    web = web_dir()
    if web.is_dir():
        app.mount("/web", StaticFiles(directory=web), name="web")
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        page = web / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(PLACEHOLDER)

    @router.get("/v1/demo-clip.webm", include_in_schema=False)
    async def demo_clip() -> Response:
        try:
            from casa_live.model.world.demo import demo_clip_webm
        except ImportError:  # a build without PyAV's encoder side
            return JSONResponse(
                {"error": {"code": "not_found", "message": "no demo clip in this build"}}, 404
            )
        return Response(await asyncio.to_thread(demo_clip_webm), media_type="video/webm")

    app.include_router(router)
