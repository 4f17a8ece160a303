"""`casa stream SOURCE`: caption a file, a webcam, a network stream or a synthetic clip live."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
sources:
  clip.mp4               any file PyAV opens (mp4, webm, mkv, avi, ts, y4m, ...)
  /dev/video0, webcam:0  a V4L2 webcam
  rtsp://host/stream     an RTSP, RTMP, UDP, SRT or HTTP(S) stream
  synthetic:7            a clip of the synthetic world the bundled model knows

examples:
  casa stream synthetic:7 --srt out.srt --vtt out.vtt
  casa stream talk.mp4 --server ws://gpu-box:8000 --token $KEY --no-realtime --jsonl talk.jsonl
  casa stream synthetic:7 --ask "how many objects are there?" --ask-every 2 --jsonl out.jsonl
  casa stream /dev/video0 --interactive     # each line typed is a question about the current frame
  casa stream door.mp4 --watch "is there a red circle?" --watch-min-frames 2 --jsonl door.jsonl
exit codes: 0 done, 1 server or connection error, 2 bad arguments or source, 130 interrupted (Ctrl-C)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="stream a video source to a casa-live server and print captions live",
        description="Send a video source to a casa-live server over /v1/stream; print captions as they "
        "stream and write SRT, WebVTT and JSONL files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="file, /dev/videoN, URL or synthetic:SEED (see below)")
    p.add_argument(
        "--server",
        default=os.environ.get("CASA_SERVER", "ws://127.0.0.1:8000"),
        help="server URL, ws:// or http:// (default: $CASA_SERVER or ws://127.0.0.1:8000)",
    )
    p.add_argument(
        "--reconnect-tries",
        type=int,
        default=6,
        help="after a dropped connection, a server error, a drain (1012) or capacity (1013), open a new "
        "session up to this many times in a row, with jittered exponential backoff; 0 = never (default 6)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("CASA_TOKEN"),
        help="API key for a protected server (default: $CASA_TOKEN)",
    )

    s = p.add_argument_group("session (defaults: the server's)")
    s.add_argument("--prompt", help="user prompt for the stream")
    s.add_argument("--fps", type=float, help="frames captioned per second of video")
    s.add_argument("--max-new-tokens", type=int, help="caption length limit per frame")
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--no-repeat-ngram", type=int)
    s.add_argument("--seed", type=int, help="sampling seed")

    i = p.add_argument_group("input")
    i.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pace frames at their timestamps like a live camera (default); --no-realtime sends "
        "as fast as the server captions, dropping nothing",
    )
    i.add_argument(
        "--send",
        choices=("jpeg", "container"),
        default="jpeg",
        help="jpeg: sampled frames as JPEG images (default); container: the file's own bytes "
        "(files and synthetic clips only)",
    )
    i.add_argument("--jpeg-quality", type=int, default=85)
    i.add_argument(
        "--max-side", type=int, default=640, help="downscale frames to this longer side (0 = never)"
    )
    i.add_argument("--duration", type=float, help="stop after this many seconds of video")
    i.add_argument("--synthetic-seconds", type=float, default=8.0, help="length of a synthetic:SEED clip")

    q = p.add_argument_group(
        "questions (answered about the latest captioned frame; the captions never see them)"
    )
    q.add_argument(
        "--ask",
        metavar="QUESTION",
        action="append",
        default=[],
        help="ask this right after the session starts (repeatable); answers print as "
        '\'? QUESTION -> ANSWER (frame N)\' and go into --jsonl as {"type": "answer", ...} records',
    )
    q.add_argument(
        "--ask-every",
        metavar="SECONDS",
        type=float,
        help="ask the --ask questions again every SECONDS of stream time",
    )
    q.add_argument(
        "--interactive",
        action="store_true",
        help="read questions from stdin while the stream runs: each line typed is asked",
    )

    w = p.add_argument_group(
        "watches (yes/no questions scored on every captioned frame; an alert starts and ends with the answer)"
    )
    w.add_argument(
        "--watch",
        metavar="QUESTION",
        action="append",
        default=[],
        help="alert me when the answer is yes (repeatable, at most 8; ids w1, w2, ... in order); alerts "
        "print as '[alert w1 started] frame N @ Ts score S — QUESTION' and go into --jsonl as "
        '{"type": "alert", ...} records',
    )
    w.add_argument(
        "--watch-threshold",
        metavar="P",
        type=_probability,
        help="a frame counts as yes when P(yes) >= P, strictly between 0 and 1 (default 0.5)",
    )
    w.add_argument(
        "--watch-min-frames",
        metavar="N",
        type=_frames,
        help="consecutive yes frames that start an alert, 1-100 (default 1)",
    )
    w.add_argument(
        "--watch-clear-frames",
        metavar="N",
        type=_frames,
        help="consecutive no frames that end it, 1-100 (default 1)",
    )
    w.add_argument(
        "--watch-cooldown",
        metavar="SECONDS",
        type=_seconds,
        help="no new alert of a watch within SECONDS of stream time after its last one ended (default 0)",
    )

    o = p.add_argument_group("output")
    o.add_argument("--srt", metavar="PATH", help="write SRT subtitles")
    o.add_argument("--vtt", metavar="PATH", help="write WebVTT subtitles")
    o.add_argument(
        "--jsonl",
        metavar="PATH",
        help="write one JSON line per frame (start, end, text, ttft_ms, latency_ms, and watch_scores with "
        "--watch), one per answer (type answer) and one per alert start or end (type alert)",
    )
    o.add_argument(
        "--quiet", action="store_true", help="no captions on stdout (files, answers, alerts and errors only)"
    )
    p.set_defaults(func=run)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability strictly between 0 and 1, e.g. 0.5")
    return value


def _frames(text: str) -> int:
    from casa_live.clients.wire import MAX_WATCH_FRAMES

    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_WATCH_FRAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of frames from 1 to {MAX_WATCH_FRAMES}"
        )
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    from casa_live.clients.printer import LivePrinter
    from casa_live.clients.sources import SourceError, open_source
    from casa_live.clients.stream import EXIT_USAGE, StreamError, StreamOptions, run_stream, stream_url
    from casa_live.clients.watches import watch_rules
    from casa_live.clients.wire import MAX_WATCHES
    from casa_live.clients.writers import open_writers

    # --interactive: final caption lines only, even on a terminal, so that no rewritten partial line
    # runs over the question being typed
    printer = LivePrinter(quiet=args.quiet, live=False if args.interactive else None)
    if args.ask_every is not None and not (args.ask_every > 0 and args.ask):
        printer.message("error: --ask-every needs a positive number of seconds and at least one --ask")
        return EXIT_USAGE
    rule = {
        "threshold": args.watch_threshold,
        "min_frames": args.watch_min_frames,
        "clear_frames": args.watch_clear_frames,
        "cooldown_s": args.watch_cooldown,
    }
    rule = {k: v for k, v in rule.items() if v is not None}
    if rule and not args.watch:
        flags = ", ".join(f"--watch-{k.removesuffix('_s').replace('_', '-')}" for k in rule)
        printer.message(f"error: {flags} need{'s' if len(rule) == 1 else ''} at least one --watch")
        return EXIT_USAGE
    if len(args.watch) > MAX_WATCHES:
        printer.message(f"error: {len(args.watch)} --watch questions; a session has at most {MAX_WATCHES}")
        return EXIT_USAGE
    session = {
        key: getattr(args, key)
        for key in (
            "prompt",
            "fps",
            "max_new_tokens",
            "temperature",
            "top_k",
            "repetition_penalty",
            "no_repeat_ngram",
            "seed",
        )
        if getattr(args, key) is not None
    }
    try:
        options = StreamOptions(
            url=stream_url(args.server),
            token=args.token or None,
            session=session,
            realtime=args.realtime,
            send=args.send,
            jpeg_quality=args.jpeg_quality,
            max_side=args.max_side or None,
            duration=args.duration,
            reconnect_tries=max(0, args.reconnect_tries),
            questions=list(args.ask),
            ask_every=args.ask_every,
            interactive=args.interactive,
            watches=watch_rules(args.watch, **rule),
        )
        source = open_source(args.source, seconds=args.synthetic_seconds)
    except (StreamError, SourceError) as e:
        printer.message(f"error: {e}")
        return EXIT_USAGE
    try:
        writers = open_writers(srt=args.srt, vtt=args.vtt, jsonl=args.jsonl)
    except OSError as e:
        printer.message(f"error: cannot write {e.filename}: {e.strerror}")
        return EXIT_USAGE
    return run_stream(source, options, writers, printer)
