"""The one place that decides Triton or torch for each attention call.

Every attention in the streaming model is one pattern, "prefix + causal segment":

    out[b, h, i] = softmax_j(q[b, h, i] . key_j * scale) . value_j
        over j in  prefix[b, :prefix_len[b]]            (all visible: the frame's image tokens)
                 + seg[b, :q_start[b] + i + 1]          (causal: window text, or the text KV cache)

- CASA window prefill/decode: prefix = the frame's image K/V, seg = the window's text K/V.
- Self-attention prefill/decode over the text cache: no prefix, seg = the cache.
- Plain cross-attention ("ca" fusion): prefix only, seg absent.
- Watch scoring (`tree_attention`): the same keys with an explicit mask, the new tokens being a
  shared question prefix and its branches instead of a causal run; torch on every device.

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
On a CPU, the decode step's attention (model/decode.py, fp32) is one op per layer,
`torch.ops.casa.ragged_decode_attention` (registered here, so that the TorchScript step calls it):
each entry's row of the layer's buffer over its own visible slots, by the C kernel of
kernels/cpu_attention.py where it builds and runs (`ragged_cpu_available()`), else its torch
reference. `force("torch")` turns the C kernel off too.

The torch references of all of them live in kernels/reference.py, which never imports triton, so
the CPU path never does either; they are re-exported here (the model imports them from dispatch)
and next to each kernel. This module imports a kernel module only when a call takes the Triton path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from casa_live.kernels.reference import (
    apply_rope_torch,
    attention_mask,
    decode_attention_torch,
    prefix_causal_attention_torch,
    prefix_causal_attention_varlen_torch,
    ragged_decode_attention_torch,
    rms_norm_torch,
    tree_attention_mask,
)

__all__ = [
    "apply_rope",
    "apply_rope_torch",
    "attention_mask",
    "backend_for",
    "cpu_decode_layers",
    "decode_attention",
    "decode_attention_torch",
    "force",
    "prefix_causal_attention",
    "prefix_causal_attention_torch",
    "prefix_causal_attention_varlen_torch",
    "ragged_cpu_available",
    "ragged_decode_attention",
    "ragged_decode_attention_torch",
    "rms_norm",
    "rms_norm_torch",
    "tree_attention",
    "tree_attention_mask",
    "triton_available",
]

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


def tree_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    seg_v: torch.Tensor | None,
    scale: float,
    mask: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The prefix + segment pattern with an explicit mask (`tree_attention_mask`): the watch
    scoring forward, whose new tokens are a shared question prefix and its branches rather than a
    causal run. Torch SDPA on every device: the Triton kernels read lengths, not masks, and a
    scoring forward is a few hundred tokens a tick (docs/engine.md, "Watches")."""
    return prefix_causal_attention_torch(q, prefix_k, prefix_v, None, seg_k, seg_v, None, scale, mask)


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


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = RMSNorm(h) * weight with h = x + residual (or x); returns (y, h if residual else None)."""
    if backend_for(x) == "triton":
        from casa_live.kernels import rmsnorm

        return rmsnorm.rmsnorm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, T, D), k (B, Hkv, T, D) | None, cos/sin (B, T, D) fp32 -> rotated (q, k)."""
    if backend_for(q) == "triton":
        from casa_live.kernels import rope

        return rope.apply_rope_triton(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)


def ragged_cpu_available() -> bool:
    """Whether the decode step's attention runs the C kernel (kernels/cpu_attention.py): it
    builds and runs here, and no test forced the torch path."""
    if _FORCED == "torch":
        return False
    from casa_live.kernels import cpu_attention

    return cpu_attention.library() is not None


def ragged_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    a_end: torch.Tensor,
    b_start: torch.Tensor,
    b_end: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The decode step's attention over ragged rows, read in place (contract:
    kernels/reference.py `ragged_decode_attention_torch`): the C kernel where it applies."""
    from casa_live.kernels import cpu_attention

    if ragged_cpu_available() and cpu_attention.supports(q, keys):
        return cpu_attention.ragged_decode_attention(q, keys, values, rows, a_end, b_start, b_end, scale)
    return ragged_decode_attention_torch(q, keys, values, rows, a_end, b_start, b_end, scale)


def cpu_decode_layers(lm_weights: object, hidden: int, mlp: int, head_dim: int):  # type: ignore[no-untyped-def]
    """The C implementation of a whole fused decode step's layers (kernels/cpu_attention.py
    `decode_layers`) with its weight table for these weights, or None where it does not run (no
    kernel, torch forced, dimensions or dtypes it does not take)."""
    if not ragged_cpu_available():
        return None
    from casa_live.kernels import cpu_attention

    table = cpu_attention.LayerWeights(lm_weights)
    return (cpu_attention.decode_layers, table) if table.fits(hidden, mlp, head_dim) else None


# The op TorchScript calls (model/decode.py `_fused_layers`): a Python kernel behind the
# dispatcher, ~10 us a call. Registered once per process.
_OPS = torch.library.Library("casa", "DEF")
_OPS.define(
    "ragged_decode_attention(Tensor q, Tensor keys, Tensor values, Tensor rows, Tensor a_end, "
    "Tensor b_start, Tensor b_end, float scale) -> Tensor"
)
_OPS.impl("ragged_decode_attention", ragged_decode_attention, "CompositeExplicitAutograd")
