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
) -> torch.Tensor:
    if backend_for(q) == "triton":
        from kernels import casa_attention  # imported lazily: triton stays optional on CPU

        return casa_attention.prefix_causal_attention_triton(
            q, prefix_k, prefix_v, prefix_len, seg_k, seg_v, q_start, scale
        )
    return prefix_causal_attention_torch(q, prefix_k, prefix_v, prefix_len, seg_k, seg_v, q_start, scale)


def prefix_causal_attention_torch(
    q: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    seg_v: torch.Tensor | None,
    q_start: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Reference: SDPA over [prefix ; segment] with a boolean mask built from the lengths."""
    B, H, T, _ = q.shape
    keys, vals, masks = [], [], []
    if prefix_k is not None:
        P = prefix_k.shape[2]
        keys.append(prefix_k)
        vals.append(prefix_v)
        # (B, 1, 1, P): image tokens all visible up to prefix_len
        pm = torch.arange(P, device=q.device)[None, :] < prefix_len[:, None]
        masks.append(pm[:, None, None, :].expand(B, 1, T, P))
    if seg_k is not None:
        S = seg_k.shape[2]
        keys.append(seg_k)
        vals.append(seg_v)
        # (B, 1, T, S): query i of row b sees segment slots <= q_start[b] + i
        last = q_start[:, None] + torch.arange(T, device=q.device)[None, :]  # (B, T)
        sm = torch.arange(S, device=q.device)[None, None, :] <= last[:, :, None]
        masks.append(sm[:, None])
    k = torch.cat(keys, dim=2) if len(keys) > 1 else keys[0]
    v = torch.cat(vals, dim=2) if len(vals) > 1 else vals[0]
    mask = torch.cat(masks, dim=3) if len(masks) > 1 else masks[0]
    groups = H // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    any_visible = mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    # A row with no visible key would give NaN; let it see everything, then zero it.
    mask = mask | ~any_visible
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * any_visible.to(out.dtype)
