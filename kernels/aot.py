"""Ahead-of-time compile of every kernel for an NVIDIA target, on a machine with no GPU.

The interpreter accepts programs the GPU compiler rejects (dots with K < 16, layouts that do not
lower), so tests also compile each production config to a cubin: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`, then read registers / spills / shared memory from the cubin with
the `cuobjdump` bundled in the triton wheel, and count tensor-core instructions in the SASS.

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled), so tests call it in
a subprocess:  python -m kernels.aot [--arch 90] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class AotResult:
    name: str
    ok: bool
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread (ptxas spills + stack)
    shared_bytes: int = 0
    num_warps: int = 0
    mma: str = ""  # tensor-core instruction kind seen in SASS: HGMMA (wgmma), HMMA, or none
    error: str = ""


def _configs(full: bool = False) -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(name, kernel, signature, constexprs, num_warps) for every production config."""
    import triton.language as tl

    from casa_live.kernels import casa_attention as ca
    from casa_live.kernels import rmsnorm, rope

    out = []
    ptr_names = ["Q", "KP", "VP", "KS", "VS", "OUT", "OPART", "LSE"]
    int_names = ["T", "S", "H", "HKV"] + [
        f"s_{p}{a}" for p in ("q", "kp", "vp", "ks", "vs") for a in ("b", "h", "t")
    ]
    shapes = [(1, "decode", 1, 1), (8, "decode", 1, 1), (8, "decode_split", 1, 8), (1, "prefill", 64, 1)]
    shapes += [(8, "prefill", 64, 1), (2, "prefill", 16, 1)]
    for dt in ("bf16", "fp16") if full else ("bf16",):
        for d in (64, 128):
            for group, name, t_rows, splits in shapes:
                if True:
                    cfg = ca.pick_config(t_rows, group, d)
                    cfg["BLOCK_N"] = 64
                    sig = {n: f"*{dt}" for n in ptr_names[:6]}
                    sig.update({"OPART": "*fp32", "LSE": "*fp32"})
                    sig.update({"prefix_len_ptr": "*i64", "q_start_ptr": "*i64"})
                    sig.update({"cu_q": "*i32", "cu_p": "*i32", "cu_s": "*i32"})
                    sig.update({n: "i32" for n in int_names})
                    sig["qk_scale"] = "fp32"
                    g_pad = 1 << (group - 1).bit_length()
                    cex = {
                        "HEAD_D": d, "G": group, "G_PAD": g_pad, "BLOCK_Q": cfg["BLOCK_Q"],
                        "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": d, "HAS_PREFIX": True, "HAS_SEG": True,
                        "VARLEN": False, "NUM_SPLITS": splits,
                        "CDT": {"bf16": tl.bfloat16, "fp16": tl.float16}[dt], "DOT_PREC": "tf32",
                    }  # fmt: skip
                    for k in cex:
                        sig[k] = "constexpr"
                    tag = f"attn_{name}_{dt}_d{d}_g{group}_m{cfg['BLOCK_Q'] * g_pad}"
                    out.append((tag, ca._prefix_causal_fwd, sig, cex, cfg["num_warps"]))
    # the tiny test model's head_dim 16 (padded BLOCK_D 16: the smallest legal K), fp32 ieee dots
    sig16 = dict(out[0][2])
    sig16.update({n: "*fp32" for n in ptr_names[:6]})
    cex16 = dict(out[0][3], HEAD_D=16, BLOCK_D=16, G=2, G_PAD=2, BLOCK_Q=8, CDT=tl.float32, DOT_PREC="ieee")
    out.append(("attn_decode_fp32_d16_g2_m16", ca._prefix_causal_fwd, sig16, cex16, 4))
    sig_v = dict(out[0][2])
    cex_v = dict(out[-1][3], VARLEN=True)
    out.append(
        ("attn_varlen_fp32_d16", ca._prefix_causal_fwd, sig_v | {n: "*fp32" for n in ptr_names[:6]}, cex_v, 4)
    )
    for d in (64, 128):
        cex = {"HEAD_D": d, "NUM_SPLITS": 8, "SPLITS_PAD": 8, "BLOCK_D": d}
        sig = {"OPART": "*fp32", "LSE": "*fp32", "OUT": "*bf16"} | {k: "constexpr" for k in cex}
        out.append((f"merge_splits_d{d}", ca._merge_splits, sig, cex, 2))
    for name, kernel, sig, cex, warps in rmsnorm.aot_configs() + rope.aot_configs():
        out.append((name, kernel, sig, cex, warps))
    return out


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(name: str, kernel, signature, constexprs, num_warps: int, arch: int) -> AotResult:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as tcompile

    try:
        # What the JIT specialises at run time for real shapes: 16-byte aligned pointers and strides
        # that are multiples of 16 (so loads vectorise). Lengths and counts get no hint.
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(kernel.arg_names)
            if n in signature and (signature[n].startswith("*") or n.startswith("s_"))
        }
        src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        ck = tcompile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as e:  # report the compiler's message, keep compiling the others
        msg = str(e).strip().splitlines()
        return AotResult(name, False, num_warps=num_warps, error=(msg[-1] if msg else type(e).__name__)[:300])
    res = AotResult(name, True, num_warps=num_warps, shared_bytes=int(ck.metadata.shared))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=False
        ).stdout
    m = re.search(r"REG:(\d+)", usage)
    res.registers = int(m.group(1)) if m else -1
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    res.spill_bytes = (int(local.group(1)) if local else 0) + (int(stack.group(1)) if stack else 0)
    res.mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
    return res


def compile_all(arch: int = 90, full: bool = False) -> list[AotResult]:
    return [compile_one(n, k, s, c, w, arch) for n, k, s, c, w in _configs(full)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--full", action="store_true", help="also fp16 (same code paths as bf16)")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernels.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    results = compile_all(args.arch, args.full)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(f"{'kernel':44} {'ok':3} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} mma")
        for r in results:
            print(
                f"{r.name:44} {'y' if r.ok else 'n':3} {r.num_warps:5} {r.registers:5} {r.spill_bytes:6} "
                f"{r.shared_bytes:7} {r.mma or r.error}"
            )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
