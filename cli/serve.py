"""`casa serve`: run the streaming caption server (the bundled model by default).

Every flag mirrors a field of server.settings.Settings; a flag left out keeps the value from the
environment (`CASA_*`) or the default. Keys are better passed as `CASA_AUTH_KEYS=k1,k2` than as flags,
which other users of the machine can read in the process list (the webhook secret too:
`CASA_ALERT_WEBHOOK_SECRET`).
"""

from __future__ import annotations

import argparse

# Incoming messages the websocket layer holds per connection before the session reads them (the
# library's default is 32): with the session's own bounded input, this bounds a session's memory.
WS_MAX_QUEUE = 4

# flag -> (Settings field, type, help)
FLAGS: dict[str, tuple[str, type, str]] = {
    "--host": ("host", str, "interface to listen on (default 127.0.0.1; 0.0.0.0 for all)"),
    "--port": ("port", int, "TCP port (default 8000)"),
    "--model-dir": ("model_dir", str, "checkpoint directory (default: the bundled checkpoints/default)"),
    "--device": ("device", str, "torch device, e.g. cpu or cuda (default cpu)"),
    "--dtype": ("dtype", str, "float32 | bfloat16 | float16 (default float32)"),
    "--threads": ("threads", int, "torch threads of the model worker; 0 = torch default (default 1)"),
    "--max-sessions": (
        "max_sessions",
        str,
        "concurrent streams = engine batch rows (default 32); auto: admit while the server has measured "
        "headroom (docs/scaling.md)",
    ),
    "--step-pacing-ms": ("step_pacing_ms", float, "decode-step spacing per open session, ms (default 0.4)"),
    "--max-step-interval-ms": ("max_step_interval_ms", float, "cap of the step spacing, ms (default 12)"),
    "--overload-run-frames": (
        "overload_run_frames",
        int,
        "past capacity, frames a session keeps its turn for, captioned in a row (default 6; docs/scaling.md)",
    ),
    "--max-context-tokens": (
        "max_context_tokens",
        int,
        "text KV cache bound per session (default: the checkpoint's, else 1024)",
    ),
    "--max-pixels": (
        "max_pixels",
        int,
        "pixel budget of a frame for Qwen-family models, aspect kept (default: the config's image_size^2)",
    ),
    "--max-message-bytes": ("max_message_bytes", int, "largest websocket message accepted (default 4 MiB)"),
    "--max-frame-width": ("max_frame_width", int, "widest input frame accepted (default 3840)"),
    "--max-frame-height": ("max_frame_height", int, "tallest input frame accepted (default 2160)"),
    "--max-fps": ("max_fps", float, "highest session fps a client may ask for (default 10)"),
    "--max-session-seconds": ("max_session_seconds", float, "session length limit (default 4 h)"),
    "--idle-timeout": (
        "idle_timeout_seconds",
        float,
        "close a session after this long without a message (default 30 s)",
    ),
    "--max-input-rate": ("max_input_rate", float, "binary messages per second per session (default 120)"),
    "--max-buffered-bytes": (
        "max_buffered_bytes",
        int,
        "input bytes a session may hold before decoding, e.g. an MP4 init segment (default 16 MiB)",
    ),
    "--max-upload-bytes": ("max_upload_bytes", int, "largest upload to /v1/captions (default 512 MiB)"),
    "--max-concurrent-uploads": (
        "max_concurrent_uploads",
        int,
        "uploads received or captioned at once; more get 503 (default 2)",
    ),
    "--drain-seconds": (
        "drain_seconds",
        float,
        "on SIGTERM, drain sessions for up to this long before exiting (default 30)",
    ),
    "--log-level": ("log_level", str, "debug | info | warning | error (default info)"),
    "--alert-webhook": (
        "alert_webhook",
        str,
        "POST each watch alert as JSON to this http(s) URL (docs/operations.md, 'Alert delivery')",
    ),
    "--alert-webhook-secret": (
        "alert_webhook_secret",
        str,
        "sign webhook bodies (X-Casa-Signature: sha256=HMAC); better CASA_ALERT_WEBHOOK_SECRET",
    ),
    "--mqtt-url": ("mqtt_url", str, "publish each watch alert to this broker, mqtt://HOST:PORT (QoS 1)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the websocket caption server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, (_, kind, help_text) in FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument(
        "--auth-key",
        action="append",
        default=None,
        metavar="KEY",
        help="accept this API key (repeatable); none = no authentication",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allow websocket connections from this browser Origin only (repeatable), "
        "e.g. https://example.com",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR|ORG/NAME[@REV]",
        help="checkpoint directory, or a Hugging Face repo id resolved through the HF cache (downloaded "
        "when online; HF_HUB_OFFLINE=1: the cache only), e.g. kyutai/CASA-Qwen2_5-VL-3B-LiveCC",
    )
    p.add_argument("--revision", default=None, help="with a repo id: the branch, tag or commit to pin")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up caption at start")
    p.add_argument(
        "--no-vision-thread",
        action="store_true",
        help="encode frames on the decode thread (one core) instead of a thread of their own",
    )
    p.add_argument(
        "--no-overload-governor",
        action="store_true",
        help="past capacity, start every frame at once and cut captions at their deadline instead of "
        "holding frames back (docs/scaling.md, 'Past capacity')",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CUDA graphs on a GPU); slower start, see docs/engine.md",
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):  # -> server.settings.Settings
    from casa_live.server.settings import Settings

    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in FLAGS.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "model", None):
        from casa_live.model.checkpoint.hub import HubError, resolve_model

        if "model_dir" in overrides:
            raise HubError("pass --model or --model-dir, not both")
        overrides["model_dir"] = resolve_model(args.model, args.revision)
    if args.auth_key:
        overrides["auth_keys"] = args.auth_key
    if args.allowed_origin:
        overrides["allowed_origins"] = args.allowed_origin
    if args.no_warmup:
        overrides["warmup"] = False
    if args.no_overload_governor:
        overrides["overload_governor"] = False
    if args.no_vision_thread:
        overrides["vision_thread"] = False
    if args.compile:
        overrides["compile"] = True
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from casa_live.model.checkpoint.hub import HubError
    from casa_live.server.app import create_app
    from casa_live.server.drain import DrainingServer
    from casa_live.server.logs import install_redaction

    try:
        settings = settings_from_args(args)
    except HubError as e:
        print(f"error: {e}")
        return 2
    except ValidationError as e:  # one line per bad setting, without pydantic's input echo (secrets)
        for problem in e.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "settings"
            print(f"error: {where}: {problem['msg'].removeprefix('Value error, ')}")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.model_dir.is_dir():
        print(f"error: model directory {settings.model_dir} does not exist (pass --model-dir)")
        return 2
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"casa-live: serving {settings.model_dir} on http://{settings.host}:{settings.port}")
    print(f"  demo page:  http://{host}:{settings.port}/")
    print(
        f"  websocket:  ws://{host}:{settings.port}/v1/stream   metrics: http://{host}:{settings.port}/metrics"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_per_message_deflate=False,  # JPEG / video payloads do not compress; deflate only costs CPU
        ws_max_size=settings.transport_max_bytes,
        ws_max_queue=WS_MAX_QUEUE,  # messages the websocket layer buffers per connection, before the session
        # after the drain (server/drain.py) only stragglers are left: do not wait on them past the grace
        timeout_graceful_shutdown=2,
    )
    install_redaction()  # keys and cookies never reach the log, at any level
    DrainingServer(config, app.state.ctx).run()
    return 0
