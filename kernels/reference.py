"""Torch references of every kernel: the computation each Triton kernel must reproduce.

This module never imports triton. kernels/dispatch.py runs these on the CPU (and wherever Triton is
not used); the kernel modules (casa_attention.py, rmsnorm.py, rope.py) import them to re-export next
to their kernels, and the tests compare the two. The semantics of "prefix + causal segment"
attention are described in kernels/dispatch.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "apply_rope_torch",
    "attention_mask",
    "decode_attention_torch",
    "prefix_causal_attention_torch",
    "prefix_causal_attention_varlen_torch",
    "rms_norm_torch",
]


def attention_mask(
    prefix_len: torch.Tensor | None, P: int, q_start: torch.Tensor | None, T: int, S: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, 1, T, P+S) bool, any_visible (B, 1, T, 1)) for the torch path.

    A query row with no visible key is given every key (SDPA would return NaN) and then zeroed
    through any_visible.
    """
    masks = []
    if prefix_len is not None:
        # image tokens: all visible up to prefix_len
        pm = torch.arange(P, device=prefix_len.device)[None, :] < prefix_len[:, None]
        masks.append(pm[:, None, None, :].expand(-1, 1, T, P))
    if q_start is not None:
        # query i of row b sees segment slots <= q_start[b] + i
        last = q_start[:, None] + torch.arange(T, device=q_start.device)[None, :]  # (B, T)
        sm = torch.arange(S, device=q_start.device)[None, None, :] <= last[:, :, None]
        masks.append(sm[:, None])
    mask = torch.cat(masks, dim=3) if len(masks) > 1 else masks[0]
    any_visible = mask.any(dim=-1, keepdim=True)
    return mask | ~any_visible, any_visible


