"""Per-row sampling: greedy or temperature/top-k/top-p, EMA repetition penalty, stop-token bias,
n-gram blocking.

Kyutai's live-captioning logits processing, each setting per session row, in their order:
- EMA repetition penalty: every sampling step the counts decay (x decay) and one token gets +1;
  a logit is divided by penalty**count when positive, multiplied when negative. Stop tokens are
  exempt, so the penalty never delays the end of a caption;
- stop-token bias: each stop token's logit is multiplied by `eos_bias` when positive, divided when
  negative (below 1: captions run longer);
- n-gram blocking: a token that would repeat an n-gram seen in the last `window` tokens of the
  history (across frames) is banned; stop tokens never are;
- temperature 0 is greedy argmax (deterministic); otherwise temperature, top-k, top-p (as
  transformers' warpers, in that order) and a draw from the row's own seeded generator.

What the penalty and the n-gram history count (`SamplingParams.counts`, docs/engine.md):
- "emitted" (casa-live's own models): the sampled tokens, stop tokens and a cut caption's last word
  included; the count is clamped when stored. The template and prompt tokens never count.
- "fed" (Kyutai's scripts, the default for imported checkpoints): what their logits processors see.
  The EMA charges the token fed at each sampling step (the frame's `<|vision_end|>` or the caption
  prefix's last word at a frame's first step, then each sampled token), so a frame's final token
  (its stop token, or the cut word) is never charged; the count is clamped where it is used, not
  where it is stored. The n-gram history holds every text token fed into the stream: prompt,
  template and stop tokens too. The engine reports fed tokens with `feed` and `charge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from casa_live.model.engine.settings import SessionSettings, effective

Counts = Literal["emitted", "fed"]


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
    top_p: float = 1.0  # 1 = off; nucleus filter after top-k when sampling
    eos_bias: float = 1.0  # 1 = off; multiplies the stop tokens' logits (divides when negative)
    counts: Counts = "emitted"  # what the EMA penalty and the n-gram history count (module docstring)


def params_for(gen: Any, settings: SessionSettings) -> SamplingParams:
    """A session's sampling parameters: its settings where set, else the generation config's (gen)."""
    e = effective(gen, settings)
    names = ("temperature", "top_k", "repetition_penalty", "no_repeat_ngram", "seed", "top_p", "eos_bias")
    return SamplingParams(
        **{n: e[n] for n in names},
        decay=gen.repetition_decay,
        clamp=gen.repetition_clamp,
        ngram_window=gen.ngram_window,
        counts=gen.penalty_counts,
    )


def apply_repetition_penalty(
    logits: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor, stop_ids: list[int]
) -> torch.Tensor:
    """logits, counts (n, V) float32; penalty (n,). Returns penalised logits."""
    factor = penalty[:, None] ** counts
    if stop_ids:
        factor[:, stop_ids] = 1.0
    return torch.where(logits > 0, logits / factor, logits * factor)


def apply_stop_bias(logits: torch.Tensor, bias: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """logits (n, V), bias (n,): stop logits x bias when positive, / bias when negative (Kyutai's
    multiplicative token bias; the order of the two cases keeps a bias < 1 a push away from the stop)."""
    logits = logits.clone()
    v = logits[:, stop_ids]
    b = bias[:, None]
    logits[:, stop_ids] = torch.where(v < 0, v / b, v * b)
    return logits


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """scores (V,) -> scores with -inf outside the nucleus: the smallest set of most likely tokens
    whose probability reaches top_p (at least one token), as transformers' TopPLogitsWarper."""
    if top_p >= 1.0:
        return scores
    alive = torch.isfinite(scores).nonzero().squeeze(1)  # after top-k: sort k values, not the vocabulary
    if alive.numel() == 0:
        return scores
    ascending, order = torch.sort(scores[alive], descending=False)
    cumulative = ascending.softmax(-1).cumsum(-1)
    drop = cumulative <= (1.0 - top_p)
    drop[-1] = False  # the most likely token always stays
    return scores.index_fill(0, alive[order[drop]], float("-inf"))


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
        """Record an emitted token (caption tokens and stop tokens alike); a no-op for a row whose
        params count fed tokens (those go through `feed` and `charge`)."""
        p = self.params[row]
        if p.counts == "fed":
            return
        self.counts[row] *= p.decay
        self.counts[row, token] += 1.0
        self.counts[row].clamp_(max=p.clamp)
        self._extend(row, [token])

    def _extend(self, row: int, tokens: list[int]) -> None:
        h, w = self.history[row], self.params[row].ngram_window
        h.extend(tokens)
        if len(h) > 4 * max(w, 1):
            del h[:-w]

    def feed(self, row: int, tokens: list[int]) -> None:
        """ "fed" rows: text tokens just fed into the row's stream, in order, join the n-gram history."""
        if self.params[row].counts == "fed" and tokens:
            self._extend(row, tokens)

    def charge(self, rows: list[int], tokens: list[int | None]) -> None:
        """ "fed" rows about to be sampled: decay the counts and charge the token fed at this step
        (None: the step fed no text token, e.g. an inserted frame; the counts only decay). Stored
        unclamped, as Kyutai's EMA: the clamp applies where the penalty is computed."""
        if not rows:
            return
        idx = torch.tensor(rows)
        decay = torch.tensor([self.params[r].decay for r in rows], dtype=torch.float32)
        c = self.counts[idx] * decay[:, None]
        hit = [(j, t) for j, t in enumerate(tokens) if t is not None]
        if hit:
            c[torch.tensor([j for j, _ in hit]), torch.tensor([t for _, t in hit])] += 1.0
        self.counts[idx] = c

    def feed_plan(self, prefill: dict[int, list], decode: dict[int, int], sampled: list[int]) -> None:
        """After a tick that fed `prefill` (row -> items) and `decode` (row -> token): every text
        token fed to a "fed" row joins its n-gram history, and each such row about to be sampled
        is charged the token fed at its sampled position (None for an inserted frame)."""
        fed = {i for i in (*prefill, *decode) if self.params[i].counts == "fed"}
        for i in fed:
            tokens = [t for t in prefill.get(i, []) if isinstance(t, int)]
            self.feed(i, tokens + ([decode[i]] if i in decode else []))
        charged = [i for i in sampled if i in fed]
        last = [decode[i] if i in decode else prefill[i][-1] for i in charged]
        self.charge(charged, [t if isinstance(t, int) else None for t in last])

    def observe_many(self, rows: list[int], tokens: list[int]) -> None:
        """`observe` for several rows at once: the same float operations, a few ops in all."""
        if any(self.params[r].counts == "fed" for r in rows):
            pairs = [(r, t) for r, t in zip(rows, tokens) if self.params[r].counts != "fed"]
            rows, tokens = [r for r, _ in pairs], [t for _, t in pairs]
        if not rows:
            return
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
            counts = self.counts[rows]
            clamp = [self.params[r].clamp if self.params[r].counts == "fed" else None for r in rows]
            if any(c is not None for c in clamp):  # "fed" rows store their counts unclamped
                limit = torch.tensor([float("inf") if c is None else c for c in clamp])
                counts = torch.minimum(counts, limit[:, None])
            logits = apply_repetition_penalty(logits, counts, penalty, self.stop_ids)
        if self.stop_ids and any(self.params[r].eos_bias != 1.0 for r in rows):
            bias = torch.tensor([self.params[r].eos_bias for r in rows])
            logits = apply_stop_bias(logits, bias, self.stop_ids)
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
            scaled = top_p_filter(scaled, p.top_p)
            probs = torch.softmax(scaled, -1)
            out.append(int(torch.multinomial(probs, 1, generator=self.generators[r])))
        return out
