"""The one place that decides Triton or torch for each attention call.

Every attention in the streaming model is one pattern, "prefix + causal segment":

    out[b, h, i] = softmax_j(q[b, h, i] . key_j * scale) . value_j
        over j in  prefix[b, :prefix_len[b]]            (all visible: the frame's image tokens)
                 + seg[b, :q_start[b] + i + 1]          (causal: window text, or the text KV cache)

- CASA window prefill/decode: prefix = the frame's image K/V, seg = the window's text K/V.
- Self-attention prefill/decode over the text cache: no prefix, seg = the cache.
- Plain cross-attention ("ca" fusion): prefix only, seg absent.

Shapes: q (B, H, T, D); prefix_k/v (B, Hkv, P, D); seg_k/v (B, Hkv, S, D); prefix_len, q_start (B,)
int64. H is a multiple of Hkv (GQA). New keys are written into seg before the call. Rows of q past a
batch row's real query count are padding: their output is finite and ignored. A query with no
visible key (no prefix, no segment) outputs zeros.

Backends: CUDA tensors -> Triton (kernels/casa_attention.py) when Triton imports; everything else ->
torch SDPA with an explicit mask. `force("triton"|"torch"|None)` overrides for tests (interpreter).

The fused elementwise kernels go through the same decision (`backend_for`):
- `rms_norm(x, weight, eps, residual=None) -> (y, h)`: RMSNorm, optionally of h = x + residual
  (kernels/rmsnorm.py);
- `apply_rope(q, k, cos, sin) -> (q, k)`: rotate-half RoPE of q and k (k may be None) in one launch
  (kernels/rope.py).
Their torch references live here too, so the CPU path never imports triton; the kernel modules
re-export them next to their kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_FORCED: str | None = None


@contextlib.contextmanager
def force(backend: str | None) -> Iterator[None]:
    """Force a backend ("triton" or "torch") inside the block; None restores automatic choice."""
    global _FORCED
    prev, _FORCED = _FORCED, backend
    try:
        yield
    finally:
        _FORCED = prev


def backend_for(t: torch.Tensor) -> str:
    if _FORCED is not None:
        return _FORCED
    if t.is_cuda and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def prefix_causal_attention(
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
    """mask: optional precomputed `attention_mask(...)` for the torch path (the model builds it once
    per step and shares it across layers); the Triton path reads the lengths instead."""
    if backend_for(q) == "triton":
        from casa_live.kernels import casa_attention  # imported lazily: triton stays optional on CPU

        return casa_attention.prefix_causal_attention_triton(
            q, prefix_k, prefix_v, prefix_len, seg_k, seg_v, q_start, scale
        )
    return prefix_causal_attention_torch(
        q, prefix_k, prefix_v, prefix_len, seg_k, seg_v, q_start, scale, mask
    )


def decode_attention(
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
    span: int | None = None,
) -> torch.Tensor:
    """One query per row over [prefix[:prefix_len] ; cache[:cache_len] ; its own new key].

    The decode step's pattern (model/decode.py): the same keys as `prefix_causal_attention` at
    T = 1 with seg = cache + the new token, but the new key is passed in instead of written first,
    so the step reads the caches without mutating them (a pure graph compiles and captures well).
    q (B, H, 1, D); k_new/v_new (B, Hkv, 1, D) or None; cache_k/v (B, Hkv, C, D), every slot
    including the scratch slot that idle rows' cache_len points at, with cache_len (B,) valid
    slots; span: slots the torch path reads (> every working row's cache_len; default all);
    prefix_k/v (B, Hkv, P, D) with prefix_len (B,). Returns (B, H, 1, D).
    """
    if backend_for(q) == "triton" and cache_k is not None and k_new is not None:
        # the Triton kernel reads the new key from the segment, and bounds its loop by each row's
        # own length (the view's size costs nothing): write the key at slot cache_len first. The
        # caller writes the same values again when it commits the step (idempotent).
        b = torch.arange(cache_k.shape[0], device=q.device)
        cache_k[b, :, cache_len] = k_new[:, :, 0]
        cache_v[b, :, cache_len] = v_new[:, :, 0]
        return prefix_causal_attention(q, prefix_k, prefix_v, prefix_len, cache_k, cache_v, cache_len, scale)
    if cache_k is not None and span is not None:
        cache_k, cache_v = cache_k[:, :, :span], cache_v[:, :, :span]
    return decode_attention_torch(
        q, k_new, v_new, cache_k, cache_v, cache_len, prefix_k, prefix_v, prefix_len, scale
    )


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


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = RMSNorm(h) * weight with h = x + residual (or x); returns (y, h if residual else None)."""
    if backend_for(x) == "triton":
        from casa_live.kernels import rmsnorm

        return rmsnorm.rmsnorm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


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


def apply_rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, T, D), k (B, Hkv, T, D) | None, cos/sin (B, T, D) fp32 -> rotated (q, k)."""
    if backend_for(q) == "triton":
        from casa_live.kernels import rope

        return rope.apply_rope_triton(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)


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
