"""Questions asked LIVE against a real `casa serve`: answer accuracy per question kind, and latency.

Clients stream held-out clips of the synthetic world as JPEG frames at 2 fps over the websocket, in
live mode, as benchmarks/loadtest.py's do (its `ServerProcess`, `synthetic_clip`, `run_client`,
`level_row` and `offline_reference` are reused), and ask questions of the world's question language
(model/world/questions.py) with `response.create` while they stream. Each client's clip is a seeded
world, so the ground truth of the frame an answer saw (`response.done`'s `frame`) is known:
`questions.answer(question, truth[frame].objects)`. An answer is right when its text equals it
(exact match; answers are greedy).

Two scenarios on one server:
- (a) one stream asking every `--single-every` seconds (2): response TTFT (response.create sent ->
  first response.output_text.delta) and done (-> response.done) p50 / p95, client-side, with the
  server's own `ttft_ms` / `latency_ms` p95;
- (b) `--clients` streams (32), `--askers` of them (8) asking every `--ask-every` seconds (3): the
  same latencies, and the captions' cut-short % and exact match (with the same clips at N = 1, no
  load) as loadtest reports them: do questions cost the captions anything under load?

Question kinds take turns per asking client, so all nine come up about equally often; each question
is sampled (`questions.sample`, seeded by clip and question) from the latest frame sent, half the time
about an object that is there. A client stops asking one period before its stream ends and waits for
its answers before it closes the session (closing would cancel them).

    python -m benchmarks.ask --model-dir runs/qa                      # 60 s per scenario
    python -m benchmarks.ask --model-dir /tmp/qa --duration 20        # a smoke run
    python -m benchmarks.ask --model-dir runs/qa --scenarios single   # (a) only

The model must answer questions (its generation config has a question template); the bundled
checkpoints/default does not, and the benchmark says so and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import loadtest as lt

MAX_IN_FLIGHT = 4  # the server's limit of questions in flight per session (docs/protocol.md)


@dataclass
class WorldClip:
    """A loadtest clip (JPEG frames, true captions) and each frame's objects, for the answers' truth."""

    seed: int
    clip: lt.Clip
    objects: list[tuple]  # per frame: the world's ObjectStates


def world_clip(n: int, seed: int) -> WorldClip:
    from casa_live.model.world.scene import World, WorldConfig

    clip = lt.synthetic_clip(n, seed)
    world = World(seed, WorldConfig(size=256))
    truth = [world.step() for _ in range(n)]
    assert [t.caption for t in truth] == clip.truth, "the world replayed differently"
    return WorldClip(seed, clip, [t.objects for t in truth])


@dataclass
class Asked:
    """One question: what was asked, when (client clock), and what came back."""

    id: str
    kind: str
    question: str
    sent: float
    first: float | None = None  # the first response.output_text.delta
    done: float | None = None  # response.done
    frame: int | None = None  # the frame the answer saw
    text: str = ""
    status: str | None = None  # completed | incomplete | cancelled | failed; None: no response.done
    ttft_ms: float | None = None  # the server's
    latency_ms: float | None = None
    truth: str | None = None  # questions.answer(question, objects[frame])

    @property
    def answered(self) -> bool:
        return self.status in ("completed", "incomplete") and self.frame is not None

    @property
    def correct(self) -> bool:
        return self.answered and self.text == self.truth


@dataclass
class AskerResult:
    captions: lt.ClientResult
    asked: list[Asked] = field(default_factory=list)
    skipped: int = 0  # questions not sent: MAX_IN_FLIGHT already in flight


async def run_asker(
    uri: str,
    wc: WorldClip,
    duration: float,
    fps: float,
    token: str | None,
    every: float,
    first_kind: int = 0,
    max_new_tokens: int | None = None,
) -> AskerResult:
    """A loadtest client (the clip at `fps`, live mode, its captions scored as loadtest scores them)
    that also asks a question every `every` seconds."""
    import websockets

    from casa_live.model.world import questions as qa
    from casa_live.server import protocol as p

    out = AskerResult(lt.ClientResult())
    result = out.captions
    sent_at: dict[int, float] = {}
    asked: dict[str, Asked] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(uri, max_size=None, additional_headers=headers) as ws:
        created = json.loads(await ws.recv())
        if created.get("type") != "session.created":
            result.errors.append(created.get("code", "no session"))
            return out
        await ws.send(json.dumps({"type": "session.update", "session": {"fps": fps, "mode": "live"}}))

        async def receive() -> None:
            async for message in ws:
                event = json.loads(message)
                kind, now = event["type"], time.monotonic()
                if kind == "response.output_text.delta":
                    a = asked.get(event["response_id"])
                    if a is not None and a.first is None:
                        a.first = now
                elif kind == "response.done":
                    r = event["response"]
                    a = asked.get(r["id"])
                    if a is None:
                        continue
                    a.done, a.status, a.text, a.frame = now, r["status"], r["text"], r.get("frame")
                    a.ttft_ms, a.latency_ms = r.get("ttft_ms"), r.get("latency_ms")
                    if a.frame is not None and a.frame < len(wc.objects):
                        truth_q = qa.answer(a.question, wc.objects[a.frame])
                        a.truth = truth_q.answer if truth_q else None
                else:  # captions, stats, errors: as loadtest.run_client scores them
                    lt.record_event(result, wc.clip, event, sent_at, now)

        receiver = asyncio.create_task(receive())
        start = time.monotonic()
        period = 1.0 / fps

        async def send_frames() -> None:
            i = 0
            while (t := start + i * period) < start + duration:
                await asyncio.sleep(max(0.0, t - time.monotonic()))
                sent_at[i] = time.monotonic()
                await ws.send(p.pack_image(wc.clip.jpegs[i], round(i * period * 1e6)))
                result.sent += 1
                i += 1

        async def ask() -> None:
            k = 0
            while (t := start + (k + 1) * every) < start + duration - period:
                await asyncio.sleep(max(0.0, t - time.monotonic()))
                if sum(a.status is None for a in asked.values()) >= MAX_IN_FLIGHT:
                    out.skipped += 1
                    k += 1
                    continue
                latest = max(0, result.sent - 1)  # sampled from the latest frame sent
                kind = qa.KINDS[(first_kind + k) % len(qa.KINDS)]
                q = qa.sample(wc.objects[latest], np.random.default_rng([wc.seed, 2, k]), kind)
                rid = f"q{k}"
                request = {"id": rid, "question": q.text}
                if max_new_tokens is not None:
                    request["max_new_tokens"] = max_new_tokens
                asked[rid] = Asked(rid, q.kind, q.text, time.monotonic())
                await ws.send(json.dumps({"type": "response.create", "response": request}))
                k += 1

        await asyncio.gather(send_frames(), ask())
        deadline = time.monotonic() + max(10.0, 2 * every)  # let the last answers finish
        while any(a.status is None for a in asked.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await ws.send(json.dumps({"type": "session.close"}))
        await receiver
    out.asked = list(asked.values())
    return out


async def run_scenario(
    uri: str,
    clients: int,
    askers: int,
    every: float,
    args: argparse.Namespace,
    clips: list[WorldClip],
) -> tuple[list[lt.ClientResult], list[AskerResult]]:
    """`clients` streams, staggered over one frame period as loadtest's; clients 0..askers-1 ask.
    Client k streams clip k mod len(clips)."""
    tasks = []
    for k in range(clients):
        wc = clips[k % len(clips)]
        delay = k * (1.0 / args.fps) / clients
        if k < askers:
            coro = run_asker(uri, wc, args.duration, args.fps, args.token, every, k, args.max_new_tokens)
        else:
            coro = lt.run_client(uri, wc.clip, args.duration, args.fps, args.token)
        tasks.append(asyncio.create_task(lt._delayed(delay, coro)))
    done = await asyncio.gather(*tasks)
    results = [d.captions if isinstance(d, AskerResult) else d for d in done]
    for k, r in enumerate(results):
        r.clip = k % len(clips)
    return results, [d for d in done if isinstance(d, AskerResult)]


# ---------------------------------------------------------------------------------------------- report


def scenario_row(name: str, clients: int, every: float, askers: list[AskerResult], level: dict) -> dict:
    """Latency and the answers of one scenario, beside loadtest's caption figures (level_row)."""
    asked = [a for r in askers for a in r.asked]
    answered = [a for a in asked if a.answered]
    ttft = [a.first - a.sent for a in answered if a.first is not None]
    done = [a.done - a.sent for a in answered if a.done is not None]
    server_ttft = [a.ttft_ms for a in answered if a.ttft_ms is not None]
    server_done = [a.latency_ms for a in answered if a.latency_ms is not None]
    pct = lt.percentile
    return {
        "scenario": name,
        "streams": clients,
        "askers": len(askers),
        "ask_every_s": every,
        "asked": len(asked),
        "answered": len(answered),
        "cancelled": sum(a.status == "cancelled" for a in asked),
        "failed": sum(a.status == "failed" for a in asked),
        "no_response": sum(a.status is None for a in asked),
        "skipped": sum(r.skipped for r in askers),
        "accuracy": sum(a.correct for a in answered) / max(1, len(answered)),
        "ttft_p50_ms": pct(ttft, 50) * 1000,
        "ttft_p95_ms": pct(ttft, 95) * 1000,
        "done_p50_ms": pct(done, 50) * 1000,
        "done_p95_ms": pct(done, 95) * 1000,
        "server_ttft_p50_ms": pct(server_ttft, 50),
        "server_ttft_p95_ms": pct(server_ttft, 95),
        "server_done_p50_ms": pct(server_done, 50),
        "server_done_p95_ms": pct(server_done, 95),
        "cut_pct": level["cut_pct"],
        "exact": level["exact"],
        "reference": level.get("reference", float("nan")),
        "max_lag_ms": level["max_lag_ms"],
        "dropped": level["dropped"],
        "errors": level["errors"],
        "answers": [asdict(a) for a in asked],
    }


