"""Kernel benchmark (not a test): Triton kernels vs torch SDPA / FlexAttention on one CUDA GPU.

    python -m benchmarks.bench_kernels [--quick] [--markdown out.md]

Workloads (Qwen2.5-VL-3B attention shape: 16 query heads, 2 KV heads, head_dim 128, bf16):
- CASA window prefill: 256 image tokens (all visible) + a causal window of T = 16..64 text tokens,
  batch 1..64. Baselines: SDPA with an explicit bool mask over pre-concatenated K/V (what the torch
  path runs), and FlexAttention (torch.compile) with the same block mask.
- Text decode: one query per session against a text cache of 1k..64k tokens, batch 1..64, split-K.
  Baselines: SDPA (no mask needed) and FlexAttention decode.
- CASA decode: one query against 256 image + 32 window tokens.
- Fused RMSNorm(+residual) and RoPE(q, k) against their eager torch references.

Reported: median time (triton.testing.do_bench), achieved TFLOP/s and GB/s, and time over the
roofline floor max(flops / peak, bytes / bandwidth) for the card (H100 SXM: 989 TFLOP/s bf16
dense, 3.35 TB/s). Bytes = every input read once + the output written once.

On a machine without CUDA it says so and exits 0. `--dry-run` runs every code path on tiny
shapes on the CPU (interpreter) with a wall-clock timer, to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial

PEAKS = {  # name fragment -> (dense bf16 FLOP/s, HBM B/s)
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


def card_peaks(name: str) -> tuple[float, float] | None:
    for frag, peaks in PEAKS.items():
        if frag in name:
            return peaks
    return None


class Bench:
    def __init__(self, dry: bool) -> None:
        import torch

        self.torch = torch
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.name = "CPU (interpreter dry run)" if dry else torch.cuda.get_device_name()
        self.peaks = None if dry else card_peaks(self.name)
        self.rows: list[dict] = []

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.dry:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def add(
        self, group: str, case: str, impl: str, fn: Callable[[], object], flops: float, nbytes: float
    ) -> None:
        try:
            ms = self.time_ms(fn)
        except Exception as e:  # a baseline that cannot run this shape: say why, keep going
            self.rows.append(
                {"group": group, "case": case, "impl": impl, "error": f"{type(e).__name__}: {e}"[:80]}
            )
            return
        row = {"group": group, "case": case, "impl": impl, "ms": ms}
        row["tflops"] = flops / ms / 1e9
        row["gbs"] = nbytes / ms / 1e6
        if self.peaks:
            floor_ms = max(flops / self.peaks[0], nbytes / self.peaks[1]) * 1e3
            row["x_floor"] = ms / floor_ms
        self.rows.append(row)

    def table(self) -> str:
        out = [
            f"Card: {self.name}; torch {self.torch.__version__}; triton {triton_version()}",
            "",
            "| workload | shape | impl | median ms | TFLOP/s | GB/s | x roofline floor |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            if "error" in r:
                out.append(f"| {r['group']} | {r['case']} | {r['impl']} | n/a ({r['error']}) | | | |")
                continue
            floor = f"{r['x_floor']:.2f}" if "x_floor" in r else "n/a"
            out.append(
                f"| {r['group']} | {r['case']} | {r['impl']} | {r['ms']:.4f} | {r['tflops']:.1f} | "
                f"{r['gbs']:.0f} | {floor} |"
            )
        return "\n".join(out)


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "n/a"


def flex_or_none():
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return torch.compile(flex_attention, dynamic=False), create_block_mask
    except Exception:
        return None, None


def bench_prefill(b: Bench, batches: list[int], texts: list[int], H: int, Hkv: int, D: int, P: int) -> None:
    torch = b.torch
    import torch.nn.functional as F

    from casa_live.kernels import casa_attention as ca
    from casa_live.kernels.dispatch import attention_mask

    flex, block_mask_fn = (None, None) if b.dry else flex_or_none()
    for B in batches:
        for T in texts:
            dev, dt = b.device, b.dtype
            q = torch.randn(B, H, T, D, device=dev, dtype=dt)
            pk, pv = torch.randn(2, B, Hkv, P, D, device=dev, dtype=dt)
            sk, sv = torch.randn(2, B, Hkv, T, D, device=dev, dtype=dt)
            plen = torch.full((B,), P, device=dev, dtype=torch.long)
            qs = torch.zeros(B, device=dev, dtype=torch.long)
            scale = D**-0.5
            n_keys = sum(P + i + 1 for i in range(T))  # visible keys summed over queries
            flops = 4.0 * B * H * D * n_keys
            nbytes = (2 * B * H * T * D + 2 * B * Hkv * (P + T) * D) * q.element_size()
            case = f"B={B} img={P} txt={T}"
            b.add(
                "CASA prefill",
                case,
                "triton",
                partial(ca.prefix_causal_attention_triton, q, pk, pv, plen, sk, sv, qs, scale),
                flops,
                nbytes,
            )
            k, v = torch.cat([pk, sk], 2), torch.cat([pv, sv], 2)
            mask, _ = attention_mask(plen, P, qs, T, T)
            b.add(
                "CASA prefill",
                case,
                "SDPA + bool mask",
                partial(
                    F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
                ),
                flops,
                nbytes,
            )
            if flex is not None:

                def casa_mask(bb, hh, qi, kv):
                    return (kv < P) | (kv - P <= qi)

                bm = block_mask_fn(casa_mask, None, None, T, P + T, device=dev)
                b.add(
                    "CASA prefill",
                    case,
                    "FlexAttention",
                    partial(flex, q, k, v, block_mask=bm, scale=scale, enable_gqa=True),
                    flops,
                    nbytes,
                )


def bench_decode(
    b: Bench, batches: list[int], lengths: list[int], H: int, Hkv: int, D: int, prefix: int
) -> None:
    torch = b.torch
    import torch.nn.functional as F

    from casa_live.kernels import casa_attention as ca

    flex, _ = (None, None) if b.dry else flex_or_none()
    group = "CASA decode" if prefix else "text decode"
    for B in batches:
        for L in lengths:
            dev, dt = b.device, b.dtype
            q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
            sk, sv = torch.randn(2, B, Hkv, L, D, device=dev, dtype=dt)
            qs = torch.full((B,), L - 1, device=dev, dtype=torch.long)
            pk = pv = plen = None
            if prefix:
                pk, pv = torch.randn(2, B, Hkv, prefix, D, device=dev, dtype=dt)
                plen = torch.full((B,), prefix, device=dev, dtype=torch.long)
            scale = D**-0.5
            n_keys = L + prefix
            flops = 4.0 * B * H * D * n_keys
            nbytes = (2 * B * H * D + 2 * B * Hkv * n_keys * D) * q.element_size()
            case = f"B={B} cache={L}" + (f" img={prefix}" if prefix else "")
            b.add(
                group,
                case,
                "triton",
                partial(ca.prefix_causal_attention_triton, q, pk, pv, plen, sk, sv, qs, scale),
                flops,
                nbytes,
            )
            k, v = (torch.cat([pk, sk], 2), torch.cat([pv, sv], 2)) if prefix else (sk, sv)
            b.add(
                group,
                case,
                "SDPA",
                partial(F.scaled_dot_product_attention, q, k, v, scale=scale, enable_gqa=True),
                flops,
                nbytes,
            )
            if flex is not None:
                b.add(
                    group,
                    case,
                    "FlexAttention",
                    partial(flex, q, k, v, scale=scale, enable_gqa=True),
                    flops,
                    nbytes,
                )


def bench_fused(b: Bench, rows_list: list[int], hidden: int, H: int, Hkv: int, D: int) -> None:
    torch = b.torch
    from casa_live.kernels import dispatch, rmsnorm, rope

    for n in rows_list:
        dev, dt = b.device, b.dtype
        x, r = torch.randn(2, n, hidden, device=dev, dtype=dt)
        w = torch.randn(hidden, device=dev, dtype=dt)
        eb = x.element_size()
        nbytes = 5 * n * hidden * eb  # read x, r; write y, h (+ weight, negligible)
        b.add(
            "add+RMSNorm",
            f"rows={n} N={hidden}",
            "triton",
            partial(rmsnorm.rmsnorm_triton, x, w, 1e-6, r),
            4.0 * n * hidden,
            nbytes,
        )
        b.add(
            "add+RMSNorm",
            f"rows={n} N={hidden}",
            "torch eager",
            partial(dispatch.rms_norm_torch, x, w, 1e-6, r),
            4.0 * n * hidden,
            nbytes,
        )
        T = n
        q = torch.randn(1, T, H, D, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(1, T, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
        cos, sin = torch.randn(2, 1, T, D, device=dev)
        nbytes = 2 * T * (H + Hkv) * D * eb + 2 * T * D * 4
        b.add(
            "RoPE q+k",
            f"tokens={T} heads={H}/{Hkv}",
            "triton",
            partial(rope.apply_rope_triton, q, k, cos, sin),
            3.0 * T * (H + Hkv) * D,
            nbytes,
        )
        b.add(
            "RoPE q+k",
            f"tokens={T} heads={H}/{Hkv}",
            "torch eager",
            partial(dispatch.apply_rope_torch, q, k, cos, sin),
            3.0 * T * (H + Hkv) * D,
            nbytes,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the interpreter")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_kernels: needs a CUDA GPU (none here); nothing measured. `--dry-run` checks the script on CPU."
        )
        return 0
    b = Bench(args.dry_run)
    if args.dry_run:
        bench_prefill(b, [2], [3], 4, 2, 16, 7)
        bench_decode(b, [2], [40], 4, 2, 16, 0)
        bench_decode(b, [1], [5], 4, 2, 16, 9)
        bench_fused(b, [5], 64, 4, 2, 16)
    else:
        H, Hkv, D = 16, 2, 128
        batches = [1, 8, 64] if not args.quick else [1, 64]
        bench_prefill(b, batches, [16, 64], H, Hkv, D, 256)
        bench_decode(b, batches, [1024, 8192, 65536] if not args.quick else [8192], H, Hkv, D, 0)
        bench_decode(b, batches, [32], H, Hkv, D, 256)
        bench_fused(b, [64, 4096], 2048, H, Hkv, D)
    text = b.table()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
