"""Preallocated streaming state, one batch row per session.

TextCache: the self-attention KV cache of every layer, (L, B, Hkv, C + 1, D), bounded by C =
max_context_tokens. Keys are stored rotated by their slot position. When a row would overflow, the
oldest non-sink tokens are evicted in one chunk: the rest of the row is moved down and its keys are
re-rotated by -n, so slot == position always holds and positions stay < C (StreamingLLM's "positions
by cache slot"). Each key is re-rotated at most C / chunk times before it is itself evicted, so
rounding does not accumulate.

InsertionSpans: the bounded policy of token-insertion models (the benchmark baseline, and a plain
Qwen2.5-VL imported with `--fusion insertion`), StreamingVLM-style: the prompt is the attention
sink, and the rest of the cache is a sliding window of the most recent items (whole frames and text
tokens), oldest evicted first, a whole frame at a time. Insertion keys sit at Qwen2.5-VL's absolute
positions (a frame spans max(gh, gw) positions over gh*gw slots, so slot != position); on eviction
the kept tokens are re-positioned contiguously after the sink: every key moves down by the
position span d of what was evicted (re-rotated by -d in every M-RoPE section: an image token at
(p, p+row, p+col) goes to (p-d, p-d+row, p-d+col), a valid Qwen position again) and the row's next
position drops by d. The sink keeps its positions. So a stream's positions stay bounded and every
kept token sits where a fresh Qwen2.5-VL layout of [sink | kept items] would put it.

CASAState: per CASA layer, the current frame's image K/V (overwritten in place at each frame) and the
current window's text K/V (reset at each frame), side by side in one (Lc, B, Hkv, N + W + 1, D)
buffer.
The last slot of each text buffer is scratch (see model/decode.py) and never holds a valid token.

Lengths are host-side int64 tensors: the engine needs them to build positions anyway, and a row's
bookkeeping never forces a device sync.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from casa_live.model.rope import rotate_half


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


def plan_span_eviction(
    spans: Sequence[tuple[int, int]], length: int, n_new: int, capacity: int, sink: int, chunk: int
) -> tuple[int, int, int]:
    """Token insertion: how many whole items to drop (oldest first, after the sink) before
    appending n_new slots; spans are the items' (slots, positions). Returns (items, slots,
    positions) dropped. At least `chunk` slots go once eviction starts (as plan_eviction), rounded
    up to whole items. Shared by InsertionSpans and the dense reference of the bounded test."""
    if length + n_new <= capacity:
        return 0, 0, 0
    need = min(max(length + n_new - capacity, chunk), length - sink)
    k = slots = positions = 0
    while slots < need and k < len(spans):
        slots += spans[k][0]
        positions += spans[k][1]
        k += 1
    if length - slots + n_new > capacity:
        raise ValueError(
            f"cannot fit {n_new} new tokens in a text cache of {capacity} with a {sink}-token sink; "
            "raise max_context_tokens (a token-insertion model keeps whole frames in it) or shorten the prompt"
        )
    return k, slots, positions


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
        score_slots: int = 0,
    ) -> None:
        # one scratch slot past the capacity: idle rows of a fixed-shape decode step write there
        # (model/decode.py), so a step never needs to know which rows are working; and
        # `score_slots` more, where a watch-scoring forward writes its question tokens' K/V past a
        # full row's valid slots without evicting anything (model/engine/runner.py `_score`)
        shape = (layers, batch, kv_heads, capacity + 1 + score_slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.chunk = evict_chunk or max(1, capacity // 4)
        self.length = torch.zeros(batch, dtype=torch.long)  # valid slots per row
        self.sink = torch.zeros(batch, dtype=torch.long)  # leading slots never evicted (the prompt)
        self.evicted = torch.zeros(batch, dtype=torch.long)  # tokens dropped so far, for stats
        # the valid slots when the row's current frame started (CASA): a question branch forks
        # there, with the frame's image and none of its caption (StreamState.copy_row)
        self.mark = torch.zeros(batch, dtype=torch.long)

    def reset(self, row: int) -> None:
        self.length[row] = 0
        self.sink[row] = 0
        self.evicted[row] = 0
        self.mark[row] = 0

    def make_room(self, row: int, n_new: int, freqs: torch.Tensor) -> int:
        """Evict before appending n_new tokens to `row`; returns the number evicted.

        freqs: (D/2,) rotary frequencies (text positions: all M-RoPE sections equal).
        """
        length, sink = int(self.length[row]), int(self.sink[row])
        n = plan_eviction(length, n_new, self.capacity, sink, self.chunk)
        if n == 0:
            return 0
        self.evict(row, n, n, freqs)
        return n

    def evict(self, row: int, n: int, shift: int, freqs: torch.Tensor) -> None:
        """Drop the n oldest non-sink slots of `row`: the rest move down n slots and their keys
        are re-rotated by -shift positions (n for CASA's slot positions; the evicted position span
        for token insertion). freqs: (D/2,) rotary frequencies; one angle per frequency shifts
        every M-RoPE section alike."""
        length, sink = int(self.length[row]), int(self.sink[row])
        keep = slice(sink + n, length)
        dst = slice(sink, length - n)
        # Re-rotate moved keys by -shift: R(p - s) = R(-s) R(p). (L, Hkv, len, D)
        ang = -float(shift) * freqs.to(self.k.device, torch.float32)
        emb = torch.cat([ang, ang])
        cos, sin = emb.cos(), emb.sin()
        moved = self.k[:, row, :, keep].float()
        self.k[:, row, :, dst] = (moved * cos + rotate_half(moved) * sin).to(self.k.dtype)
        self.v[:, row, :, dst] = self.v[:, row, :, keep].clone()
        self.length[row] = length - n
        self.evicted[row] += n
        # the mark moves down with the slots it counts (a caption never evicts its own frame's
        # start: the window is far smaller than the cache)
        self.mark[row] = max(sink, int(self.mark[row]) - n)

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
        score_slots: int = 0,
    ) -> None:
        # One buffer per layer holds [image tokens (N) | window text (W) | scratch (1) | score
        # slots], so the decode step attends to a frame and its window with one matmul
        # (model/decode.py); img_* and win_* are views of it. The score slots: as TextCache's.
        shape = (layers, batch, kv_heads, image_tokens + window + 1 + score_slots, head_dim)
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


class InsertionSpans:
    """Host bookkeeping of a token-insertion model's bounded cache (see the module docstring): per
    row, the next absolute position and the (slots, positions) of every item fed after the sink,
    oldest first."""

    def __init__(self, batch: int) -> None:
        self.items: list[collections.deque[tuple[int, int]]] = [collections.deque() for _ in range(batch)]
        self.position = [0] * batch  # next absolute (Qwen2.5-VL) position per row

    def reset(self, row: int) -> None:
        self.items[row].clear()
        self.position[row] = 0

    def fed(self, text: TextCache, row: int, slot: int, slots: int, positions: int) -> None:
        """An item of `slots` slots spanning `positions` positions is fed at `slot`; the next
        position moves past it. Items in the sink are never evicted, so they are not recorded."""
        self.position[row] += positions
        if slot >= int(text.sink[row]):
            self.items[row].append((slots, positions))

    def make_room(self, text: TextCache, row: int, n_new: int, freqs: torch.Tensor) -> int:
        """Evict whole oldest items before appending n_new slots to `row`; the kept items and the
        row's next position move down by the evicted position span d, which is returned."""
        items = self.items[row]
        length, sink = int(text.length[row]), int(text.sink[row])
        k, n, d = plan_span_eviction(items, length, n_new, text.capacity, sink, text.chunk)
        if k == 0:
            return 0
        for _ in range(k):
            items.popleft()
        text.evict(row, n, d, freqs)
        self.position[row] -= d
        return d