def accuracy_table(rows: list[dict]) -> str:
    """Answers per question kind: answered and exact-match accuracy, per scenario and over all."""
    from casa_live.model.world.questions import KINDS

    def cell(answers: list[dict]) -> str:
        got = [a for a in answers if a["status"] in ("completed", "incomplete") and a["frame"] is not None]
        if not got:
            return "0 | -"
        right = sum(a["text"] == a["truth"] for a in got)
        return f"{len(got)} | {right / len(got):.3f}"

    names = [f"{r['scenario']} ({r['streams']} streams, {r['askers']} asking)" for r in rows]
    head = "| question kind | " + " | ".join(f"{n}: answered | accuracy" for n in names)
    head += " | all: answered | accuracy |\n" + "|---" * (1 + 2 * (len(rows) + 1)) + "|"
    lines = []
    for kind in [*KINDS, None]:
        per = [[a for a in r["answers"] if kind is None or a["kind"] == kind] for r in rows]
        cells = [cell(p) for p in per] + [cell([a for p in per for a in p])]
        lines.append(f"| {kind or 'all'} | " + " | ".join(cells) + " |")
    return "\n".join([head, *lines])


def latency_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| scenario | streams | asking (every s) | questions asked | answered | not answered "
        "| TTFT p50 / p95 (ms) | done p50 / p95 (ms) | server ttft_ms p50 / p95 | server latency_ms p50 / p95 "
        "| captions cut short | exact match (N = 1 on these clips) | max lag (ms) | dropped | errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for r in rows:
        missing = [
            f"{r[k]} {k.replace('_', ' ')}" for k in ("cancelled", "failed", "no_response", "skipped") if r[k]
        ]
        lines.append(
            f"| {r['scenario']} | {r['streams']} | {r['askers']} ({r['ask_every_s']:g}) | {r['asked']} "
            f"| {r['answered']} | {', '.join(missing) or '-'} "
            f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | {r['done_p50_ms']:.0f} / {r['done_p95_ms']:.0f} "
            f"| {r['server_ttft_p50_ms']:.0f} / {r['server_ttft_p95_ms']:.0f} "
            f"| {r['server_done_p50_ms']:.0f} / {r['server_done_p95_ms']:.0f} | {r['cut_pct']:.1f}% "
            f"| {r['exact']:.3f} ({r['reference']:.3f}) | {r['max_lag_ms']:.0f} | {r['dropped']} "
            f"| {', '.join(r['errors']) or '-'} |"
        )
    note = (
        f"\n{args.duration:g} s per scenario at {args.fps:g} fps, JPEG frames (0x01), live mode. TTFT and "
        "done are client-side, from response.create sent to the first response.output_text.delta (an "
        "answer with no text has none) and to response.done; the server's ttft_ms / latency_ms count from "
        "the question's arrival to the first answer token / the end. Answers greedy, exact match."
    )
    return "\n".join([head, *lines]) + note


