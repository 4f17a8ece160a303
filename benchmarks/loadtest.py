"""Load test: N concurrent real websocket clients at 2 fps against `casa serve` on loopback.

Each client streams the synthetic world as JPEG frames (kind 0x01) paced by the wall clock, like a
camera, in live mode. Measured per N:
- client-side frame latency (frame sent -> its caption.segment received) p50/p95/p99, which includes
  the socket, decode, queueing and generation; and the server's own `latency_ms` p95;
- lag: the largest `lag_ms` any session's `stats` reported;
- drops: frames the server dropped as stale (latest-frame-wins), from each session's final stats;
- the server process's CPU (% of one core, from /proc) and RSS.

    python -m benchmarks.loadtest                        # N = 1, 4, 8, 16, 32 for 60 s each
    python -m benchmarks.loadtest --clients 1,16 --duration 20 --model-dir /tmp/toy
    python -m benchmarks.loadtest --server ws://host:8000  # an already running server (no CPU column)

The target (DESIGN §6): 16 concurrent streams for 60 s with lag < 500 ms and no drops, on this 2-core
machine with the bundled model. The load generator shares the machine: its own CPU use is reported.
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
        self.port = free_port()
        cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port), "--max-sessions",
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


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- clients


def synthetic_jpegs(n: int, seed: int, size: int = 256, quality: int = 90) -> list[bytes]:
    """The synthetic world's frames as JPEG, encoded once up front (the client does no work per send)."""
    from PIL import Image

    from model.world import World, WorldConfig

    world = World(seed, WorldConfig(size=size))
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(world.render(world.step())).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


@dataclass
class ClientResult:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, client-side
    server_latencies: list[float] = field(default_factory=list)  # seconds, from caption.segment
    max_lag_ms: float = 0.0
    dropped: int = 0
    captioned: int = 0
    errors: list[str] = field(default_factory=list)


async def run_client(
    uri: str, frames: list[bytes], duration: float, fps: float, token: str | None
) -> ClientResult:
    import websockets

    from server import protocol as p

    result = ClientResult()
    sent_at: dict[int, float] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(uri, max_size=None, additional_headers=headers) as ws:
        created = json.loads(await ws.recv())
        if created.get("type") != "session.created":
            result.errors.append(created.get("code", "no session"))
            return result
        await ws.send(json.dumps({"type": "session.update", "session": {"fps": fps, "mode": "live"}}))

        async def receive() -> None:
            async for message in ws:
                event = json.loads(message)
                kind = event["type"]
                if kind == "caption.segment":
                    now = time.monotonic()
                    if event["frame"] in sent_at:
                        result.latencies.append(now - sent_at[event["frame"]])
                    result.server_latencies.append(event["latency_ms"] / 1000)
                elif kind == "stats":
                    result.max_lag_ms = max(result.max_lag_ms, event["lag_ms"])
                elif kind == "error":
                    result.errors.append(event["code"])
                elif kind == "session.closed":
                    stats = event["stats"]
                    result.dropped, result.captioned = stats["frames_dropped"], stats["frames_captioned"]
                    result.max_lag_ms = max(result.max_lag_ms, stats["lag_ms"])

        receiver = asyncio.create_task(receive())
        start = time.monotonic()
        period = 1.0 / fps
        i = 0
        while (t := start + i * period) < start + duration:
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            sent_at[i] = time.monotonic()  # frame index == session frame index: one frame per slot
            await ws.send(p.pack_image(frames[i % len(frames)], round(i * period * 1e6)))
            result.sent += 1
            i += 1
        await ws.send(json.dumps({"type": "session.close"}))
        await receiver
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


async def run_level(uri: str, n: int, duration: float, fps: float, token: str | None) -> list[ClientResult]:
    clips = [synthetic_jpegs(40, seed=100 + k) for k in range(min(n, 8))]
    starts = []
    for k in range(n):  # stagger the starts over one frame period, like independent cameras
        starts.append(
            asyncio.create_task(
                _delayed(k * (1.0 / fps) / n, run_client(uri, clips[k % len(clips)], duration, fps, token))
            )
        )
    return await asyncio.gather(*starts)


async def _delayed(delay: float, coro):  # type: ignore[no-untyped-def]
    await asyncio.sleep(delay)
    return await coro


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,8,16,32", help="comma-separated N values")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--model-dir", default=None, help="default: the bundled checkpoints/default")
    ap.add_argument("--server", default=None, help="ws:// URL of a running server (skips starting one)")
    ap.add_argument("--token", default=os.environ.get("CASA_TOKEN"))
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]

    server = None
    if args.server:
        uri = args.server.rstrip("/") + ("" if args.server.endswith("/v1/stream") else "/v1/stream")
    else:
        server = ServerProcess(args.model_dir, max_sessions=max(levels))
        server.wait_ready()
        uri = server.ws
    rows = []
    try:
        for n in levels:
            cpu0, own0, t0 = (server.cpu_seconds() if server else 0.0), time.process_time(), time.monotonic()
            results = asyncio.run(run_level(uri, n, args.duration, args.fps, args.token))
            wall = time.monotonic() - t0
            cpu = (server.cpu_seconds() - cpu0) / wall * 100 if server else float("nan")
            own = (time.process_time() - own0) / wall * 100
            lat = [x for r in results for x in r.latencies]
            srv = [x for r in results for x in r.server_latencies]
            row = {
                "N": n,
                "sent": sum(r.sent for r in results),
                "captioned": sum(r.captioned for r in results),
                "dropped": sum(r.dropped for r in results),
                "p50_ms": percentile(lat, 50) * 1000,
                "p95_ms": percentile(lat, 95) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "server_p95_ms": percentile(srv, 95) * 1000,
                "max_lag_ms": max((r.max_lag_ms for r in results), default=0.0),
                "server_cpu_pct": cpu,
                # CPU time per captioned frame: the capacity figure that survives a shared machine
                "cpu_ms_per_frame": cpu / 100 * wall / max(1, sum(r.captioned for r in results)) * 1000,
                "loadgen_cpu_pct": own,
                "rss_mb": server.rss_mb() if server else float("nan"),
                "errors": sorted({e for r in results for e in r.errors}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server:
            server.stop()
    table = format_table(rows, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| N | frames sent | captioned | dropped | latency p50 / p95 / p99 (ms) | server p95 (ms) | max lag (ms) "
        "| server CPU (% of 1 core) | server CPU ms / captioned frame | load generator CPU | server RSS (MB) "
        "| errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['N']} | {r['sent']} | {r['captioned']} | {r['dropped']} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} / "
        f"{r['p99_ms']:.0f} | {r['server_p95_ms']:.0f} | {r['max_lag_ms']:.0f} | {r['server_cpu_pct']:.0f} "
        f"| {r['cpu_ms_per_frame']:.0f} | {r['loadgen_cpu_pct']:.0f} | {r['rss_mb']:.0f} | {', '.join(r['errors']) or '-'} |"
        for r in rows
    ]
    note = f"\n{args.duration:g} s per level at {args.fps:g} fps, JPEG frames (0x01), live mode."
    return "\n".join([head, *lines]) + note


if __name__ == "__main__":
    sys.exit(main())