@dataclass
class PromptKV:
    """A prompt's K/V in the prefix cache (StreamState.save_prefix): n text slots (L, Hkv, n, D)
    and, for CASA, its first window's (Lc, Hkv, n, D)."""

    n: int
    k: torch.Tensor
    v: torch.Tensor
    ca_k: torch.Tensor | None = None
    ca_v: torch.Tensor | None = None


class StreamState:
    """Everything the streaming model keeps per session row."""

    def __init__(self, text: TextCache, casa: CASAState | None, spans: InsertionSpans | None = None) -> None:
        self.text = text
        self.casa = casa
        self.spans = spans  # token insertion only

    @classmethod
    def allocate(
        cls,
        lm: Any,
        rows: int,
        context_tokens: int,
        casa_layers: int,
        image_tokens: int,
        window_tokens: int,
        insertion: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        score_slots: int = 0,
    ) -> StreamState:
        """The whole state for `rows` sessions of a model whose decoder is `lm` (an LMConfig):
        a text cache bounded at context_tokens; for CASA models, the CASA state sized for the
        largest frame (image_tokens) and a window of window_tokens; for token insertion, the
        bookkeeping of its bounded cache instead. score_slots: room past every row's valid
        slots for a watch-scoring forward (TextCache)."""
        text = TextCache(
            lm.layers, rows, lm.kv_heads, lm.head_dim, context_tokens, dtype, device, score_slots=score_slots
        )
        if insertion:
            return cls(text, None, InsertionSpans(rows))
        casa = CASAState(
            casa_layers,
            rows,
            lm.kv_heads,
            lm.head_dim,
            image_tokens,
            window_tokens,
            dtype,
            device,
            score_slots,
        )
        return cls(text, casa)

    def reset(self, row: int, sink: int = 0) -> None:
        """Everything `row` holds starts afresh; its first `sink` tokens (the prompt) will never
        be evicted."""
        self.text.reset(row)
        self.text.sink[row] = sink
        if self.casa is not None:
            self.casa.reset(row)
        if self.spans is not None:
            self.spans.reset(row)

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a question branch of row `src`. CASA: the text K/V before `src`'s current
        frame (up to its mark), and the frame's image K/V, so the branch starts where the frame
        did, before anything of its caption, and its question opens the frame's CASA window as a
        caption would (docs/engine.md, "Questions"). Token insertion (no CASA state, the frame in
        the text): every valid slot. Only valid slots are copied."""
        t = self.text
        n = int(t.length[src]) if self.casa is None else int(t.mark[src])
        t.k[:, dst, :, :n] = t.k[:, src, :, :n]
        t.v[:, dst, :, :n] = t.v[:, src, :, :n]
        t.length[dst], t.mark[dst], t.sink[dst], t.evicted[dst] = n, n, t.sink[src], t.evicted[src]
        if self.casa is not None:
            c = self.casa
            n_img = int(c.n_img[src])
            for buf in (c.k, c.v):  # (Lc, B, Hkv, N + W + 1, D): the frame, then the window
                buf[:, dst, :, :n_img] = buf[:, src, :, :n_img]
            c.n_img[dst], c.win_len[dst] = n_img, 0
        if self.spans is not None:
            self.spans.items[dst] = collections.deque(self.spans.items[src])
            self.spans.position[dst] = self.spans.position[src]

    def save_prefix(self, row: int) -> PromptKV:
        """A copy of what `row`'s prompt wrote, the prompt being all it has fed: its text K/V (the
        attention sink) and, for CASA, the K/V of the image-less first window it fed them in."""
        n = int(self.text.length[row])
        kv = [self.text.k[:, row, :, :n].clone(), self.text.v[:, row, :, :n].clone()]
        if self.casa is not None:
            w, N = int(self.casa.win_len[row]), self.casa.image_tokens
            kv += [self.casa.k[:, row, :, N : N + w].clone(), self.casa.v[:, row, :, N : N + w].clone()]
        return PromptKV(n, *kv)

    def load_prefix(self, row: int, p: PromptKV) -> None:
        """Make a freshly reset `row` hold what feeding the prompt would have written (K/V at the
        same slots and positions, whatever the row: a prompt's K/V depend on its tokens alone)."""
        n = p.n
        self.text.k[:, row, :, :n] = p.k
        self.text.v[:, row, :, :n] = p.v
        self.text.length[row] = n
        if self.casa is not None:
            assert p.ca_k is not None and p.ca_v is not None
            w, N = p.ca_k.shape[2], self.casa.image_tokens
            self.casa.k[:, row, :, N : N + w] = p.ca_k
            self.casa.v[:, row, :, N : N + w] = p.ca_v
            self.casa.win_len[row] = w
        if self.spans is not None:  # in the sink: the position moves, no item is recorded
            self.spans.fed(self.text, row, 0, n, n)

    def advance(self, rows: torch.Tensor, n: torch.Tensor | int) -> None:
        """After a forward fed `rows` (host int64) n tokens each (written at their lengths): the
        one place where the text cache and the CASA window grow."""
        self.text.length[rows] += n
        if self.casa is not None:
            self.casa.win_len[rows] += n

    def start_windows(self, rows: torch.Tensor, n_img: int) -> None:
        """New frames of n_img image tokens were written for `rows` (host int64): their CASA
        windows start empty, and their text marks are where the frames start."""
        assert self.casa is not None
        self.casa.n_img[rows] = n_img
        self.casa.win_len[rows] = 0
        self.text.mark[rows] = self.text.length[rows]

    def nbytes(self) -> int:
        return self.text.nbytes() + (self.casa.nbytes() if self.casa is not None else 0)
