"""Load test: N concurrent real websocket clients at 2 fps against `casa serve` on loopback.

Each client streams a clip of the synthetic world as JPEG frames (kind 0x01) paced by the wall
clock, like a camera, in live mode, starting 1/(N fps) after the previous client. The world knows the true caption of every frame, so
quality is measured, not assumed. Per N:
- quality: the fraction of captions cut short (ended by `deadline` or `length` instead of a stop
  token), exact match and mean token F1 of every caption against the ground truth of its frame;
- client-side frame latency (frame sent -> its caption.segment received) p50/p95/p99, which
  includes the socket, decode, queueing and generation; and the server's own `latency_ms` p95;
- lag: the largest `lag_ms` any session's `stats` reported; drops: frames the server dropped as
  stale (latest-frame-wins);
- the server's CPU (% of one core) and CPU ms per captioned frame, and a per-thread profile from
  /proc (the decode worker, the vision thread, the event loop, the decode pool), with the
  engine's own stage timings scraped from /metrics (vision ms/frame, decode step ms, batch size).

**Capacity** is the largest N for which, over the whole level: <= 1% of captions cut short, no
frame dropped, max lag < 500 ms, and exact match within 2 points of N = 1 on the same clips. Client
k streams clip k mod 8; "N = 1 on the same clips" is each clip captioned with no load at all
(offline_reference: the engine in-process, the server's image decode, no deadline), which is what
one live stream gets when nothing is cut short. It is printed as one line after the tables.

    python -m benchmarks.loadtest                        # N = 1, 8, 16, 24, 32, 40 for 60 s each
    python -m benchmarks.loadtest --clients 1,16 --duration 20 --model-dir /tmp/toy
    python -m benchmarks.loadtest --server ws://host:8000  # an already running server (no CPU columns)
    python -m benchmarks.loadtest --serve-args="--no-vision-thread"   # flags for `casa serve`

The load generator shares the machine: its own CPU use is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`casa serve` in a subprocess on loopback, with /proc-based CPU and memory readings."""

    def __init__(self, model_dir: str | None, max_sessions: int, extra: list[str] | None = None) -> None:
        self.started = time.monotonic()
        self.port = free_port()
        cmd = [sys.executable, "-m", "casa_live.cli.main", "serve", "--port", str(self.port), "--max-sessions",
               str(max_sessions), "--log-level", "warning", *(extra or [])]  # fmt: skip
        if model_dir:
            cmd += ["--model-dir", model_dir]
        self.log = open(Path(tempfile.gettempdir()) / "casa-loadtest-serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"casa serve exited: see {self.log.name}")
            try:
                if httpx.get(self.http + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("casa serve did not become ready")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def thread_cpu(self) -> dict[str, float]:
        return thread_cpu_seconds(self.proc.pid)

    def rss_mb(self) -> float:
        return proc_rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread group of a process, by OS thread name: the server names its threads
    (casa-worker, casa-vision), the event loop is the main thread, the rest are pools."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        group = "event loop" if task.name == str(pid) else _thread_group(name)
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def _thread_group(name: str) -> str:
    if name.startswith("casa-"):
        return name[5:].split("-")[0]  # worker, vision, ingest (one thread per session)
    if name.startswith("asyncio") or name.startswith("ThreadPool"):
        return "decode pool"
    return "other"


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- clients


@dataclass
class Clip:
    jpegs: list[bytes]  # one per frame, encoded up front (the client does no work per send)
    truth: list[str]  # the world's caption of each frame
    # the scene of each frame restated (the world's scene_caption): the truth of a caption after a
    # gap, when frames before it were not captioned (see record_event)
    scenes: list[str] = field(default_factory=list)


def synthetic_clip(n: int, seed: int, size: int = 256, quality: int = 90) -> Clip:
    """n frames of one continuous synthetic world (a clip never loops: its captions describe
    changes from frame to frame, so a jump back to frame 0 would have no true caption)."""
    from PIL import Image

    from casa_live.model.world.scene import World, WorldConfig, scene_caption

    world = World(seed, WorldConfig(size=size))
    jpegs, truth, scenes = [], [], []
    for _ in range(n):
        t = world.step()
        buf = io.BytesIO()
        Image.fromarray(world.render(t)).save(buf, format="JPEG", quality=quality)
        jpegs.append(buf.getvalue())
        truth.append(t.caption)
        scenes.append(scene_caption(t.objects))
    return Clip(jpegs, truth, scenes)


def offline_reference(clips: list[Clip], model_dir: str | None) -> list[float]:
    """Exact match of each clip captioned with no load at all: the engine in this process, one row
    per clip, every frame decoded by the server's own image path, no deadline. A live stream that
    is never cut short gets exactly these captions (greedy decoding), so this is what N = 1 would
    score on each clip; a level is compared with the mean over the clips its clients streamed."""
    import torch

    from casa_live.model.engine.engine import Engine
    from casa_live.server.ingest.frames import FrameLimits
    from casa_live.server.ingest.image import decode_image

    torch.set_num_threads(1)
    engine = Engine.from_checkpoint(model_dir or ROOT / "checkpoints" / "default", max_sessions=len(clips))
    limits = FrameLimits.for_processor(engine.processor, engine.image_size, 1 << 14, 1 << 14)
    rows = [engine.open() for _ in clips]
    exact = [0] * len(clips)
    for f in range(len(clips[0].jpegs)):
        text = {r: "" for r in rows}
        for r, clip in zip(rows, clips):
            engine.submit_frame(r, decode_image(clip.jpegs[f], limits))
        while any(engine.busy(r) for r in rows):
            for ev in engine.step():
                text[ev.row] += ev.text
        for k, r in enumerate(rows):
            exact[k] += text[r].strip() == clips[k].truth[f]
    return [e / len(clips[0].jpegs) for e in exact]


def token_f1(a: str, b: str) -> float:
    x, y = a.split(), b.split()
    if not x and not y:
        return 1.0
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    if common == 0:
        return 0.0
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


@dataclass
class ClientResult:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, client-side
    worst: list[tuple[float, int]] = field(default_factory=list)  # (server latency s, frame index)
    server_latencies: list[float] = field(default_factory=list)  # seconds, from caption.segment
    max_lag_ms: float = 0.0
    dropped: int = 0
    captioned: int = 0
    segments: int = 0
    cut: int = 0  # captions ended by deadline or length instead of a stop token
    cut_burst: int = 0  # ... of them, of the first two frames (the start-up burst)
    exact: int = 0
    f1: float = 0.0  # sum over segments
    # the world's caption of a frame describes the change since the frame before it, so it is the
    # truth of a caption only when that frame was captioned too; after a gap (frames before it not
    # captioned: shed past capacity), the changes across the gap are not one event a frame, and the
    # truth is the scene restated (what a commentator who saw only the captioned frames can say;
    # the server restarts such a row, GenerationConfig.restate_after_gap). Exact match is over
    # both, and also counted over each kind apart
    consecutive: int = 0
    exact_consecutive: int = 0
    restated: int = 0  # captions the server marked `restated`
    last_segment_at: float | None = None  # when its latest caption.segment came (time.monotonic)
    max_silence_s: float = 0.0  # the longest time between two of its captions
    frames_seen: set[int] = field(default_factory=set)
    clip: int = 0  # which clip it streamed
    errors: list[str] = field(default_factory=list)


# the yes/no forms of the world's question language (model/world/questions.py), for --watches
WATCH_QUESTIONS = (
    "is there a red circle?",
    "is there a blue object?",
    "is there a star?",
    "is the scene empty?",
    "is there a green square?",
    "is there a yellow object?",
    "is there a cross?",
    "is there a white triangle?",
)


async def run_client(
    uri: str, clip: Clip, duration: float, fps: float, token: str | None, watches: int = 0
) -> ClientResult:
    import websockets

    from casa_live.server import protocol as p

    result = ClientResult()
    sent_at: dict[int, float] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(uri, max_size=None, additional_headers=headers) as ws:
        created = json.loads(await ws.recv())
        if created.get("type") != "session.created":
            result.errors.append(created.get("code", "no session"))
            return result
        session: dict = {"fps": fps, "mode": "live"}
        if watches:
            session["watches"] = [
                {"id": f"w{k}", "question": q} for k, q in enumerate(WATCH_QUESTIONS[:watches])
            ]
        await ws.send(json.dumps({"type": "session.update", "session": session}))

        async def receive() -> None:
            async for message in ws:
                record_event(result, clip, json.loads(message), sent_at, time.monotonic())

        receiver = asyncio.create_task(receive())
        start = time.monotonic()
        period = 1.0 / fps
        i = 0
        while (t := start + i * period) < start + duration:
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            sent_at[i] = time.monotonic()  # frame index == session frame index: one frame per slot
            await ws.send(p.pack_image(clip.jpegs[i], round(i * period * 1e6)))
            result.sent += 1
            i += 1
        await ws.send(json.dumps({"type": "session.close"}))
        await receiver
    return result


def record_event(
    result: ClientResult, clip: Clip, event: dict, sent_at: dict[int, float], now: float
) -> None:
    """Score one server event into a client's result: a caption segment (latency, cut short, exact
    match and token F1 against the clip's truth), stats (lag), an error, the closing stats."""
    kind = event["type"]
    if kind == "caption.segment":
        if event["frame"] in sent_at:
            result.latencies.append(now - sent_at[event["frame"]])
        result.server_latencies.append(event["latency_ms"] / 1000)
        result.worst.append((event["latency_ms"] / 1000, event["frame"]))
        result.segments += 1
        result.cut += event["reason"] != "stop"
        result.cut_burst += event["reason"] != "stop" and event["frame"] < 2
        frame = event["frame"]
        follows = frame == 0 or frame - 1 in result.frames_seen
        truth = clip.truth[frame] if follows or not clip.scenes else clip.scenes[frame]
        result.exact += event["text"].strip() == truth
        if follows:
            result.consecutive += 1
            result.exact_consecutive += event["text"].strip() == truth
        result.restated += bool(event.get("restated"))
        if result.last_segment_at is not None:
            result.max_silence_s = max(result.max_silence_s, now - result.last_segment_at)
        result.last_segment_at = now
        result.frames_seen.add(frame)
        result.f1 += token_f1(event["text"], truth)
    elif kind == "stats":
        result.max_lag_ms = max(result.max_lag_ms, event["lag_ms"])
    elif kind == "error":
        result.errors.append(event["code"])
    elif kind == "session.closed":
        stats = event["stats"]
        result.dropped, result.captioned = stats["frames_dropped"], stats["frames_captioned"]
        result.max_lag_ms = max(result.max_lag_ms, stats["lag_ms"])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


async def run_level(
    uri: str, n: int, duration: float, fps: float, token: str | None, clips: list[Clip], watches: int = 0
) -> list[ClientResult]:
    starts = []
    for k in range(n):  # stagger the starts over one frame period, like independent cameras
        starts.append(
            asyncio.create_task(
                _delayed(
                    k * (1.0 / fps) / n, run_client(uri, clips[k % len(clips)], duration, fps, token, watches)
                )
            )
        )
    results = await asyncio.gather(*starts)
    for k, r in enumerate(results):
        r.clip = k % len(clips)
    return results


async def _delayed(delay: float, coro):  # type: ignore[no-untyped-def]
    await asyncio.sleep(delay)
    return await coro


STAGES = {  # histogram -> what the profile calls it
    "casa_frame_decode_seconds": "JPEG decode",
    "casa_vision_encode_seconds": "vision",
    "casa_step_seconds": "LM step",
    "casa_batch_size": "batch",
}


def scrape(http: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the engine's stage histograms, from the server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    text = httpx.get(http + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name not in STAGES:
            continue
        total = count = 0.0
        for sample in fam.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        out[fam.name] = (total, count)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,16,24,32,40", help="comma-separated N values")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--model-dir", default=None, help="default: the bundled checkpoints/default")
    ap.add_argument("--server", default=None, help="ws:// URL of a running server (skips starting one)")
    ap.add_argument("--serve-args", default="", help="extra `casa serve` flags, one string")
    ap.add_argument("--token", default=os.environ.get("CASA_TOKEN"))
    ap.add_argument(
        "--clips",
        type=int,
        default=8,
        help="distinct world clips the clients cycle through (client k streams clip k mod CLIPS); "
        "each level's exact match is compared with the no-load reference of the same clips",
    )
    ap.add_argument(
        "--watches",
        type=int,
        default=0,
        choices=range(len(WATCH_QUESTIONS) + 1),
        metavar=f"0..{len(WATCH_QUESTIONS)}",
        help="each client sets this many watches (yes/no questions scored on every frame): what "
        "watches cost, against the same command without",
    )
    ap.add_argument("--out", default=None, help="also write the markdown tables here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]

    frames = int(args.duration * args.fps) + 2
    clips = [synthetic_clip(frames, seed=100 + k) for k in range(max(1, args.clips))]
    t0 = time.monotonic()
    reference = offline_reference(clips, args.model_dir)
    print(f"no-load reference exact match per clip: {[round(x, 3) for x in reference]} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    server = None
    if args.server:
        uri = args.server.rstrip("/") + ("" if args.server.endswith("/v1/stream") else "/v1/stream")
    else:
        server = ServerProcess(args.model_dir, max_sessions=max(levels), extra=args.serve_args.split())
        server.wait_ready()
        print(f"server ready in {time.monotonic() - server.started:.1f} s", flush=True)
        uri = server.ws
    rows = []
    try:
        for n in levels:
            cpu0, own0, t0 = (server.cpu_seconds() if server else 0.0), time.process_time(), time.monotonic()
            threads0 = server.thread_cpu() if server else {}
            stages0 = scrape(server.http) if server else {}
            results = asyncio.run(run_level(uri, n, args.duration, args.fps, args.token, clips, args.watches))
            wall = time.monotonic() - t0
            rows.append(level_row(n, results, wall, own0, cpu0, threads0, stages0, server))
            # what these clients would score with no load at all (each clip's reference, by frames)
            weights = [r.segments for r in results]
            rows[-1]["reference"] = sum(reference[r.clip] * w for r, w in zip(results, weights)) / max(
                1, sum(weights)
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if server:
            server.stop()
    tables = (
        format_table(rows, args)
        + "\n\n"
        + format_profile(rows)
        + "\n\n"
        + capacity_line(rows)
        + "\n"
        + overload_line(rows)
    )
    print(tables)
    if args.out:
        Path(args.out).write_text(tables + "\n")
    return 0


def level_row(
    n: int,
    results: list[ClientResult],
    wall: float,
    own0: float,
    cpu0: float,
    threads0: dict[str, float],
    stages0: dict[str, tuple[float, float]],
    server: ServerProcess | None,
) -> dict:
    cpu = (server.cpu_seconds() - cpu0) / wall * 100 if server else float("nan")
    own = (time.process_time() - own0) / wall * 100
    lat = [x for r in results for x in r.latencies]
    srv = [x for r in results for x in r.server_latencies]
    segments = sum(r.segments for r in results)
    captioned = sum(r.captioned for r in results)
    # each client's share of its frames captioned: past capacity the server captions fewer frames,
    # and the spread says whether every stream gets the same share
    shares = [r.segments / r.sent for r in results if r.sent]
    mean_share = sum(shares) / max(1, len(shares))
    row = {
        "N": n,
        "sent": sum(r.sent for r in results),
        "captioned": captioned,
        "dropped": sum(r.dropped for r in results),
        "cut_pct": 100 * sum(r.cut for r in results) / max(1, segments),
        "cut_burst": sum(r.cut_burst for r in results),
        "cut_total": sum(r.cut for r in results),
        # full captions (ended by a stop token) per second: streams served with captions cut short
        # are not streams served
        "goodput": (segments - sum(r.cut for r in results)) / wall,
        "share": mean_share,
        "share_spread": max((abs(x - mean_share) / mean_share for x in shares), default=0.0)
        if mean_share
        else 0.0,
        "exact": sum(r.exact for r in results) / max(1, segments),
        "exact_consecutive": sum(r.exact_consecutive for r in results)
        / max(1, sum(r.consecutive for r in results)),
        "consecutive": sum(r.consecutive for r in results),
        "exact_after_gap": (
            sum(r.exact - r.exact_consecutive for r in results)
            / max(1, segments - sum(r.consecutive for r in results))
        ),
        "restated": sum(r.restated for r in results),
        # the longest any stream went without a caption: past capacity, how long a turn is awaited
        "max_silence_s": max((r.max_silence_s for r in results), default=0.0),
        "f1": sum(r.f1 for r in results) / max(1, segments),
        "p50_ms": percentile(lat, 50) * 1000,
        "p95_ms": percentile(lat, 95) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "server_p95_ms": percentile(srv, 95) * 1000,
        "max_lag_ms": max((r.max_lag_ms for r in results), default=0.0),
        "server_cpu_pct": cpu,
        # CPU time per captioned frame: the capacity figure that survives a shared machine
        "cpu_ms_per_frame": cpu / 100 * wall / max(1, captioned) * 1000,
        "loadgen_cpu_pct": own,
        "rss_mb": server.rss_mb() if server else float("nan"),
        "errors": sorted({e for r in results for e in r.errors}),
        # the slowest captions (server ms, frame index): where the tail comes from
        "worst": [
            (round(s * 1000), f) for s, f in sorted((w for r in results for w in r.worst), reverse=True)[:6]
        ],
    }
    if server:
        threads = server.thread_cpu()
        row["threads_pct"] = {k: (v - threads0.get(k, 0.0)) / wall * 100 for k, v in sorted(threads.items())}
        stages = scrape(server.http)
        for name, label in STAGES.items():
            s1, c1 = stages.get(name, (0.0, 0.0))
            s0, c0 = stages0.get(name, (0.0, 0.0))
            row[label] = {"mean": (s1 - s0) / max(1.0, c1 - c0), "count": c1 - c0}
    return row


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| N | frames sent | captioned | dropped | cut short | exact match (N = 1 on these clips); "
        "over captions whose previous frame was captioned; after a gap (share, restated) | token F1 "
        "| latency p50 / p95 / p99 (ms) | server p95 (ms) | max lag (ms) | goodput (full captions/s) "
        "| frames captioned (spread) | server CPU (% of 1 core) "
        "| server CPU ms / captioned frame | load generator CPU | server RSS (MB) | errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['N']} | {r['sent']} | {r['captioned']} | {r['dropped']} | {r['cut_pct']:.1f}% "
        f"| {r['exact']:.3f} ({r.get('reference', float('nan')):.3f}); "
        f"after a captioned frame {r.get('exact_consecutive', float('nan')):.3f}; "
        f"after a gap {r.get('exact_after_gap', float('nan')):.3f} "
        f"({1 - r.get('consecutive', 0) / max(1, r['captioned']):.0%}, {r.get('restated', 0)} restated) "
        f"| {r['f1']:.3f} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} | {r['server_p95_ms']:.0f} "
        f"| {r['max_lag_ms']:.0f} | {r['goodput']:.1f} | {r['share']:.2f} (±{r['share_spread']:.0%}) "
        f"| {r['server_cpu_pct']:.0f} | {r['cpu_ms_per_frame']:.1f} "
        f"| {r['loadgen_cpu_pct']:.0f} | {r['rss_mb']:.0f} | {', '.join(r['errors']) or '-'} |"
        for r in rows
    ]
    note = f"\n{args.duration:g} s per level at {args.fps:g} fps, JPEG frames (0x01), live mode."
    note += "\nCuts of the first two frames (the start-up burst) of all cuts: " + ", ".join(
        f"N = {r['N']}: {r.get('cut_burst', 0)} of {r.get('cut_total', 0)}" for r in rows
    )
    return "\n".join([head, *lines]) + note


def format_profile(rows: list[dict]) -> str:
    """Where the server's time goes, per level: CPU % of one core by thread, and stage timings."""
    if not rows or "threads_pct" not in rows[0]:
        return ""
    groups = sorted({g for r in rows for g in r["threads_pct"]})
    head = (
        "| N | "
        + " | ".join(f"{g} CPU %" for g in groups)
        + " | JPEG decode ms/frame | vision ms/frame | LM step ms (mean) | steps/s | mean batch |\n"
        + "|---" * (len(groups) + 6)
        + "|"
    )
    lines = []
    for r in rows:
        wall_steps = r["LM step"]["count"]
        cells = " | ".join(f"{r['threads_pct'].get(g, 0.0):.0f}" for g in groups)
        dur = r["sent"] / max(1, r["N"]) / 2.0  # seconds of video per client (2 fps)
        lines.append(
            f"| {r['N']} | {cells} | {r['JPEG decode']['mean'] * 1000:.2f} | {r['vision']['mean'] * 1000:.2f} "
            f"| {r['LM step']['mean'] * 1000:.2f} | {wall_steps / max(dur, 1e-9):.0f} | {r['batch']['mean']:.1f} |"
        )
    return "\n".join([head, *lines])


def meets(r: dict) -> bool:
    """Full quality: <= 1% cut short, nothing dropped, no error, max lag < 500 ms, and exact match
    within 2 points of what the same streams score one at a time (N = 1 on the same clips: the
    no-load reference, see offline_reference)."""
    return (
        r["cut_pct"] <= 1.0
        and r["dropped"] == 0
        and not r["errors"]
        and r["max_lag_ms"] < 500
        and r["exact"] >= r.get("reference", r["exact"]) - 0.02
    )


def _why(f: dict) -> str:
    """The conditions a level failed, as a phrase."""
    reasons = [
        f"{f['cut_pct']:.1f}% cut short" if f["cut_pct"] > 1.0 else "",
        f"{f['dropped']} dropped" if f["dropped"] else "",
        f"max lag {f['max_lag_ms']:.0f} ms" if f["max_lag_ms"] >= 500 else "",
        f"exact {f['exact']:.3f} vs {f.get('reference', 0):.3f}"
        if f["exact"] < f.get("reference", 0) - 0.02
        else "",
    ]
    return f"N = {f['N']} failed ({', '.join(x for x in reasons if x) or 'errors'})"


def capacity_line(rows: list[dict]) -> str:
    """The largest N whose level met every condition. A failing level above it is named, and so
    is one below it: a run where a smaller N fails and a larger one passes is at the edge of the
    bar, and one run does not settle it."""
    if not rows:
        return "capacity: no level ran"
    ok = [r["N"] for r in rows if meets(r)]
    if not ok:
        return f"capacity at full quality: below {min(r['N'] for r in rows)} streams (no level met the bar)"
    above = [r for r in rows if not meets(r) and r["N"] > max(ok)]
    below = [r for r in rows if not meets(r) and r["N"] < max(ok)]
    why = f"; {_why(above[0])}" if above else ""
    if below:
        why += f"; but below it {'; '.join(_why(r) for r in below)}: at the edge of the bar, rerun"
    if not above and not below:
        why = f"; every level run met it (largest run: {max(ok)})"
    return (
        f"capacity at full quality: {max(ok)} streams (<= 1% cut short, 0 dropped, max lag < 500 ms, "
        f"exact match within 0.02 of the same clips at N = 1){why}"
    )


def overload_line(rows: list[dict]) -> str:
    """Past capacity (docs/scaling.md, "Past capacity"): each level above the largest one that met
    the capacity bar, against the graceful-overload bar: <= 1% of the delivered captions cut short,
    exact match within 0.02 of the no-load reference (over every caption; after a gap the truth is
    the scene restated, see ClientResult), goodput >= 90% of the peak goodput of the
    levels at capacity, every stream's share of frames captioned within 30% of the mean, max lag
    under 1 s."""
    ok = [r for r in rows if meets(r)]
    over = [r for r in rows if ok and r["N"] > max(x["N"] for x in ok)]
    if not over:
        return "past capacity: no level above capacity ran"
    peak = max(r["goodput"] for r in ok)
    parts = []
    for r in over:
        fails = [
            f"{r['cut_pct']:.1f}% cut" if r["cut_pct"] > 1.0 else "",
            f"exact {r['exact']:.3f} vs {r.get('reference', 0):.3f}"
            if r["exact"] < r.get("reference", 0) - 0.02
            else "",
            f"goodput {r['goodput'] / peak:.0%} of peak" if r["goodput"] < 0.9 * peak else "",
            f"share spread {r['share_spread']:.0%}" if r["share_spread"] > 0.3 else "",
            f"max lag {r['max_lag_ms']:.0f} ms" if r["max_lag_ms"] >= 1000 else "",
        ]
        why = ", ".join(x for x in fails if x)
        parts.append(
            f"N = {r['N']}: {'meets it' if not why else 'fails (' + why + ')'}, goodput {r['goodput'] / peak:.0%} "
            f"of peak, {r['share']:.0%} of frames captioned, the longest wait for a caption "
            f"{r.get('max_silence_s', float('nan')):.1f} s"
        )
    return f"past capacity (peak goodput {peak:.1f}/s): " + "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
