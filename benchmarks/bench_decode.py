"""The decode step three ways, side by side in one process: generic eager, hand-fused eager, compiled.

One decode step feeds one token to each of B rows whose text caches hold L tokens (the bundled
model by default, 1 torch thread). Printed per (B, L): median ms per step of
- `decode_step` (model/decode.py), the generic step, eager;
- `fused_decode_step`, the hand-fused CPU step, eager, its attention in torch (batched products
  over the rows padded to the longest);
- the same under TorchScript (`ScriptedStep`), with torch attention and with the C attention
  (kernels/cpu_attention.c, one op a layer over each row's own slots);
- the C step: every layer in one C call (what `casa serve` runs on a CPU with AVX2, up to
  model/decode.py `C_STEP_ROWS` rows); the rows' lengths spread over [L - 64, L];
- `torch.compile(decode_step)` (inductor, dynamic shapes), with its compile time;
- the vision tower per frame at the same batch sizes, eager.

    python -m benchmarks.bench_decode                          # bundled model; B 1 4 16 32; L 128 1000
    python -m benchmarks.bench_decode --no-compile --batch 1 8 # eager paths only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _time(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main(argv: list[str] | None = None) -> int:
    from casa_live.kernels.dispatch import ragged_cpu_available
    from casa_live.model import decode
    from casa_live.model.decode import DecodeInputs, ScriptedStep, commit, decode_step, fused_decode_step
    from casa_live.model.engine.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="checkpoints/default")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1000])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.from_checkpoint(args.model_dir, max_sessions=max(args.batch))
    lm, state = engine.model.lm, engine.state
    compiled = None if args.no_compile else torch.compile(decode_step, dynamic=True)
    scripted = ScriptedStep()
    compile_s = 0.0
    rows = []
    with torch.no_grad():
        for L in args.lengths:
            for B in args.batch:
                # ragged rows, as a live server has them: lengths spread over [L - 64, L]
                lengths = torch.linspace(max(1, L - 64), L, B).long()
                state.text.length[:B] = lengths
                state.casa.win_len[:B] = 8
                state.casa.n_img[:B] = state.casa.image_tokens

                def full(v: int, B: int = B) -> torch.Tensor:
                    return torch.full((B,), v, dtype=torch.long)

                inp = DecodeInputs(full(7), lengths, lengths, full(8), full(state.casa.image_tokens))
                S, Wb = L + 1, 16

                def generic(step=decode_step, inp=inp, S=S, Wb=Wb) -> None:  # type: ignore[no-untyped-def]
                    _, new = step(lm, state, inp, S, Wb)
                    commit(state, inp, new)

                row = {
                    "B": B,
                    "L": L,
                    "generic": _time(generic, args.repeat),
                    "fused": _time(
                        lambda inp=inp, S=S, Wb=Wb: fused_decode_step(lm, state, inp, S, Wb, ragged=False),
                        args.repeat,
                    ),
                    "scripted": _time(
                        lambda inp=inp, S=S, Wb=Wb: scripted(lm, state, inp, S, Wb, False), args.repeat
                    ),
                }
                if ragged_cpu_available():
                    rows_c, decode.C_STEP_ROWS = decode.C_STEP_ROWS, 0  # the C attention alone
                    row["scripted_c"] = _time(
                        lambda inp=inp, S=S, Wb=Wb: scripted(lm, state, inp, S, Wb, True), args.repeat
                    )
                    decode.C_STEP_ROWS = 1 << 30  # the C step, whatever the batch
                    row["c_step"] = _time(
                        lambda inp=inp, S=S, Wb=Wb: scripted(lm, state, inp, S, Wb, True), args.repeat
                    )
                    decode.C_STEP_ROWS = rows_c
                if compiled is not None:
                    t0 = time.perf_counter()
                    generic(compiled)
                    compile_s += time.perf_counter() - t0
                    row["compiled"] = _time(lambda: generic(compiled), args.repeat)
                rows.append(row)
                print(row, flush=True)
        vision = {}
        for B in args.batch:
            x = torch.randn(B, *engine.processor(torch.zeros(64, 64, 3, dtype=torch.uint8)).shape)
            vision[B] = _time(lambda x=x: engine.model.encode_images(x), max(5, args.repeat // 3)) / B
    head = (
        "| B | L | generic eager (ms) | hand-fused eager (ms) | TorchScript, torch attention (ms) "
        "| TorchScript, C attention (ms) | C step (ms) | compiled (ms) | C step / TorchScript | vision ms/frame |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r['compiled']:.2f}" if "compiled" in r else "-"
        sc = f"{r['scripted_c']:.2f}" if "scripted_c" in r else "- (no kernel)"
        cs = f"{r['c_step']:.2f}" if "c_step" in r else "-"
        ratio = f"{r['c_step'] / r['scripted']:.2f}x" if "c_step" in r else "-"
        lines.append(
            f"| {r['B']} | {r['L']} | {r['generic']:.2f} | {r['fused']:.2f} | {r['scripted']:.2f} | {sc} "
            f"| {cs} | {c} | {ratio} | {vision[r['B']]:.2f} |"
        )
    print("\n".join(lines))
    if compiled is not None:
        print(f"\ncompile time (first call of each new shape, summed): {compile_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
