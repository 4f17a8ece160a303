"""Fused RMSNorm (+ residual add): one read of x (and the residual), one write of y (and the sum).

    h = x + residual            (if a residual is given; rounded to x.dtype, returned)
    y = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)      (Qwen2/HF RMSNorm, fp32 inside)

Shapes: x, residual (..., N) with a unit last stride; weight (N,). One program per row; the row
fits one block (N <= 16k). Unfused torch runs ~5 kernels and moves ~10 N bytes per element pair
(see docs/kernels.md for the byte count); this moves 3 N (norm) or 5 N (add + norm) elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rmsnorm_torch", "rmsnorm_triton"]


@triton.jit
def _rmsnorm_fwd(
    X,
    R,
    W,
    Y,
    HSUM,
    n_cols,
    s_x,
    s_r,
    s_y,
    s_h,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # X, R: (rows, n_cols) row strides s_x, s_r; Y, HSUM: outputs, strides s_y, s_h; W: (n_cols,)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(X + row * s_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * s_r + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # the sum torch would store
        tl.store(HSUM + row * s_h + cols, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / n_cols + eps)
    normed = (hf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + cols, (normed * w).to(Y.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


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
    _rmsnorm_fwd[(x2.shape[0],)](
        x2, r2, weight, y, h, n, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return y.view(x.shape), (h.view(x.shape) if residual is not None else None)


def rmsnorm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference with the same API (and the op order of HF Qwen2RMSNorm)."""
    h = x + residual if residual is not None else x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), (h if residual is not None else None)


def aot_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    out = []
    for n, res in ((2048, True), (3584, False)):
        cex = {"HAS_RES": res, "BLOCK": triton.next_power_of_2(n)}
        sig = {"X": "*bf16", "R": "*bf16", "W": "*bf16", "Y": "*bf16", "HSUM": "*bf16"}
        sig |= {"n_cols": "i32", "s_x": "i32", "s_r": "i32", "s_y": "i32", "s_h": "i32", "eps": "fp32"}
        sig |= {k: "constexpr" for k in cex}
        out.append(
            (f"rmsnorm_n{n}{'_res' if res else ''}", _rmsnorm_fwd, sig, cex, min(16, cex["BLOCK"] // 256))
        )
    return out
