"""Scale-out for real on one machine: 3 `casa serve` replicas (the bundled model, 2 session slots each)
behind HAProxy (leastconn, HTTP health checks on /readyz), as docs/scaling.md deploys them behind a
Kubernetes ingress. The clients are the real ones (clients/stream.py), reconnect included."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from benchmarks.replicas import LocalCluster, metric
from casa_live.clients.printer import LivePrinter
from casa_live.clients.sources import open_source
from casa_live.clients.stream import Streamer, StreamOptions
from casa_live.clients.writers import open_writers

pytestmark = [
    pytest.mark.slow,  # 3 replicas and HAProxy: ~45 s on the 2-core box
    pytest.mark.skipif(
        shutil.which("haproxy") is None,
        reason="haproxy is not installed: apt-get install haproxy (.ci/run installs it)",
    ),
]

DRAIN = 20.0
CLIENTS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), replicas=3, max_sessions=2, drain_seconds=DRAIN)
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def open_session(uri: str) -> websockets.ClientConnection:
    """A websocket holding a session (session.created received), or an AssertionError with the refusal."""
    ws = await websockets.connect(uri, open_timeout=30)
    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    if event["type"] != "session.created":
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()
        raise AssertionError(f"session refused: {event} (close {ws.close_code})")
    return ws


def test_sessions_spread_and_a_full_replica_leaves_the_rotation(cluster: LocalCluster) -> None:
    r0 = cluster.replicas[0]

    async def run() -> None:
        # leastconn spreads sessions over the replicas
        spread = [await open_session(cluster.ws) for _ in range(3)]
        cluster.wait_sessions([1, 1, 1])
        for ws in spread:
            await ws.close()
        cluster.wait_sessions([0, 0, 0])

        # fill r0 behind the balancer's back: only its /readyz can tell HAProxy it is full
        direct = [await open_session(r0.ws) for _ in range(2)]
        cluster.wait_status({"r0": "DOWN", "r1": "UP", "r2": "UP"})
        # leastconn alone would pick r0 (no connections through HAProxy): none of these is refused
        routed = [await open_session(cluster.ws) for _ in range(4)]
        cluster.wait_sessions([2, 2, 2])

        # every slot taken: all out of rotation, and HAProxy itself answers 503
        cluster.wait_status(dict.fromkeys(cluster.names(), "DOWN"))
        with pytest.raises(InvalidStatus) as refused:
            await open_session(cluster.ws)
        assert refused.value.response.status_code == 503

        # a slot frees: r0 is back in rotation and takes the next session
        await direct.pop().close()
        cluster.wait_status({"r0": "UP"})
        again = await open_session(cluster.ws)
        cluster.wait_sessions([2, 2, 2])
        for r in cluster.replicas:  # each replica's own /metrics stays scrapeable
            text = r.metrics()
            assert metric(text, "casa_session_slots_free") == 0 and metric(text, "casa_session_slots") == 2
        for ws in [*direct, *routed, again]:
            await ws.close()

    asyncio.run(run())
    cluster.wait_sessions([0, 0, 0])
    cluster.wait_status(dict.fromkeys(cluster.names(), "UP"))


def test_sigterm_on_a_replica_moves_its_clients_to_the_others(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.wait_status(dict.fromkeys(cluster.names(), "UP"))
    opts = StreamOptions(
        url=cluster.ws, realtime=False, window=2, session={"max_new_tokens": 8},
        open_timeout=30, reply_timeout=90, close_timeout=30, reconnect_tries=8,
    )  # fmt: skip
    errs = [io.StringIO() for _ in range(CLIENTS)]
    streamers, writers = [], []
    for i in range(CLIENTS):
        writers.append(open_writers(jsonl=tmp_path / f"c{i}.jsonl", srt=tmp_path / f"c{i}.srt"))
        source = open_source(f"synthetic:{i}", seconds=30.0)
        printer = LivePrinter(io.StringIO(), errs[i], live=False)
        streamers.append(Streamer(source, opts, writers[-1], printer))

    async def run() -> tuple[list, dict]:
        tasks = [asyncio.create_task(s.run()) for s in streamers]
        deadline = time.monotonic() + 120
        while min(s.stats.captioned for s in streamers) < 4:  # every client is mid-stream
            assert time.monotonic() < deadline and not any(t.done() for t in tasks), [
                t for t in tasks if t.done()
            ]
            await asyncio.sleep(0.1)
        per_replica = [await asyncio.to_thread(r.sessions) for r in cluster.replicas]
        victim = cluster.replicas[per_replica.index(max(per_replica))]
        victim.terminate()
        seen = {"per_replica": per_replica, "victim": victim, "t0": time.monotonic(), "exit_s": None}
        while victim.alive():  # the other replicas stay scrapeable meanwhile
            for r in cluster.replicas:
                if r is not victim:
                    await asyncio.to_thread(r.metrics)
            await asyncio.sleep(0.2)
        seen["exit_s"] = time.monotonic() - seen["t0"]
        return await asyncio.gather(*tasks, return_exceptions=True), seen

    try:
        codes, seen = asyncio.run(run())
    finally:
        for w in writers:
            for x in w:
                x.close()
        for s in streamers:
            s.source.close()
    victim = seen["victim"]
    log = victim.log()
    assert codes == [0] * CLIENTS, (codes, [e.getvalue() for e in errs], log)
    assert victim.proc.returncode == 0 and seen["exit_s"] < DRAIN, (seen["exit_s"], log)
    assert "every session closed" in log and "ended: drained" in log
    moved = [s for s in streamers if s.stats.reconnect_seconds]
    assert len(moved) == max(seen["per_replica"]), (seen["per_replica"], [e.getvalue() for e in errs])
    for i, s in enumerate(streamers):
        rows = [json.loads(line) for line in (tmp_path / f"c{i}.jsonl").read_text().splitlines()]
        assert [r["frame"] for r in rows] == list(range(len(rows)))  # numbering goes on, no gap, no duplicate
        starts = [r["start"] for r in rows]
        assert starts == sorted(set(starts)), starts  # timestamps go on, none twice
        assert s.stats.lost <= 1, errs[i].getvalue()  # at most the frame in flight
        assert len(rows) == s.stats.sent - s.stats.lost == 60 - s.stats.lost
    for s in moved:
        assert "server: draining" in errs[streamers.index(s)].getvalue()
        assert "reconnected: session" in errs[streamers.index(s)].getvalue()
    survivors = [r for r in cluster.replicas if r is not victim]
    for r in survivors:  # the replicas that took the moved clients still answer /metrics
        assert metric(r.metrics(), "casa_sessions_active") == 0
