"""Per-row sampling: greedy or temperature/top-k, EMA repetition penalty, n-gram blocking.

Kyutai's live-captioning logits processing, each setting per session row:
- EMA repetition penalty: every step the counts decay (x decay) and the emitted token gets +1,
  clamped to `clamp`; a logit is divided by penalty**count when positive, multiplied when negative.
  Stop tokens are exempt, so the penalty never delays the end of a caption.
- n-gram blocking: a token that would repeat an n-gram seen in the last `window` emitted tokens
  (across frames) is banned.
- temperature 0 is greedy argmax (deterministic); otherwise sample from the top-k softmax with the
  row's own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = whole vocabulary
    repetition_penalty: float = 1.0
    decay: float = 0.99
    clamp: float = 5.0
    no_repeat_ngram: int = 0  # 0 = off
    ngram_window: int = 60
    seed: int = 0


def apply_repetition_penalty(
    logits: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor, stop_ids: list[int]
) -> torch.Tensor:
    """logits, counts (n, V) float32; penalty (n,). Returns penalised logits."""
    factor = penalty[:, None] ** counts
    if stop_ids:
        factor[:, stop_ids] = 1.0
    return torch.where(logits > 0, logits / factor, logits * factor)


def ngram_banned(history: list[int], n: int, window: int) -> list[int]:
    """Tokens that would complete an n-gram already present in the last `window` tokens."""
    if n <= 0 or len(history) < n:
        return []
    h = history[-window:]
    prefix = tuple(h[len(h) - (n - 1) :]) if n > 1 else ()
    banned = []
    for i in range(len(h) - n + 1):
        if tuple(h[i : i + n - 1]) == prefix:
            banned.append(h[i + n - 1])
    return banned


class Sampler:
    """Sampling state for every batch row: EMA counts (B, V), token history, generators."""

    def __init__(self, batch: int, vocab: int, stop_ids: list[int]) -> None:
        self.counts = torch.zeros(batch, vocab, dtype=torch.float32)
        self.stop_ids = list(stop_ids)
        self.params = [SamplingParams() for _ in range(batch)]
        self.history: list[list[int]] = [[] for _ in range(batch)]
        self.generators = [torch.Generator().manual_seed(0) for _ in range(batch)]

    def reset(self, row: int, params: SamplingParams) -> None:
        self.counts[row] = 0
        self.history[row] = []
        self.set_params(row, params)
        self.generators[row].manual_seed(params.seed)

    def set_params(self, row: int, params: SamplingParams) -> None:
        self.params[row] = params

    def observe(self, row: int, token: int) -> None:
        """Record an emitted token (caption tokens and stop tokens alike)."""
        p = self.params[row]
        self.counts[row] *= p.decay
        self.counts[row, token] += 1.0
        self.counts[row].clamp_(max=p.clamp)
        self.history[row].append(token)
        if len(self.history[row]) > 4 * max(p.ngram_window, 1):
            del self.history[row][: -p.ngram_window]

    def observe_many(self, rows: list[int], tokens: list[int]) -> None:
        """`observe` for several rows at once: the same float operations, a few ops in all."""
        if len(rows) == 1:
            self.observe(rows[0], tokens[0])
            return
        idx = torch.tensor(rows)
        decay = torch.tensor([self.params[r].decay for r in rows], dtype=torch.float32)
        clamp = torch.tensor([self.params[r].clamp for r in rows], dtype=torch.float32)
        c = self.counts[idx] * decay[:, None]
        c[torch.arange(len(rows)), torch.tensor(tokens)] += 1.0
        self.counts[idx] = torch.minimum(c, clamp[:, None])
        for r, t in zip(rows, tokens):
            h = self.history[r]
            h.append(t)
            w = self.params[r].ngram_window
            if len(h) > 4 * max(w, 1):
                del h[:-w]

    def sample(self, rows: list[int], logits: torch.Tensor, no_stop: list[bool] | None = None) -> list[int]:
        """logits (n, V) for `rows` -> one token per row. no_stop[i]: stop tokens banned for row i
        (the caption has not reached its minimum length)."""
        logits = logits.float().cpu()
        if no_stop is not None and any(no_stop) and self.stop_ids:
            ban = torch.tensor(no_stop)[:, None] & torch.zeros_like(logits, dtype=torch.bool).index_fill_(
                1, torch.tensor(self.stop_ids), True
            )
            logits = logits.masked_fill(ban, float("-inf"))
        penalty = torch.tensor([self.params[r].repetition_penalty for r in rows])
        if bool((penalty != 1.0).any()):
            logits = apply_repetition_penalty(logits, self.counts[rows], penalty, self.stop_ids)
        greedy = logits.argmax(-1).tolist()  # the common case, for every row in one op
        out = []
        for i, r in enumerate(rows):
            p = self.params[r]
            if p.temperature <= 0 and p.no_repeat_ngram <= 0:
                out.append(greedy[i])
                continue
            row_logits = logits[i]
            banned = ngram_banned(self.history[r], p.no_repeat_ngram, p.ngram_window)
            if banned:
                row_logits = row_logits.clone()
                row_logits[[b for b in banned if b not in self.stop_ids]] = float("-inf")
            if p.temperature <= 0:
                out.append(int(row_logits.argmax()))
                continue
            scaled = row_logits / p.temperature
            if 0 < p.top_k < scaled.shape[0]:
                kth = torch.topk(scaled, p.top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = torch.softmax(scaled, -1)
            out.append(int(torch.multinomial(probs, 1, generator=self.generators[r])))
        return out
