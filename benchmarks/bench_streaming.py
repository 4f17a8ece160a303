"""CASA vs token insertion, one stream, same model dims: per-frame latency and KV bytes.

Each frame = vision tower + frame prefill + `--tokens` forced decode steps (stop tokens banned).
Both models are fast-forwarded to each frame index by setting their text-cache length to what that
many frames leave behind (attention cost depends on the length, not on the values; CASA replays its
eviction policy), then timed over `--repeat` real frames. Both are timed in the same process, one
after the other, so their ratio is meaningful on a noisy machine. KV bytes are the bytes in use:
the text cache, plus the CASA frame and window state.

    python -m benchmarks.bench_streaming               # mid config: hidden 512, 8 layers, 256 tok/frame
    python -m benchmarks.bench_streaming --frames 16 64 --config test-tiny   # quick look
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from casa_live.model.cache import plan_eviction
from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
from casa_live.model.config import preset
from casa_live.model.engine.engine import Engine, SessionSettings


def frame_cost(engine: Engine, row: int, image: np.ndarray) -> float:
    t0 = time.perf_counter()
    for _ in engine.caption(row, image):
        pass
    dt = time.perf_counter() - t0
    while engine.has_work():  # the stop/pre-image close is off the frame's critical path
        engine.step()
    return dt


def fast_forward(engine: Engine, row: int, frame: int, prompt_len: int, per_frame: int, tokens: int) -> None:
    """Put the row's text cache where `frame - 1` captioned frames leave it (attention cost depends
    on the cache length, not on its values). CASA replays the eviction policy of its bounded cache;
    insertion also advances its absolute positions."""
    text = engine.state.text
    length = prompt_len
    for _ in range(frame - 1):
        length -= plan_eviction(length, per_frame, text.capacity, int(text.sink[row]), text.chunk)
        length += per_frame
    text.length[row] = length
    if engine.insertion:
        gh, gw = engine.model.grid
        engine.state.spans.position[row] = prompt_len + (frame - 1) * (max(gh, gw) + tokens + 3)


def used_kv_bytes(engine: Engine, row: int) -> int:
    text = engine.state.text
    per_token = text.k.shape[0] * text.k.shape[2] * text.k.shape[4] * text.k.element_size() * 2
    total = int(text.length[row]) * per_token
    cs = engine.state.casa
    if cs is not None:
        per = cs.img_k.shape[0] * cs.img_k.shape[2] * cs.img_k.shape[4] * cs.img_k.element_size() * 2
        total += (int(cs.n_img[row]) + int(cs.win_len[row])) * per
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mid")
    ap.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-context", type=int, default=2048, help="CASA text-cache bound")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.config)
    image = np.random.default_rng(0).integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    settings = SessionSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    rows = []

    tok = word_tokenizer(cfg.lm.vocab)
    for fusion in ("casa", "insertion"):
        model = toy_model(args.config, fusion=fusion)
        prompt_len = len(Engine(model, tok, toy_generation_config(), max_sessions=1).prompt_ids(None))
        per_frame = args.tokens + 3  # post_image + caption + stop + pre_image
        if fusion == "insertion":
            per_frame += cfg.image_tokens  # ... + the frame's image tokens, in the text stream
            capacity = prompt_len + (max(args.frames) + args.repeat + 1) * per_frame
        else:
            capacity = args.max_context
        engine = Engine(
            model, tok, toy_generation_config(), max_sessions=1, max_context_tokens=capacity, branch_rows=0
        )
        row = engine.open(None, settings)
        frame_cost(engine, row, image)  # warm-up (and frame 0's prompt)
        for f in args.frames:
            fast_forward(engine, row, f, prompt_len, per_frame, args.tokens)
            costs = [frame_cost(engine, row, image) for _ in range(args.repeat)]
            rows.append(
                (fusion, f, statistics.median(costs), used_kv_bytes(engine, row), engine.kv_tokens(row))
            )

    print(
        f"# bench_streaming: config={args.config} hidden={cfg.lm.hidden} layers={cfg.lm.layers} "
        f"image_tokens={cfg.image_tokens} tokens/frame={args.tokens} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()}"
    )
    print("| fusion | frame | latency ms (median) | KV MiB in use | KV tokens |")
    print("|---|---|---|---|---|")
    for fusion, f, lat, nbytes, ntok in rows:
        print(f"| {fusion} | {f} | {lat * 1e3:.1f} | {nbytes / 2**20:.2f} | {ntok} |")
    by = {(r[0], r[1]): r[2] for r in rows}
    lo, hi = min(args.frames), max(args.frames)
    print(
        f"\nCASA frame {hi} / frame {lo}: {by[('casa', hi)] / by[('casa', lo)]:.2f}x; "
        f"insertion: {by[('insertion', hi)] / by[('insertion', lo)]:.2f}x; "
        f"insertion / CASA at frame {hi}: {by[('insertion', hi)] / by[('casa', hi)]:.1f}x"
    )


if __name__ == "__main__":
    main()