def tree_attention_mask(
    prefix_len: torch.Tensor | None,
    P: int,
    q_start: torch.Tensor,
    tree: torch.Tensor,
    S: int,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_mask` for a forward whose new tokens form a tree (a shared question prefix and
    its branches, model/lm.py `step(tree=...)`): query i of row b sees the prefix up to
    prefix_len[b], the segment slots before visible[b] (the row's cache; every slot before
    q_start[b] when None), and new slot q_start[b] + j when tree[b, i, j]. tree: (B, T, T) bool,
    each query seeing itself. visible < q_start hides the end of a row's cache from questions that
    fork before it (a frame's caption, model/engine/runner.py `_score`)."""
    B, T, _ = tree.shape
    dev = q_start.device
    rel = torch.arange(S, device=dev)[None, :] - q_start[:, None]  # (B, S): slot - first new slot
    new = (rel >= 0) & (rel < T)
    # tree[b, i, rel[b, s]] for the new slots, False elsewhere: (B, T, S)
    picked = torch.gather(tree, 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    cache = rel < 0 if visible is None else torch.arange(S, device=dev)[None, :] < visible[:, None]
    sm = (new[:, None, :] & picked) | cache[:, None, :]
    masks = []
    if prefix_len is not None:
        pm = torch.arange(P, device=dev)[None, :] < prefix_len[:, None]
        masks.append(pm[:, None, None, :].expand(-1, 1, T, P))
    masks.append(sm[:, None])
    mask = torch.cat(masks, dim=3) if len(masks) > 1 else masks[0]
    any_visible = mask.any(dim=-1, keepdim=True)
    return mask | ~any_visible, any_visible


def prefix_causal_attention_torch(
    q: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    seg_v: torch.Tensor | None,
    q_start: torch.Tensor | None,
    scale: float,
    mask: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference: SDPA over [prefix ; segment] with a boolean mask built from the lengths."""
    T = q.shape[2]
    P = prefix_k.shape[2] if prefix_k is not None else 0
    S = seg_k.shape[2] if seg_k is not None else 0
    if mask is None:
        mask = attention_mask(
            prefix_len if prefix_k is not None else None, P, q_start if seg_k is not None else None, T, S
        )
    attn_mask, any_visible = mask
    if prefix_k is not None and seg_k is not None:
        k, v = torch.cat([prefix_k, seg_k], dim=2), torch.cat([prefix_v, seg_v], dim=2)
    else:
        k, v = (prefix_k, prefix_v) if prefix_k is not None else (seg_k, seg_v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    return out * any_visible.to(out.dtype)


def prefix_causal_attention_varlen_torch(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    cu_seqlens_prefix: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    seg_v: torch.Tensor | None,
    cu_seqlens_seg: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Reference for the varlen entry: the padded reference, one batch row at a time."""
    out = torch.empty_like(q)
    cq = cu_seqlens_q.tolist()
    cp = cu_seqlens_prefix.tolist() if cu_seqlens_prefix is not None else None
    cs = cu_seqlens_seg.tolist() if cu_seqlens_seg is not None else None
    for b in range(len(cq) - 1):
        qb = q[cq[b] : cq[b + 1]].transpose(0, 1)[None]  # (1, H, t, D)
        if qb.shape[2] == 0:
            continue
        pk = pv = plen = sk = sv = qs = None
        if cp is not None:
            pk = prefix_k[cp[b] : cp[b + 1]].transpose(0, 1)[None]
            pv = prefix_v[cp[b] : cp[b + 1]].transpose(0, 1)[None]
            plen = torch.tensor([pk.shape[2]], device=q.device)
        if cs is not None:
            sk = seg_k[cs[b] : cs[b + 1]].transpose(0, 1)[None]
            sv = seg_v[cs[b] : cs[b + 1]].transpose(0, 1)[None]
            qs = torch.tensor([sk.shape[2] - qb.shape[2]], device=q.device)
        o = prefix_causal_attention_torch(qb, pk, pv, plen, sk, sv, qs, scale)
        out[cq[b] : cq[b + 1]] = o[0].transpose(0, 1)
    return out


def decode_attention_torch(
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    cache_k: torch.Tensor | None,
    cache_v: torch.Tensor | None,
    cache_len: torch.Tensor | None,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Reference: scores of each key group as a batched mat-vec, one softmax over their
    concatenation (small: (B, Hkv, G, P+S+1)), then the weighted sums. No K/V is copied, which is
    what matters at T = 1 (SDPA's CPU kernel costs ~0.5 ms a call here, mostly setup)."""
    B, H, _, D = q.shape
    ref = k_new if k_new is not None else (cache_k if cache_k is not None else prefix_k)
    assert ref is not None, "decode_attention needs at least one key group"
    Hkv = ref.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D): GQA without repeating keys
    scores, values = [], []
    visible = None  # (B,) any key visible, tracked only when the new key is absent
    for k, v, n in ((prefix_k, prefix_v, prefix_len), (cache_k, cache_v, cache_len)):
        if k is None:
            continue
        m = torch.arange(k.shape[2], device=q.device)[None, :] < n[:, None]  # (B, P|S)
        scores.append((qg @ k.transpose(-1, -2)).masked_fill(~m[:, None, None, :], float("-inf")))
        values.append(v)
        if k_new is None:
            visible = m.any(-1) if visible is None else visible | m.any(-1)
    if k_new is not None:
        scores.append((qg * k_new).sum(-1, keepdim=True))  # (B, Hkv, G, 1)
        values.append(v_new)
    s = torch.cat(scores, dim=-1).float() * scale
    if visible is not None:  # a row that sees nothing gets zeros, not NaN
        s = s.masked_fill(~visible[:, None, None, None], 0.0)
    p = torch.softmax(s, dim=-1).to(q.dtype)
    out = None
    start = 0
    for v in values:
        n = v.shape[2]
        part = p[..., start : start + n] @ v  # (B, Hkv, G, D)
        out = part if out is None else out + part
        start += n
    if visible is not None:
        out = out * visible[:, None, None, None].to(out.dtype)
    return out.reshape(B, H, 1, D)


def ragged_decode_attention_torch(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    a_end: torch.Tensor,
    b_start: torch.Tensor,
    b_end: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference of the decode step's ragged attention (kernels/cpu_attention.c): one query per
    entry over its row of a layer's preallocated buffers, read in place.

    q (B, H, 1, D) or (B, H, D); keys/values (Bmax, Hkv, C, D), a layer's whole buffer; rows (B,)
    the entry's buffer row; entry b sees slots [0, a_end[b]) and [b_start[b], b_end[b]) (the
    text cache: [0, length + 1) and an empty second range; a CASA buffer: the frame's image
    tokens [0, n_img) and the window's text [N, N + slot + 1)). An entry that sees nothing
    outputs zeros. Returns (B, H * D). Gathers the rows (a copy): a reference, not a fast path."""
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    Hkv, C = keys.shape[1], keys.shape[2]
    j = torch.arange(C, device=q.device)[None, :]
    vis = (j < a_end[:, None]) | ((j >= b_start[:, None]) & (j < b_end[:, None]))  # (B, C)
    qg = q.reshape(B, Hkv, H // Hkv, D).float()
    s = (qg @ keys[rows].float().transpose(-1, -2)) * scale  # (B, Hkv, G, C)
    s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
    seen = vis.any(-1)[:, None, None, None]
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
    return (p @ values[rows].float()).to(q.dtype).reshape(B, H * D)


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference (Qwen2RMSNorm op order): statistics in fp32, scale applied in the input dtype."""
    h = x + residual if residual is not None else x
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        # one fused ATen op instead of seven small ones (the CPU decode step is op-bound); in fp32
        # it is the same computation
        return F.rms_norm(h, (h.shape[-1],), weight, eps), (h if residual is not None else None)
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype), (h if residual is not None else None)


def apply_rope_torch(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: x * cos + rotate_half(x) * sin in fp32, result in x's dtype (as model/rope.py)."""
    c, s = cos[:, None], sin[:, None]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat([-x2, x1], dim=-1) * s).to(x.dtype)

    return rot(q), (rot(k) if k is not None else None)
