"""`casa caption VIDEO_FILE`: caption a video file through the streaming engine, live, with timestamps."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption a video file with the streaming engine")
    p.add_argument("video", type=Path, help="any file PyAV can open")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id ORG/NAME[@REV] (default: the bundled model)",
    )
    p.add_argument(
        "--fps", type=float, default=None, help="frames captioned per second (default: the model's, 2)"
    )
    p.add_argument("--prompt", default=None, help="user prompt (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def sample_frames(path: Path, fps: float) -> Iterator[tuple[float, object]]:
    """Decode with PyAV and keep the first frame at or after each 1/fps tick: (seconds, HxWx3 uint8)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        next_t = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            if next_t is None:
                next_t = t
            if t + 1e-6 >= next_t:
                yield t, frame.to_ndarray(format="rgb24")
                next_t += 1.0 / fps


def format_ts(seconds: float) -> str:
    m, s = divmod(max(seconds, 0.0), 60)
    return f"{int(m):02d}:{s:04.1f}"


def run(args: argparse.Namespace) -> int:
    import av

    from casa_live.model.checkpoint.assets import default_model_dir
    from casa_live.model.checkpoint.common import CheckpointError
    from casa_live.model.checkpoint.hub import resolve_model
    from casa_live.model.engine.engine import Engine, SessionSettings

    model_dir = args.model or default_model_dir()
    try:
        engine = Engine.from_checkpoint(resolve_model(model_dir), device=args.device, max_sessions=1)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"casa caption: cannot load the model from {model_dir}: {e}", file=sys.stderr)
        return 2
    fps = args.fps or engine.gen.fps
    settings = SessionSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    row = engine.open(args.prompt, settings)
    try:
        frames = sample_frames(args.video, fps)
        for t, image in frames:
            print(f"[{format_ts(t)}] ", end="", flush=True)
            for ev in engine.caption(row, image):
                print(ev.text, end="", flush=True)
            print(flush=True)
    except (av.error.FFmpegError, OSError) as e:
        print(f"\ncasa caption: cannot decode {args.video}: {e}", file=sys.stderr)
        return 2
    return 0
