"""A small, varied synthetic load for a running `casa serve`, to give the dashboard something to show.

Not a benchmark (benchmarks/ has those): it makes every dashboard panel move. Live sessions at 2 fps
stream the synthetic world (model/world/scene.py) as JPEG frames; they join and leave at staggered times;
one client sends 6 fps to a 2 fps session (resample drops, by design); now and then a client sends a
corrupt frame (a non-fatal bad_frame error). Used to draw docs/images/dashboard-sketch.svg:

    casa serve &                                         # the bundled model on :8000
    python docker/sketch_load.py --url ws://127.0.0.1:8000/v1/stream --minutes 6
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import threading
import time
from pathlib import Path

from PIL import Image
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from casa_live.model.world.scene import World
from casa_live.server.protocol import pack_image


def jpeg(frame) -> bytes:  # (H, W, 3) uint8
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def client(
    url: str, seed: int, send_fps: float, seconds: float, corrupt_every: int, stop: threading.Event
) -> None:
    world = World(seed)
    frames = world.frames(size=224)
    with connect(url, max_size=None, compression=None, open_timeout=30) as ws:
        ws.recv(timeout=30)  # session.created
        ws.send(json.dumps({"type": "session.update", "session": {"fps": 2.0, "mode": "live"}}))

        def drain() -> None:
            try:
                while True:
                    ws.recv()
            except Exception:  # the connection closed: the session is over
                return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        t0 = time.monotonic()
        i = 0
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            due = t0 + i / send_fps
            time.sleep(max(0.0, due - time.monotonic()))
            image, _truth = next(frames)
            payload = (
                b"\xff\xd8 not really a jpeg"
                if corrupt_every and i % corrupt_every == corrupt_every - 1
                else jpeg(image)
            )
            ws.send(pack_image(payload, pts_us=int(i * 1e6 / send_fps)))
            i += 1
        ws.send(json.dumps({"type": "session.close"}))
        reader.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--sessions", type=int, default=4, help="peak number of 2 fps sessions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    total = args.minutes * 60
    stop = threading.Event()
    threads = []
    # staggered: session k joins at k/sessions of the first half and stays for a random share of the rest
    for k in range(args.sessions):
        start = total * 0.5 * k / args.sessions
        length = total - start - rng.uniform(0, total * 0.25)
        send_fps = 6.0 if k == 1 else 2.0
        corrupt = 40 if k == 2 else 0
        t = threading.Timer(start, client, (args.url, args.seed + k, send_fps, length, corrupt, stop))
        t.start()
        threads.append(t)
    try:
        time.sleep(total + 5)
    finally:
        stop.set()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
