"""One-command GPU check: everything a lent GPU should measure, in under 8 minutes, in one file.

    python -m benchmarks.gpu_check                   # on the GPU machine; writes gpu_check.md
    python -m benchmarks.gpu_check --out card.md --budget 470
    python -m benchmarks.gpu_check --smoke           # every section on CPU, tiny shapes, < 1 min

Sections, in order, each a child process with its own time box (a section that fails or runs
out of time is reported as such, and the next one still runs; the boxes add up to `--budget`
seconds, 470 by default, so the whole check cannot pass 8 minutes):
1. versions: python, torch, triton, CUDA and the card's name (the machine's own installs: nothing
   is installed or upgraded);
2. kernels: the kernel tests with TRITON_INTERPRET=0, i.e. the compiled Triton kernels on CUDA
   against their torch references (tests/test_kernels_*.py);
3. bench_kernels: Triton vs SDPA / FlexAttention (benchmarks/bench_kernels.py --quick);
4. streaming: random weights of the qwen2.5-vl-3b shape (bf16), one stream, frames of 448^2 and
   896^2 (256 and 1024 image tokens), 16 forced caption tokens a frame: time to first token,
   decode tokens/s and peak memory at frames 1, 16, 64, 256 and 512 (the stream is fast-forwarded
   to each as benchmarks/bench_streaming.py does: cost depends on cache lengths, not values; then
   3 real frames are timed), CASA vs token insertion (unbounded, so its cost grows), eager vs
   compiled (the engine's `compile` switch: torch.compile "reduce-overhead", i.e. CUDA graphs).
   Each run has its own share of the box and stops at it; the table shows the frames it reached;
5. capacity: benchmarks/loadtest.py with the bundled model served on the GPU (the same protocol
   as the CPU capacity figure: live 2-fps JPEG clients, full-quality criteria), short levels.

The output is one markdown file, headed by the card's name, to paste into benchmarks/RESULTS.md.
`--smoke` runs the same sections on the CPU with tiny shapes (test-tiny model, the Triton
interpreter, one kernel test, bench_kernels --dry-run, 1-client load level) to check the script;
tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    name: str
    status: str  # "ok" | "failed (rc N)" | "timed out after N s" | "skipped: ..."
    seconds: float
    output: str
    records: list[dict] = field(default_factory=list)  # JSON lines the section printed


def run_section(name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Outcome:
    """Run one section in its own process group; kill the whole group at the timeout."""
    if timeout < 5:
        return Outcome(name, "skipped: the overall budget is spent", 0.0, "")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    records = []
    for line in out.splitlines():
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return Outcome(name, status, time.monotonic() - t0, out, records)


# ---- section 1: versions (child) -----------------------------------------------------------------


def versions() -> int:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.machine()})",
        "cpus": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps({"versions": info}), flush=True)
    return 0


# ---- section 4: streaming (child) ----------------------------------------------------------------


@dataclass
class StreamSpec:
    side: int  # frame side in pixels: (side / 28)^2 image tokens for the 3B shape
    fusion: str  # "casa" | "insertion"
    compiled: bool
    budget: float  # seconds this run may take, model build included


def stream_runs(smoke: bool, budget: float) -> int:
    """Child: every streaming run in one process (the model is built once per fusion); one JSON
    line per run, printed as soon as it ends, so a later run that overruns loses only itself."""
    import torch

    from benchmarks.bench_streaming import fast_forward
    from casa_live.model.checkpoint.toy import toy_generation_config, word_tokenizer
    from casa_live.model.config import preset
    from casa_live.model.engine.engine import Engine, SessionSettings
    from casa_live.model.vlm import CASAModel

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    name, sides = ("test-tiny", (24, 48)) if smoke else ("qwen2.5-vl-3b", (448, 896))
    tokens, repeat = (4, 1) if smoke else (16, 3)
    checkpoints = [1, 4] if smoke else [1, 16, 64, 256, 512]
    frames = checkpoints[-1]
    # eager runs first: a compile that overruns its share then costs only the compiled figures
    specs = [StreamSpec(s, f, False, 0.0) for s in sides for f in ("casa", "insertion")]
    # (smoke: the compiled path at the small size only; dynamo's tracing is most of a CPU run)
    specs += [StreamSpec(s, f, True, 0.0) for s in sides[:1] for f in ("casa", "insertion")]
    if not smoke:
        specs += [StreamSpec(sides[1], f, True, 0.0) for f in ("casa", "insertion")]
    weights = {(False, "casa"): 1.0, (False, "insertion"): 1.0, (True, "casa"): 1.5, (True, "insertion"): 1.5}
    total = sum(weights[(s.compiled, s.fusion)] for s in specs)
    deadline = time.monotonic() + budget
    for s in specs:
        s.budget = budget * weights[(s.compiled, s.fusion)] / total
    models: dict[str, CASAModel] = {}
    tok = None
    for spec in specs:
        t_run = time.monotonic()
        stop_at = min(deadline, t_run + spec.budget)
        rec: dict = {
            "side": spec.side,
            "fusion": spec.fusion,
            "mode": "compiled" if spec.compiled else "eager",
        }
        try:
            if spec.fusion not in models:
                cfg = preset(name)
                cfg.casa.fusion = spec.fusion
                with torch.device(device):
                    models[spec.fusion] = CASAModel.random(cfg, seed=0)
            model = models[spec.fusion]
            model.config.image_size = spec.side
            tok = tok or word_tokenizer(model.config.lm.vocab)
            gen = toy_generation_config()
            n_img = model.config.image_tokens
            per_frame = tokens + 3 + (n_img if spec.fusion == "insertion" else 0)
            context = 2048 if spec.fusion == "casa" else 256 + (frames + 2) * per_frame
            if device == "cuda":
                torch.cuda.empty_cache()
            engine = Engine(
                model,
                tok,
                gen,
                max_sessions=1,
                max_context_tokens=context,
                device=device,
                dtype=dtype,
                compile=spec.compiled and not smoke,
                branch_rows=0,  # no questions here: only the session's row is warmed up and stepped
            )
            if spec.compiled:
                torch._dynamo.reset()  # one engine's compiled step per process, as when serving
            if spec.compiled and smoke:  # dynamo's tracing without inductor's C++ build (CPU, seconds)
                from casa_live.model.decode import decode_step

                engine.runner._decode = torch.compile(decode_step, backend="eager", dynamic=True)
                engine.runner.fused = False
            t0 = time.monotonic()
            engine.warmup()
            rec["warmup_s"] = round(time.monotonic() - t0, 2)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            row = engine.open(None, SessionSettings(max_new_tokens=tokens, min_new_tokens=tokens))
            image = torch.randint(0, 256, (spec.side, spec.side, 3), dtype=torch.uint8).numpy()
            prompt_len = len(engine.prompt_ids(None))
            per_frame = tokens + 3 + (n_img if spec.fusion == "insertion" else 0)
            ttft, rate, peak = {}, {}, {}
            done = 0
            for f in checkpoints:  # fast-forwarded to frame f (as bench_streaming), `repeat` real frames
                if f > 1 and time.monotonic() > stop_at:  # frame 1 always runs: every run says something
                    break
                if f > 1:
                    fast_forward(engine, row, f, prompt_len, per_frame, tokens)
                firsts, rates = [], []
                for _ in range(repeat if f > 1 else repeat + 1):  # frame 0 also feeds the prompt
                    t0 = time.perf_counter()
                    stamps = [
                        time.perf_counter() for ev in engine.caption(row, image) if ev.token is not None
                    ]
                    while engine.has_work():
                        engine.step()
                    firsts.append(stamps[0] - t0)
                    if len(stamps) > 1:
                        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                firsts = firsts[1:] if f == 1 else firsts
                ttft[f], rate[f] = round(1e3 * _median(firsts), 2), round(_median(rates), 1)
                if device == "cuda":
                    peak[f] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                done = f
            rec.update(
                frames=done,
                image_tokens=n_img,
                ttft_ms=ttft,
                decode_tok_s=rate,
                peak_gib=peak,
                kv_tokens=engine.kv_tokens(row),
                seconds=round(time.monotonic() - t_run, 1),
            )
            engine.shutdown()
            del engine
        except Exception as exc:  # reported in the table; the next run goes on
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(json.dumps({"stream": rec}), flush=True)
    return 0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def stream_table(records: list[dict]) -> str:
    """One row per run and checkpoint frame: TTFT, decode rate and peak memory at that frame."""
    rows = [r["stream"] for r in records if "stream" in r]
    if not rows:
        return ""
    lines = [
        "| frame size | fusion | decode step | frame | TTFT ms | decode tok/s | peak GiB | warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['side']}² ({r.get('image_tokens', '?')} tok) | {r['fusion']} | {r['mode']}"
        if "error" in r:
            lines.append(f"{head} | error: {r['error']} | | | | |")
            continue
        if not r["ttft_ms"]:
            lines.append(f"{head} | none reached in its time box | | | | {r['warmup_s']} |")
        for f, ms in r["ttft_ms"].items():
            peak = r["peak_gib"].get(f, "- (CPU)")
            lines.append(f"{head} | {f} | {ms} | {r['decode_tok_s'][f]} | {peak} | {r['warmup_s']} |")
    return "\n".join(lines)


# ---- the parent ----------------------------------------------------------------------------------


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every section on CPU with tiny shapes (< 1 min)")
    ap.add_argument("--out", default="gpu_check.md", help="the markdown report (default gpu_check.md)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all sections (470; smoke 90)")
    ap.add_argument("--section", choices=["versions", "stream"], help=argparse.SUPPRESS)  # children
    ap.add_argument("--section-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section == "versions":
        return versions()
    if args.section == "stream":
        return stream_runs(args.smoke, args.section_budget)

    budget = args.budget or (90.0 if args.smoke else 470.0)
    # shares of the budget per section (versions, kernels, bench_kernels, streaming, capacity)
    shares = {"versions": 0.04, "kernels": 0.2, "bench_kernels": 0.17, "streaming": 0.39, "capacity": 0.2}
    if args.smoke:  # the CPU spends its time in process start-ups and the load test's server
        shares = {"versions": 0.06, "kernels": 0.12, "bench_kernels": 0.1, "streaming": 0.4, "capacity": 0.32}
    start = time.monotonic()
    deadline = start + budget
    py = sys.executable
    smoke = ["--smoke"] if args.smoke else []
    interp = {"TRITON_INTERPRET": "1" if args.smoke else "0"}
    outcomes: list[Outcome] = []

    def box(name: str) -> float:
        return min(shares[name] * budget, deadline - time.monotonic())

    outcomes.append(
        run_section("versions", [py, "-m", "benchmarks.gpu_check", "--section", "versions"], box("versions"))
    )
    info = next((r["versions"] for r in outcomes[0].records if "versions" in r), {})
    print(f"versions: {json.dumps(info)}", flush=True)

    kernel_tests = [
        "tests/test_kernels_attention.py",
        "tests/test_kernels_fused.py",
        "tests/test_kernels_model.py",
    ]
    if args.smoke:  # one interpreter test: the section's plumbing, not the kernels
        kernel_tests = ["tests/test_kernels_fused.py", "-k", "rope_matches_model_formula"]
    else:
        kernel_tests.append("tests/test_kernels_aot.py")
    outcomes.append(
        run_section(
            "kernels",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kernel_tests],
            box("kernels"),
            interp,
        )
    )
    print(f"kernels: {outcomes[-1].status}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        bench = [py, "-m", "benchmarks.bench_kernels", "--dry-run" if args.smoke else "--quick"]
        outcomes.append(run_section("bench_kernels", bench, box("bench_kernels"), interp))
        print(f"bench_kernels: {outcomes[-1].status}", flush=True)

        stream_box = box("streaming")
        child = [
            py,
            "-m",
            "benchmarks.gpu_check",
            "--section",
            "stream",
            "--section-budget",
            f"{stream_box - 5:.0f}",
        ]
        outcomes.append(run_section("streaming", child + smoke, stream_box))
        print(f"streaming: {outcomes[-1].status}", flush=True)

        load = [py, "-m", "benchmarks.loadtest", "--out", str(Path(tmp) / "load.md")]
        if args.smoke:
            from casa_live.model.checkpoint.toy import toy_checkpoint

            toy = toy_checkpoint(Path(tmp) / "toy")
            load += ["--clients", "1", "--duration", "2", "--clips", "1", "--model-dir", str(toy)]
        else:
            load += [
                "--clients",
                "1,64,128",
                "--duration",
                "10",
                "--clips",
                "4",
                "--serve-args=--device cuda",
            ]
        outcomes.append(run_section("capacity", load, box("capacity")))
        print(f"capacity: {outcomes[-1].status}", flush=True)
        load_md = Path(tmp) / "load.md"
        load_tables = load_md.read_text() if load_md.exists() else ""

    report = format_report(info, outcomes, load_tables, args.smoke, budget, time.monotonic() - start)
    Path(args.out).write_text(report)
    print(f"wrote {args.out} ({time.monotonic() - start:.0f} s)")
    return 0


def format_report(
    info: dict, outcomes: list[Outcome], load_tables: str, smoke: bool, budget: float, seconds: float
) -> str:
    card = info.get("device", "unknown device")
    title = f"## GPU check: {card}" + (" (smoke run on CPU: tiny shapes, not a measurement)" if smoke else "")
    out = [
        title,
        "",
        f"`python -m benchmarks.gpu_check{' --smoke' if smoke else ''}`, {time.strftime('%Y-%m-%d')}: "
        f"{seconds:.0f} s of a {budget:.0f} s budget. python {info.get('python')}, torch {info.get('torch')}, "
        f"triton {info.get('triton')}, CUDA {info.get('cuda')}, {info.get('cpus')} CPUs.",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
        *[f"| {o.name} | {o.status} | {o.seconds:.0f} |" for o in outcomes],
    ]
    by = {o.name: o for o in outcomes}
    if "kernels" in by:
        mode = "TRITON_INTERPRET=1, one test (smoke)" if smoke else "TRITON_INTERPRET=0: compiled, on the GPU"
        out += ["", f"### Kernel tests ({mode})", "", "```", _tail(by["kernels"].output, 15), "```"]
    if "bench_kernels" in by:
        out += ["", "### bench_kernels", "", _tail(by["bench_kernels"].output, 60)]
    if "streaming" in by:
        table = stream_table(by["streaming"].records)
        out += [
            "",
            "### Streaming, random weights, one stream",
            "",
            table or "```\n" + _tail(by["streaming"].output) + "\n```",
        ]
    if "capacity" in by:
        body = load_tables.strip() or "```\n" + _tail(by["capacity"].output) + "\n```"
        out += ["", "### Capacity (bundled model, loadtest protocol)", "", body]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
