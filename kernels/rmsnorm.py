"""Fused RMSNorm (+ residual add): one read of x (and the residual), one write of y (and the sum).

    h = x + residual            (if a residual is given; rounded to x.dtype, returned)
    y = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)      (Qwen2/HF RMSNorm, fp32 inside)

Shapes: x, residual (..., N) with a unit last stride; weight (N,). One program per row; the row
fits one block (N <= 16k). Unfused torch runs ~5 kernels and moves ~10 N bytes per element pair
(see docs/kernels.md for the byte count); this moves 3 N (norm) or 5 N (add + norm) elements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from casa_live.kernels.reference import rms_norm_torch as rmsnorm_torch

__all__ = ["rmsnorm_torch", "rmsnorm_triton"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rmsnorm_fwd(
    X,
    R,
    W,
    Y,
    HSUM,
    n_rows,
    n_cols,
    s_x,
    s_r,
    s_y,
    s_h,
    eps,
    HAS_RES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # X, R: (n_rows, n_cols) row strides s_x, s_r; Y, HSUM: outputs, strides s_y, s_h; W: (n_cols,).
    # One program normalises ROWS rows held as one (ROWS, BLOCK) tile.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    h = tl.load(X + rows[:, None] * s_x + cols[None, :], mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * s_r + cols[None, :], mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # the sum torch would store
        tl.store(HSUM + rows[:, None] * s_h + cols[None, :], h, mask=ok)
    hf = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(hf * hf, 1) / n_cols + eps)  # (ROWS,)
    normed = (hf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * s_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def pick_rows(n_rows: int, block: int) -> int:
    """Rows per program: a ~4k-element tile on the GPU (1 row once N >= 4k), ~64k in the interpreter
    (whose cost is per program, not per element)."""
    budget = 65536 if INTERPRET else 4096
    return max(1, min(triton.next_power_of_2(n_rows), budget // block))


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (y, h): y = RMSNorm(h) * weight with h = x + residual (h is None without residual).

    y has weight's dtype promoted with x's (as torch's `weight * normed` does).
    """
    n = x.shape[-1]
    x2 = _rows(x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
    if residual is not None:
        r2 = _rows(residual)
        h = torch.empty_like(x2)
    else:
        r2 = h = x2
    block = triton.next_power_of_2(n)
    rows = pick_rows(x2.shape[0], block)
    _rmsnorm_fwd[(triton.cdiv(x2.shape[0], rows),)](
        x2, r2, weight, y, h, x2.shape[0], n, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), eps,
        HAS_RES=residual is not None, ROWS=rows, BLOCK=block,
        num_warps=min(16, max(1, rows * block // 512)),
    )  # fmt: skip
    return y.view(x.shape), (h.view(x.shape) if residual is not None else None)


def aot_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    out = []
    for n, res, rows in ((2048, True, 2), (3584, False, 1), (64, True, 64)):
        block = triton.next_power_of_2(n)
        cex = {"HAS_RES": res, "ROWS": rows, "BLOCK": block}
        sig = {"X": "*bf16", "R": "*bf16", "W": "*bf16", "Y": "*bf16", "HSUM": "*bf16", "n_rows": "i32"}
        sig |= {"n_cols": "i32", "s_x": "i32", "s_r": "i32", "s_y": "i32", "s_h": "i32", "eps": "fp32"}
        sig |= {k: "constexpr" for k in cex}
        warps = min(16, max(1, rows * block // 512))
        out.append((f"rmsnorm_n{n}_rows{rows}{'_res' if res else ''}", _rmsnorm_fwd, sig, cex, warps))
    return out
