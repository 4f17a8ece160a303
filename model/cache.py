"""Preallocated streaming state, one batch row per session.

TextCache: the self-attention KV cache of every layer, (L, B, Hkv, C + 1, D), bounded by C =
max_context_tokens. Keys are stored rotated by their slot position. When a row would overflow, the
oldest non-sink tokens are evicted in one chunk: the rest of the row is moved down and its keys are
re-rotated by -n, so slot == position always holds and positions stay < C (StreamingLLM's "positions
by cache slot"). Each key is re-rotated at most C / chunk times before it is itself evicted, so
rounding does not accumulate.

CASAState: per CASA layer, the current frame's image K/V (overwritten in place at each frame) and the
current window's text K/V (reset at each frame), side by side in one (Lc, B, Hkv, N + W + 1, D)
buffer.
The last slot of each text buffer is scratch (see model/decode.py) and never holds a valid token.

Lengths are host-side int64 tensors: the engine needs them to build positions anyway, and a row's
bookkeeping never forces a device sync.
"""

from __future__ import annotations

import torch

from model.rope import rotate_half


def plan_eviction(length: int, n_new: int, capacity: int, sink: int, chunk: int) -> int:
    """How many of the oldest non-sink tokens to drop before appending n_new tokens.

    Shared by the cache and the dense reference of the bounded-cache test.
    """
    if length + n_new <= capacity:
        return 0
    n = min(max(length + n_new - capacity, chunk), length - sink)
    if length - n + n_new > capacity:
        raise ValueError(
            f"cannot fit {n_new} new tokens in a text cache of {capacity} with a {sink}-token sink; "
            "raise max_context_tokens or shorten the prompt"
        )
    return n


class TextCache:
    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        evict_chunk: int | None = None,
    ) -> None:
        # one scratch slot past the capacity: idle rows of a fixed-shape decode step write there
        # (model/decode.py), so a step never needs to know which rows are working
        shape = (layers, batch, kv_heads, capacity + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.chunk = evict_chunk or max(1, capacity // 4)
        self.length = torch.zeros(batch, dtype=torch.long)  # valid slots per row
        self.sink = torch.zeros(batch, dtype=torch.long)  # leading slots never evicted (the prompt)
        self.evicted = torch.zeros(batch, dtype=torch.long)  # tokens dropped so far, for stats

    def reset(self, row: int) -> None:
        self.length[row] = 0
        self.sink[row] = 0
        self.evicted[row] = 0

    def make_room(self, row: int, n_new: int, freqs: torch.Tensor) -> int:
        """Evict before appending n_new tokens to `row`; returns the number evicted.

        freqs: (D/2,) rotary frequencies (text positions: all M-RoPE sections equal).
        """
        length, sink = int(self.length[row]), int(self.sink[row])
        n = plan_eviction(length, n_new, self.capacity, sink, self.chunk)
        if n == 0:
            return 0
        keep = slice(sink + n, length)
        dst = slice(sink, length - n)
        # Re-rotate moved keys by -n: R(p - n) = R(-n) R(p). (L, Hkv, len, D)
        ang = -float(n) * freqs.to(self.k.device, torch.float32)
        emb = torch.cat([ang, ang])
        cos, sin = emb.cos(), emb.sin()
        moved = self.k[:, row, :, keep].float()
        self.k[:, row, :, dst] = (moved * cos + rotate_half(moved) * sin).to(self.k.dtype)
        self.v[:, row, :, dst] = self.v[:, row, :, keep].clone()
        self.length[row] = length - n
        self.evicted[row] += n
        return n

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class CASAState:
    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        image_tokens: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # One buffer per layer holds [image tokens (N) | window text (W) | scratch (1)], so the
        # decode step attends to a frame and its window with one matmul (model/decode.py);
        # img_* and win_* are views of it.
        shape = (layers, batch, kv_heads, image_tokens + window + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.image_tokens = image_tokens
        self.img_k, self.img_v = self.k[:, :, :, :image_tokens], self.v[:, :, :, :image_tokens]
        self.win_k, self.win_v = self.k[:, :, :, image_tokens:], self.v[:, :, :, image_tokens:]
        self.window = window
        self.n_img = torch.zeros(batch, dtype=torch.long)  # image tokens of the current frame (0 = none yet)
        self.win_len = torch.zeros(batch, dtype=torch.long)  # text tokens in the current window

    def reset(self, row: int) -> None:
        self.n_img[row] = 0
        self.win_len[row] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))


class StreamState:
    """Everything the streaming model keeps per session row."""

    def __init__(self, text: TextCache, casa: CASAState | None) -> None:
        self.text = text
        self.casa = casa

    def reset(self, row: int) -> None:
        self.text.reset(row)
        if self.casa is not None:
            self.casa.reset(row)

    def nbytes(self) -> int:
        return self.text.nbytes() + (self.casa.nbytes() if self.casa is not None else 0)