def answers_questions(model_dir: str | None) -> bool | None:
    """Whether a casa-live checkpoint has a question template (None: not our format, so the import
    decides; the server's error says so)."""
    path = Path(model_dir) if model_dir else lt.ROOT / "checkpoints" / "default"
    gen = path / "generation_config.json"
    try:
        d = json.loads(gen.read_text())
    except (OSError, ValueError):
        return None
    if "template" not in d:
        return None
    return d["template"].get("question") is not None


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model-dir", default=None, help="a checkpoint that answers questions (default: the bundled)"
    )
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per scenario")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--scenarios", default="single,load", help="single (a), load (b), or both")
    ap.add_argument("--single-every", type=float, default=2.0, help="(a): seconds between questions")
    ap.add_argument("--clients", type=int, default=32, help="(b): captioning streams")
    ap.add_argument("--askers", type=int, default=8, help="(b): how many of them ask")
    ap.add_argument(
        "--ask-every", type=float, default=3.0, help="(b): seconds between one client's questions"
    )
    ap.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the model's)")
    ap.add_argument(
        "--clips", type=int, default=8, help="distinct world clips (client k streams clip k mod CLIPS)"
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the no-load caption reference")
    ap.add_argument("--server", default=None, help="ws:// URL of a running server (skips starting one)")
    ap.add_argument("--serve-args", default="", help="extra `casa serve` flags, one string")
    ap.add_argument("--token", default=os.environ.get("CASA_TOKEN"))
    ap.add_argument("--json", default=None, help="also write every scenario's figures and answers here")
    ap.add_argument("--out", default=None, help="also write the markdown tables here")
    args = ap.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or set(scenarios) - {"single", "load"}:
        ap.error("--scenarios: single, load, or single,load")
    if not args.server and answers_questions(args.model_dir) is False:
        print(
            f"{args.model_dir or 'checkpoints/default'}: the model answers no questions (its generation "
            "config has no question template); pass --model-dir with one that does (e.g. runs/qa)",
            file=sys.stderr,
        )
        return 2

    frames = int(args.duration * args.fps) + 2
    clips = [world_clip(frames, seed=100 + k) for k in range(max(1, args.clips))]
    reference = [float("nan")] * len(clips)
    if not args.no_reference:
        t0 = time.monotonic()
        reference = lt.offline_reference([c.clip for c in clips], args.model_dir)
        print(f"no-load reference exact match per clip: {[round(x, 3) for x in reference]} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    server = None
    if args.server:
        uri = args.server.rstrip("/") + ("" if args.server.endswith("/v1/stream") else "/v1/stream")
    else:
        streams = args.clients if "load" in scenarios else 1
        server = lt.ServerProcess(args.model_dir, max_sessions=max(1, streams), extra=args.serve_args.split())
        server.wait_ready()
        print(f"server ready in {time.monotonic() - server.started:.1f} s", flush=True)
        uri = server.ws
    plan = {
        "single": ("(a) one stream", 1, 1, args.single_every),
        "load": ("(b) under load", args.clients, min(args.askers, args.clients), args.ask_every),
    }
    rows = []
    try:
        for s in scenarios:
            name, n, askers, every = plan[s]
            cpu0, own0, t0 = (server.cpu_seconds() if server else 0.0), time.process_time(), time.monotonic()
            threads0 = server.thread_cpu() if server else {}
            stages0 = lt.scrape(server.http) if server else {}
            results, asked = asyncio.run(run_scenario(uri, n, askers, every, args, clips))
            level = lt.level_row(n, results, time.monotonic() - t0, own0, cpu0, threads0, stages0, server)
            weights = [r.segments for r in results]
            level["reference"] = sum(reference[r.clip] * w for r, w in zip(results, weights)) / max(
                1, sum(weights)
            )
            rows.append(scenario_row(name, n, every, asked, level))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)
    finally:
        if server:
            server.stop()
    tables = accuracy_table(rows) + "\n\n" + latency_table(rows, args)
    print(tables)
    if args.out:
        Path(args.out).write_text(tables + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
