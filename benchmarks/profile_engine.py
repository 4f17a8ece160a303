"""Where a captioned frame's CPU goes, stage by stage, in process (no server, one thread).

N sessions each receive a world clip's frames as JPEG payloads; every round, each session gets its
next frame (decoded by the server's own `decode_image`), and the engine steps until every caption
of the round is done. Arrivals are staggered over the round (`--stagger` ticks between sessions),
so decode batches mix rows at different caption positions as in a live server. Printed per
captioned frame: JPEG decode, vision (tower + CASA image K/V), prefill, decode, scoring, and the rest
of the tick (planning, sampling, scheduler bookkeeping), as time on the one thread (run it on a
quiet machine: the engine's stage timers are wall clocks), beside the process's CPU time, plus the
captions' agreement with the world's truth so that a faster engine cannot hide a worse one.

    python -m benchmarks.profile_engine --sessions 64 --rounds 6
    python -m benchmarks.profile_engine --sessions 1 --rounds 16
    python -m benchmarks.profile_engine --watches 4   # what scoring costs
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from benchmarks.loadtest import synthetic_clip
    from casa_live.model.engine.engine import Engine
    from casa_live.model.engine.scheduler import TokenEvent
    from casa_live.server.ingest.frames import FrameLimits
    from casa_live.server.ingest.image import decode_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="checkpoints/default")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="frames per session")
    ap.add_argument("--side", type=int, default=480, help="camera frame side in pixels")
    ap.add_argument("--stagger", type=int, default=1, help="ticks between two sessions' frame arrivals")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--watches", type=int, default=0, help="each session sets this many watches (a question model only)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    eng = Engine.from_checkpoint(args.model_dir, max_sessions=args.sessions)
    eng.warmup()
    limits = FrameLimits.for_processor(eng.processor, eng.image_size, 4096, 4096)
    # world clips rendered at a camera's size, larger than the model's input, as JPEGs
    clips = [synthetic_clip(args.rounds, 1000 + s, size=args.side) for s in range(args.sessions)]
    rows = [eng.open() for _ in range(args.sessions)]
    if args.watches:
        from benchmarks.loadtest import WATCH_QUESTIONS

        for row in rows:
            eng.set_watches(row, list(WATCH_QUESTIONS[: args.watches]))
    stage: dict[str, float] = defaultdict(float)
    texts: dict[int, str] = defaultdict(str)
    got: list[tuple[str, str]] = []
    captioned = ticks = 0

    def tick() -> None:
        nonlocal captioned, ticks
        t0 = time.perf_counter()
        events = eng.step()
        total = time.perf_counter() - t0
        res = eng.last_result
        ticks += 1
        stage["vision"] += res.vision_s
        stage["prefill"] += res.prefill_s
        stage["decode"] += res.decode_s
        stage["score"] += res.score_s
        stage["rest of the tick"] += total - res.vision_s - res.prefill_s - res.decode_s - res.score_s
        for ev in events:
            if isinstance(ev, TokenEvent) and ev.row in row_index:
                texts[ev.row] += ev.text
                if ev.done:
                    captioned += 1
                    s = row_index[ev.row]
                    got.append((texts.pop(ev.row).strip(), clips[s].truth[ev.frame]))

    row_index = {r: s for s, r in enumerate(rows)}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for f in range(args.rounds):
        for s, row in enumerate(rows):
            t0 = time.perf_counter()
            image = decode_image(clips[s].jpegs[f], limits)
            stage["JPEG decode"] += time.perf_counter() - t0
            eng.submit_frame(row, image)
            for _ in range(args.stagger):
                tick()
        while eng.has_work():
            tick()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    exact = float(np.mean([a == b for a, b in got])) if got else 0.0
    print(f"model {args.model_dir}: {args.sessions} sessions x {args.rounds} frames, {args.side}px JPEGs, "
          f"{args.watches} watches a session, {args.threads} thread(s), torch {torch.__version__}")  # fmt: skip
    print(f"captioned {captioned} frames in {ticks} ticks; exact match with the world's truth {exact:.3f}")
    print("| stage | ms per captioned frame | share |")
    print("|---|---|---|")
    total = sum(stage.values())
    for name, s in stage.items():
        print(f"| {name} | {s / max(1, captioned) * 1000:.2f} | {s / total:.0%} |")
    print(f"| **all** | **{total / max(1, captioned) * 1000:.2f}** | |")
    print(f"process CPU {cpu / max(1, captioned) * 1000:.2f} ms per captioned frame, wall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
