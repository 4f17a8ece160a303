"""Scale-out benchmark: live clients over N replicas behind HAProxy, with rolling restarts.

    python -m benchmarks.scaleout --replicas 3 --slots 4 --clients 8 --rounds 2

What it does (benchmarks/replicas.py starts and stops everything, on loopback):
1. N `casa serve` replicas (the bundled model) behind HAProxy (leastconn, /readyz checks every 200 ms);
2. `--clients` real `casa stream` clients (clients/stream.py, realtime: a camera at `--fps`, live mode)
   open their sessions through HAProxy; the spread is read from each replica's /metrics;
3. each round SIGTERMs the replica holding the most sessions (a rolling restart): its clients get
   `session.draining`, their captions in flight, close 1012, and reconnect through HAProxy; a
   replacement starts on the same port and rejoins the rotation before the next round.

Printed, as a markdown table: session spread, clients moved per drain, reconnect time (connection
closed -> next session ready, p50/p95), the longest caption gap each moved client saw, frames lost per
moved client (sent to the drained session and never captioned nor reported dropped), and how long the
drained replica took to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import tempfile
import time
from pathlib import Path

from benchmarks.replicas import LocalCluster
from casa_live.clients.printer import LivePrinter
from casa_live.clients.sources import open_source
from casa_live.clients.stream import Streamer, StreamOptions
from casa_live.clients.writers import Segment


class ArrivalLog:
    """A caption sink that records when each caption arrived (a CaptionWriter without a file)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def write(self, segment: Segment) -> None:
        self.times.append(time.monotonic())

    def close(self) -> None:
        pass

    def longest_gap(self, after: float) -> float:
        times = [t for t in self.times if t >= after - 5.0]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace, cluster: LocalCluster) -> dict:
    opts = StreamOptions(
        url=cluster.ws, realtime=True, session={"fps": args.fps}, open_timeout=30, reply_timeout=90,
        close_timeout=30, reconnect_tries=10,
    )  # fmt: skip
    logs = [ArrivalLog() for _ in range(args.clients)]
    streamers = [
        Streamer(open_source(f"synthetic:{i}", seconds=args.seconds), opts, [logs[i]], LivePrinter(io.StringIO(), io.StringIO(), live=False))
        for i in range(args.clients)
    ]  # fmt: skip
    tasks = []
    for s in streamers:  # one at a time, as cameras come online: leastconn sees each new session
        tasks.append(asyncio.create_task(s.run()))
        await asyncio.sleep(0.3)
    await _until(lambda: min(s.stats.captioned for s in streamers) >= 3, 120)
    spread = [await asyncio.to_thread(r.sessions) for r in cluster.replicas]
    moved_counts, exits, gaps, lost = [], [], [], []
    for _ in range(args.rounds):
        per = [await asyncio.to_thread(r.sessions) for r in cluster.replicas]
        victim = cluster.replicas[per.index(max(per))]
        before = {
            id(s): (s.stats.reconnects, len(s.stats.reconnect_seconds), s.stats.lost) for s in streamers
        }
        t0 = time.monotonic()
        victim.terminate()
        await asyncio.to_thread(victim.proc.wait, 120)
        exits.append(time.monotonic() - t0)
        # the victim exits once its sessions are closed: by then each of its clients has begun to reconnect
        moved = [s for s in streamers if s.stats.reconnects > before[id(s)][0]]
        await _until(
            lambda m=moved, b=before: all(len(s.stats.reconnect_seconds) > b[id(s)][1] for s in m), 120
        )
        moved_counts.append(len(moved))
        await asyncio.sleep(3.0)  # captions flow again on the new replicas
        for s in moved:
            gaps.append(logs[streamers.index(s)].longest_gap(t0))
            lost.append(s.stats.lost - before[id(s)][2])
        await asyncio.to_thread(cluster.replace, victim)
    for s in streamers:
        s.interrupted.set()
    codes = await asyncio.gather(*tasks, return_exceptions=True)
    reconnect = [t for s in streamers for t in s.stats.reconnect_seconds]
    return {
        "spread": spread,
        "moved": moved_counts,
        "reconnect": reconnect,
        "gaps": gaps,
        "lost": lost,
        "exits": exits,
        "codes": codes,
        "captioned": sum(s.stats.captioned for s in streamers),
    }


async def _until(fn, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise TimeoutError("the clients did not get there in time")
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--slots", type=int, default=4, help="max_sessions per replica")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rolling restarts (one replica each)")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--drain-seconds", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=240.0, help="length of each client's synthetic clip")
    args = ap.parse_args(argv)
    if args.clients > (args.replicas - 1) * args.slots:
        ap.error(
            "the clients must fit on the replicas left while one drains: clients <= (replicas - 1) * slots"
        )
    with tempfile.TemporaryDirectory(prefix="casa-scaleout-") as tmp:
        cluster = LocalCluster(Path(tmp), args.replicas, args.slots, args.drain_seconds)
        t0 = time.monotonic()
        cluster.start()
        started = time.monotonic() - t0
        try:
            r = asyncio.run(run(args, cluster))
        finally:
            cluster.stop()
    ms = [t * 1000 for t in r["reconnect"]]
    gaps = [g * 1000 for g in r["gaps"]]
    lost = r["lost"]
    print(f"{args.replicas} replicas x {args.slots} slots, {args.clients} live clients at {args.fps:g} fps, "
          f"{args.rounds} rolling restarts; cluster up in {started:.0f} s; client exit codes {r['codes']}")  # fmt: skip
    print()
    print("| session spread | clients moved per drain | reconnect p50 / p95 (ms) | longest caption gap p50 / p95 (ms) "
          "| frames lost per moved client (mean / max) | drained replica exit (s) | captions |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {' / '.join(map(str, r['spread']))} | {', '.join(map(str, r['moved']))} "
        f"| {percentile(ms, 0.5):.0f} / {percentile(ms, 0.95):.0f} (n = {len(ms)}) "
        f"| {percentile(gaps, 0.5):.0f} / {percentile(gaps, 0.95):.0f} "
        f"| {sum(lost) / max(1, len(lost)):.2f} / {max(lost, default=0)} "
        f"| {', '.join(f'{e:.1f}' for e in r['exits'])} | {r['captioned']} |"
    )
    return 0 if all(c in (0, 130) for c in r["codes"]) else 1  # 130: stopped by the benchmark at the end


if __name__ == "__main__":
    raise SystemExit(main())
