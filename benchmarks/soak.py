"""Soak test: one endless synthetic stream through `casa serve`, faster than real time.

The synthetic world (model/world/scene.py) is an endless camera with a ground-truth caption per frame. The
stream runs in offline mode (every frame captioned in full, backpressure instead of drops), so it
goes as fast as the model allows. Every `--report-every` seconds of video it prints, for that
stretch:
- the server's RSS and the session's KV tokens (from `stats`): flat memory is the claim under test;
- caption quality: exact-match rate against the ground truth, and the mean token F1;
- throughput as a real-time factor (video seconds per wall second).

    python -m benchmarks.soak                           # 1 h of video at 2 fps (7200 frames)
    python -m benchmarks.soak --video-seconds 600 --model-dir /tmp/toy

Targets (results in benchmarks/RESULTS.md): RSS at the end within 5% of its value at minute 5 of video; KV tokens
bounded; captions still correct at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

from benchmarks.loadtest import ServerProcess, token_f1


async def soak(uri: str, server: ServerProcess | None, args: argparse.Namespace) -> list[dict]:
    import websockets
    from PIL import Image

    from casa_live.model.world.scene import World, WorldConfig
    from casa_live.server import protocol as p

    world = World(args.seed, WorldConfig(size=args.size))
    total = round(args.video_seconds * args.fps)
    per_report = round(args.report_every * args.fps)
    truth: dict[int, str] = {}
    rows: list[dict] = []
    window: list[tuple[bool, float]] = []
    kv = 0
    done = asyncio.Event()
    start = time.monotonic()

    async with websockets.connect(uri, max_size=None) as ws:
        json.loads(await ws.recv())  # session.created
        session = {"fps": args.fps, "mode": "offline"}
        await ws.send(json.dumps({"type": "session.update", "session": session}))

        async def receive() -> None:
            nonlocal kv
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "stats":
                    kv = event["kv_tokens"]
                elif event["type"] == "error":
                    print("error:", event, file=sys.stderr)
                elif event["type"] == "caption.segment":
                    window_slots.release()
                    i = event["frame"]
                    expected = truth.pop(i)
                    window.append((event["text"] == expected, token_f1(event["text"], expected)))
                    if (i + 1) % per_report == 0 or i + 1 == total:
                        row = {
                            "video_min": round((i + 1) / args.fps / 60, 2),
                            "frames": i + 1,
                            "exact": sum(w[0] for w in window) / len(window),
                            "f1": sum(w[1] for w in window) / len(window),
                            "kv_tokens": kv,
                            "rss_mb": server.rss_mb() if server else float("nan"),
                            "rt_factor": (i + 1) / args.fps / (time.monotonic() - start),
                            "last": event["text"],
                            "expected": expected,
                        }
                        rows.append(row)
                        window.clear()
                        print(json.dumps(row), flush=True)
                    if i + 1 == total:
                        done.set()
                        return

        def next_frame() -> tuple[str, bytes]:
            state = world.step()
            buf = io.BytesIO()
            Image.fromarray(world.render(state)).save(buf, format="PNG")  # lossless: quality is the model's
            return state.caption, buf.getvalue()

        receiver = asyncio.create_task(receive())
        # at most 4 frames outstanding: the server keeps reading the socket (and its keepalive pongs)
        # instead of pushing back through TCP
        window_slots = asyncio.Semaphore(4)
        for i in range(total):
            await window_slots.acquire()
            # rendering off the loop: a busy loop misses the server's keepalive pings on a loaded machine
            truth[i], image = await asyncio.to_thread(next_frame)
            await ws.send(p.pack_image(image, round(i / args.fps * 1e6)))  # backpressure paces this
        await done.wait()
        await ws.send(json.dumps({"type": "session.close"}))
        await receiver
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video-seconds", type=float, default=3600.0)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--report-every", type=float, default=300.0, help="seconds of video per report row")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--size", type=int, default=128, help="rendered frame side (the world's default)")
    ap.add_argument("--model-dir", default=None, help="default: the bundled checkpoints/default")
    ap.add_argument("--server", default=None, help="ws:// URL of a running server (no RSS column)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    server = None
    if args.server:
        uri = args.server.rstrip("/") + ("" if args.server.endswith("/v1/stream") else "/v1/stream")
    else:
        server = ServerProcess(args.model_dir, max_sessions=2)
        server.wait_ready()
        uri = server.ws
    t0 = time.monotonic()
    try:
        rows = asyncio.run(soak(uri, server, args))
    finally:
        if server:
            server.stop()
    wall = time.monotonic() - t0
    table = [
        "| video (min) | frames | exact match | token F1 | KV tokens | server RSS (MB) | real-time factor |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['video_min']:g} | {r['frames']} | {r['exact']:.1%} | {r['f1']:.3f} | {r['kv_tokens']} "
        f"| {r['rss_mb']:.1f} | {r['rt_factor']:.1f}x |"
        for r in rows
    ]
    base = next((r for r in rows if r["video_min"] >= 5), rows[0] if rows else None)
    if base and rows:
        drift = (rows[-1]["rss_mb"] - base["rss_mb"]) / base["rss_mb"]
        table.append(
            f"\n{args.video_seconds / 60:g} min of video in {wall / 60:.1f} min wall; RSS at the end vs minute "
            f"{base['video_min']:g}: {drift:+.1%} (target within 5%)."
        )
    text = "\n".join(table)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
