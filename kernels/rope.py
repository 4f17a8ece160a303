"""Fused rotary embedding of q and k in one launch (rotate-half / HF convention).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

cos/sin (B, T, D) are built by the model (plain RoPE or M-RoPE sections: the kernel does not care
which), so positions stay a model decision. q (B, H, T, D), k (B, Hkv, T, D), any strides with a
unit last dim. One program per (b, t, q|k) rotates all heads of that token; cos/sin are read once
per token instead of once per head, and x is read and written once (torch's unfused form makes
~4 passes: see docs/kernels.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from casa_live.kernels.reference import apply_rope_torch

__all__ = ["apply_rope_torch", "apply_rope_triton"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # grid (B, cdiv(T, BLOCK_T), 2): axis 2 picks q (0) or k (1). Q/QO: (B, HQ, T, 2 * HALF);
    # K/KO: (B, HK, T, 2 * HALF); COS/SIN: (B, T, 2 * HALF), strides s_cb (0 = one table), s_ct.
    # A tile is (BLOCK_T tokens x BLOCK_H heads, HALF): row r = token r // BLOCK_H, head r % BLOCK_H.
    b = tl.program_id(0).to(tl.int64)
    which = tl.program_id(2)
    if which == 0:
        src = Q + b * s_qb
        dst = QO + b * s_qob
        n_h = HQ
        s_st = s_qt
        s_sh = s_qh
        s_dt = s_qot
        s_dh = s_qoh
    else:
        src = K + b * s_kb
        dst = KO + b * s_kob
        n_h = HK
        s_st = s_kt
        s_sh = s_kh
        s_dt = s_kot
        s_dh = s_koh
    offs_r = tl.arange(0, BLOCK_T * BLOCK_H)
    t = tl.program_id(1) * BLOCK_T + offs_r // BLOCK_H
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    t_ok = (t < T)[:, None] & d_ok[None, :]
    cs = b * s_cb + t[:, None].to(tl.int64) * s_ct + offs_d[None, :]  # (R, HALF) offsets into cos/sin
    c1 = tl.load(COS + cs, mask=t_ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + HALF, mask=t_ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs, mask=t_ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + HALF, mask=t_ok, other=0.0).to(tl.float32)
    for h0 in range(0, n_h, BLOCK_H):
        hh = h0 + offs_r % BLOCK_H
        ok = t_ok & (hh < n_h)[:, None]
        x_ptr = src + (t.to(tl.int64) * s_st + hh * s_sh)[:, None] + offs_d[None, :]
        x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
        o_ptr = dst + (t.to(tl.int64) * s_dt + hh * s_dh)[:, None] + offs_d[None, :]
        tl.store(o_ptr, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty), mask=ok)
        tl.store(o_ptr + HALF, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty), mask=ok)


def pick_block(T: int, heads: int, half: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H): all heads (up to 16) of a few tokens per program on the GPU (~2k
    elements), many tokens in the interpreter (whose cost is per program)."""
    block_h = min(triton.next_power_of_2(heads), 16)
    budget = 32768 if INTERPRET else 2048
    block_t = max(1, min(triton.next_power_of_2(T), budget // (block_h * triton.next_power_of_2(half))))
    return block_t, block_h


def apply_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, T, D), k (B, Hkv, T, D) | None, cos/sin (B | 1, T, D) -> rotated (q, k), one launch.

    inplace=True writes back into q and k (e.g. straight into a KV cache view).
    """
    B, H, T, D = q.shape
    if D % 2 or (k is not None and (k.shape[0] != B or k.shape[2] != T or k.shape[3] != D)):
        raise ValueError(f"rope: bad shapes q {tuple(q.shape)} k {None if k is None else tuple(k.shape)}")
    if k is not None and q.dtype != k.dtype:
        raise TypeError("rope: q and k must share one dtype")
    q = q if q.stride(-1) == 1 else q.contiguous()
    kk = q if k is None else (k if k.stride(-1) == 1 else k.contiguous())
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo, ko = (q, kk) if inplace else (torch.empty_like(q), torch.empty_like(kk) if k is not None else None)
    ko = qo if ko is None else ko
    half = D // 2
    s_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    n_kv = kk.shape[1] if k is not None else 0
    block_t, block_h = pick_block(T, max(H, n_kv), half)
    _rope_fwd[(B, triton.cdiv(T, block_t), 1 if k is None else 2)](
        q, kk, qo, ko, cos, sin, T, H, n_kv,
        *q.stride()[:3], *kk.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], s_cb, cos.stride(1),
        HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4 if block_t * block_h * half >= 2048 else 2,
    )  # fmt: skip
    return qo, (ko if k is not None else None)


def aot_configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    out = []
    for d, heads in ((64, 8), (128, 16)):
        block_t, block_h = pick_block(64, heads, d // 2)
        cex = {"HALF": d // 2, "BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_HALF": d // 2}
        sig = {n: "*bf16" for n in ("Q", "K", "QO", "KO")} | {"COS": "*fp32", "SIN": "*fp32"}
        ints = (
            ["T", "HQ", "HK"]
            + [f"s_{p}{a}" for p in ("q", "k", "qo", "ko") for a in "bht"]
            + ["s_cb", "s_ct"]
        )
        sig |= {n: "i32" for n in ints} | {k: "constexpr" for k in cex}
        out.append((f"rope_qk_d{d}_t{block_t}_h{block_h}", _rope_fwd, sig, cex, 4))
    return out
