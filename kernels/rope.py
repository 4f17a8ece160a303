"""Fused rotary embedding of q and k in one launch (rotate-half / HF convention).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

cos/sin (B, T, D) are built by the model (plain RoPE or M-RoPE sections: the kernel does not care
which), so positions stay a model decision. q (B, H, T, D), k (B, Hkv, T, D), any strides with a
unit last dim. One program per (b, t, q|k) rotates all heads of that token; cos/sin are read once
per token instead of once per head, and x is read and written once (torch's unfused form makes
~4 passes: see docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_rope_torch", "apply_rope_triton"]


@triton.jit
def _rope_fwd(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    T,
    HQ,
    HK,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_qob,
    s_qoh,
    s_qot,
    s_kob,
    s_koh,
    s_kot,
    s_cb,
    s_ct,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # grid (B * T, 2): axis 1 picks q (0) or k (1). Q/QO: (B, HQ, T, 2 * HALF); K/KO: (B, HK, T, 2 * HALF);
    # COS/SIN: (B, T, 2 * HALF) with strides s_cb, s_ct (s_cb = 0 broadcasts one table over the batch).
    bt = tl.program_id(0)
    which = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    if which == 0:
        src = Q + b * s_qb + t * s_qt
        dst = QO + b * s_qob + t * s_qot
        n_h = HQ
        s_sh = s_qh
        s_dh = s_qoh
    else:
        src = K + b * s_kb + t * s_kt
        dst = KO + b * s_kob + t * s_kot
        n_h = HK
        s_sh = s_kh
        s_dh = s_koh
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    c_ptr = COS + b * s_cb + t * s_ct + offs_d
    s_ptr = SIN + b * s_cb + t * s_ct + offs_d
    c1 = tl.load(c_ptr, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF, mask=d_ok, other=0.0).to(tl.float32)
    for h0 in range(0, n_h, BLOCK_H):
        hh = h0 + offs_h
        ok = (hh < n_h)[:, None] & d_ok[None, :]
        x_ptr = src + hh[:, None] * s_sh + offs_d[None, :]
        x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
        o_ptr = dst + hh[:, None] * s_dh + offs_d[None, :]
        tl.store(o_ptr, (x1 * c1[None, :] - x2 * s1[None, :]).to(QO.dtype.element_ty), mask=ok)
        tl.store(o_ptr + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(QO.dtype.element_ty), mask=ok)


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B | 1, T, D) -> rotated (q, k), one launch.

    inplace=True writes back into q and k (e.g. straight into a KV cache view).
    """
    B, H, T, D = q.shape
    if D % 2 or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"rope: bad shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError("rope: q and k must share one dtype")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if cos.stride() != sin.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    qo, ko = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    half = D // 2
    s_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    block_h = min(triton.next_power_of_2(max(H, k.shape[1])), 16)
    _rope_fwd[(B * T, 2)](
        q, k, qo, ko, cos, sin, T, H, k.shape[1],
        *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], s_cb, cos.stride(1),
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=1 if D <= 64 else 2,
    )  # fmt: skip
    return qo, ko


def apply_rope_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) -> rotated (q, k)."""

    def rot(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    c, s = cos[:, None], sin[:, None]
    return (q * c + rot(q) * s).to(q.dtype), (k * c + rot(k) * s).to(k.dtype)


def aot_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    out = []
    for d in (64, 128):
        cex = {"HALF": d // 2, "BLOCK_H": 16, "BLOCK_HALF": d // 2}
        sig = {n: "*bf16" for n in ("Q", "K", "QO", "KO")} | {"COS": "*fp32", "SIN": "*fp32"}
        ints = (
            ["T", "HQ", "HK"]
            + [f"s_{p}{a}" for p in ("q", "k", "qo", "ko") for a in "bht"]
            + ["s_cb", "s_ct"]
        )
        sig |= {n: "i32" for n in ints} | {k: "constexpr" for k in cex}
        out.append((f"rope_qk_d{d}", _rope_fwd, sig, cex, 1 if d <= 64 else 2))
    return out
