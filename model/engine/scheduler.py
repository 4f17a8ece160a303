"""The scheduler: each session row's state machine, in plain Python, and the plan of one tick.

The whole stream is one never-ending assistant turn (Kyutai's live-captioning procedure):
- open:  force template.prefix(prompt) + pre_image into the image-less first window;
- frame: the frame's image tokens start a new CASA window; force post_image (+ caption_prefix on
         frame 0), then sample until a stop token, max_new_tokens, or the frame's deadline;
- close: force the emitted stop token (or, when cut short, the stop token the model emitted last, or
         with `truncated_close="cut_word"` the cut token and the first stop token) and the next
         frame's pre_image tokens, in the window that is ending.

Each tick `Scheduler.plan()` says, for every row with work, what the runner feeds it:
- `decode`: one token in the fixed-shape batched step (model/decode.py). Sampled tokens and short
  forced runs (the close, the one-token post_image, a cut caption's close) go this way, one token
  a tick: a token costs the batched step a fraction of a row, where a second (varlen) forward
  costs a whole eager step, which under load turns into a cycle (more cut captions, more
  prefills);
- `prefill`: a run of >= `prefill_min` forced items, an inserted frame (the token-insertion
  baseline), or the prompt at open when no other row has work, in one varlen forward: the prompt
  must be in before frame 0 can start, so a lone session does not feed it a token a tick. A short
  prompt opened while other rows work goes through the batched step like any short forced run:
  sessions that open in a burst (a server restart, a camera fleet reconnecting) would otherwise
  cost an eager step each while every running session waits (docs/engine.md);
- `frames`: rows whose frame starts this tick (its image tokens are written before the forward);
- `sample`: rows whose last fed position is sampled.
Rows, plans and positions are host data; the runner turns them into device tensors.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
from casa_live.model.tokenizer import StreamDecoder

# The ranges the sampler computes safely (server/protocol.py bounds client settings to the same numbers).
# Below MIN_TEMPERATURE the division of the logits overflows float32 and multinomial raises; seeds must
# fit torch's 64-bit generator; the penalty**count factor (count <= clamp) must stay finite.
SETTING_BOUNDS: dict[str, tuple[float, float]] = {
    "max_new_tokens": (1, 256),
    "min_new_tokens": (0, 256),
    "temperature": (0.0, 5.0),
    "top_k": (0, 1 << 20),
    "repetition_penalty": (1.0, 10.0),
    "no_repeat_ngram": (0, 16),
    "seed": (0, (1 << 63) - 1),
    "top_p": (0.0, 1.0),
    # the stop tokens' logits are multiplied (divided when negative) by it: it must stay positive
    "eos_bias": (0.01, 10.0),
}
TRUNCATED_CLOSE = ("last_stop", "cut_word")  # what closes a caption cut short (Engine._cut_close)
MIN_TEMPERATURE = 0.01  # temperature is 0 (greedy) or at least this


@dataclass
class SessionSettings:
    max_new_tokens: int | None = None  # None: the model's generation_config default
    min_new_tokens: int = 0  # stop tokens are banned until the caption has this many tokens
    temperature: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram: int | None = None
    seed: int = 0
    top_p: float | None = None
    eos_bias: float | None = None
    truncated_close: str | None = None  # one of TRUNCATED_CLOSE; None: the generation config's

    def validate(self) -> SessionSettings:
        """Raise ValueError (naming the range) for a value the sampler cannot compute; returns self."""
        for name, (lo, hi) in SETTING_BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {type(value).__name__}")
            if not lo <= value <= hi:  # also False for NaN
                raise ValueError(f"{name} is {value!r}; it must be between {lo:g} and {hi:g}")
        if self.truncated_close is not None and self.truncated_close not in TRUNCATED_CLOSE:
            raise ValueError(
                f"truncated_close is {self.truncated_close!r}; it must be one of {TRUNCATED_CLOSE}"
            )
        if self.temperature is not None and 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature is {self.temperature!r}; it must be 0 (greedy) or at least {MIN_TEMPERATURE}"
            )
        return self


Item = int | torch.Tensor  # a token id, or an inserted frame's image tokens (N, hidden)


@dataclass
class RowState:
    """Generation state machine of one session row."""

    settings: SessionSettings
    max_new_tokens: int
    detok: StreamDecoder
    forced: collections.deque[Item] = field(default_factory=collections.deque)  # fed before sampling
    sample_after_forced: bool = False  # the last forced item's output is the caption's first token
    prefill_forced: bool = False  # feed the forced run in one varlen forward (the prompt at open)
    frame_waiting: bool = False  # a submitted frame has not started yet
    frame_patches: torch.Tensor | None = None  # its preprocessed patches (no vision pipeline)
    frame_grid: tuple[int, int] | None = None  # ... and their patch grid (gh, gw)
    frame_ticket: int = 0  # which submission the vision pipeline is working on
    image_tokens: torch.Tensor | None = None  # its image tokens once encoded (N, hidden)
    frame_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # CASA image K/V (Lc, Hkv, N, D) x 2
    vision_s: float = 0.0  # encode time of the waiting frame (vision pipeline)
    frame_deadline: float | None = None
    decoding: bool = False  # between a frame's start and its last token
    next_token: int | None = None  # sampled token to feed at the next tick
    frames: int = 0  # frames started
    last_stop: int | None = None  # the stop token this session's model emitted most recently
    generated: list[int] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        """A submitted frame is waiting or being captioned."""
        return self.frame_waiting or self.decoding


@dataclass
class Plan:
    frames: list[int] = field(default_factory=list)
    prefill: dict[int, list[Item]] = field(default_factory=dict)
    decode: dict[int, int] = field(default_factory=dict)
    sample: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_sessions: int, prefill_min: int = 8) -> None:
        self.rows: list[RowState | None] = [None] * max_sessions
        self.prefill_min = prefill_min
        self._busy = 0  # rows with work this tick besides prompt prefills (set by plan)

    def free_row(self) -> int | None:
        try:
            return self.rows.index(None)
        except ValueError:
            return None

    def has_work(self, i: int, frame_ready: bool | None = None) -> bool:
        """True when the next plan() feeds tokens for row i. frame_ready: whether a waiting frame
        can start (its image tokens exist); None = it can."""
        r = self.rows[i]
        if r is None:
            return False
        if r.forced or r.decoding:
            return True
        return r.frame_waiting and (frame_ready is None or frame_ready)

    def plan(self, ready: set[int] | None = None) -> Plan:
        """ready: rows whose waiting frame may start now (None: every waiting frame)."""
        plan = Plan()
        # rows that feed something this tick with no prompt prefill of their own
        self._busy = sum(
            1 for r in self.rows if r is not None and (r.decoding or (r.forced and not r.prefill_forced))
        )
        for i, r in enumerate(self.rows):
            if r is None:
                continue
            if not r.forced and not r.decoding and r.frame_waiting and (ready is None or i in ready):
                plan.frames.append(i)
                continue  # the engine starts the frame (forcing post_image), then assigns it below
            self._assign(plan, i, r)
        return plan

    def assign(self, plan: Plan, i: int) -> None:
        r = self.rows[i]
        assert r is not None
        self._assign(plan, i, r)

    def _assign(self, plan: Plan, i: int, r: RowState) -> None:
        if r.forced:
            has_frame = any(isinstance(it, torch.Tensor) for it in r.forced)
            prompt = r.prefill_forced and self._busy == 0
            if has_frame or prompt or len(r.forced) >= self.prefill_min:
                r.prefill_forced = False
                plan.prefill[i] = list(r.forced)
                r.forced.clear()
            else:
                tok = r.forced.popleft()
                assert isinstance(tok, int)
                plan.decode[i] = tok
            if not r.forced and r.sample_after_forced:
                r.sample_after_forced = False
                plan.sample.append(i)
        elif r.decoding:
            assert r.next_token is not None
            plan.decode[i] = r.next_token
            plan.sample.append(i)
