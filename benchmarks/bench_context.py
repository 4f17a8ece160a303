"""Caption quality and engine CPU against the text KV cache bound (`max_context_tokens`).

The text cache is the one per-session cost that grows with the stream until it hits its bound:
every decode step reads all of it. This benchmark shows what a bound buys and costs, side by side
in one process, on the load test's clips (benchmarks/loadtest.py: the synthetic world, JPEG frames
through the server's image decode, ground truth per frame):
- exact match and token F1 of every caption against the world's truth, greedy, no deadline (what a
  live stream gets when nothing is cut short);
- the engine's CPU per captioned frame (process time: vision tower, prefill, decode, sampling) with
  N rows stepped in lockstep, one torch thread. Process time, not wall time, so another job on the
  machine perturbs it little; the server adds its event loop and JPEG decode on top.

    python -m benchmarks.bench_context                          # bounds 128 256 512 1024, 32 rows, 60 s
    python -m benchmarks.bench_context --bounds 256 1024 --rows 8 --seconds 20
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.loadtest import ROOT, synthetic_clip, token_f1


def run(bound: int, rows: int, frames: int, model_dir: str) -> dict:
    from casa_live.model.engine.engine import Engine
    from casa_live.server.ingest.frames import FrameLimits
    from casa_live.server.ingest.image import decode_image

    clips = [synthetic_clip(frames, seed=100 + k) for k in range(min(rows, 8))]
    engine = Engine.from_checkpoint(model_dir, max_sessions=rows, max_context_tokens=bound)
    engine.warmup()
    limits = FrameLimits(engine.image_size, 1 << 14, 1 << 14)
    images = [[decode_image(j, limits) for j in c.jpegs] for c in clips]
    ids = [engine.open() for _ in range(rows)]
    exact = f1 = 0.0
    steps, t0 = 0, time.process_time()
    for f in range(frames):
        text = {r: "" for r in ids}
        for k, r in enumerate(ids):
            engine.submit_frame(r, images[k % len(clips)][f])
        while any(engine.busy(r) for r in ids):
            steps += 1
            for ev in engine.step():
                text[ev.row] += ev.text
        for k, r in enumerate(ids):
            truth = clips[k % len(clips)].truth[f]
            exact += text[r].strip() == truth
            f1 += token_f1(text[r], truth)
    cpu = time.process_time() - t0
    engine.shutdown()
    n = rows * frames
    return {
        "bound": bound,
        "exact": exact / n,
        "f1": f1 / n,
        "cpu_ms": cpu * 1000 / n,
        "steps": steps,
        "mean_len": float(engine.state.text.length[:rows].float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bounds", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--rows", type=int, default=32, help="sessions stepped together (clip k mod 8)")
    ap.add_argument("--seconds", type=float, default=60.0, help="stream length at 2 fps")
    ap.add_argument("--model-dir", default=str(ROOT / "checkpoints" / "default"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    frames = round(args.seconds * 2)
    results = []
    for bound in args.bounds:
        results.append(run(bound, args.rows, frames, args.model_dir))
        print(results[-1], file=sys.stderr, flush=True)
    print(
        f"\n{args.rows} rows in lockstep, {frames} frames each ({args.seconds:.0f} s at 2 fps), 1 torch thread.\n"
    )
    print(
        "| max_context_tokens | exact match | token F1 | engine CPU ms / frame | text tokens at the end (mean) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['bound']} | {r['exact']:.3f} | {r['f1']:.3f} | {r['cpu_ms']:.2f} | {r['mean_len']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
