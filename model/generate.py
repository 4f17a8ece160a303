"""The streaming engine: many sessions, one batched step function, Kyutai's per-frame procedure.

Each session is a batch row of a preallocated StreamState. The whole stream is one never-ending
assistant turn:
- open:  feed template.prefix(prompt) + pre_image into the image-less first window;
- frame: vision tower -> image tokens -> the row's CASA image K/V (new window); feed post_image
         (+ caption_prefix on frame 0); decode until a stop token, max_new_tokens, or the frame's
         deadline (its real-time budget);
- close: feed the emitted stop token (or the first stop token when generation was cut short) and
         the next frame's pre_image tokens, in the window that is ending.

`step()` advances every row with work by one forward: frame prefills, token decodes and closes of
different sessions go through `LanguageModel.step` together, each row with its own token count.
Token-insertion models feed the frame's image tokens into the text stream instead (the baseline).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.cache import CASAState, StreamState, TextCache
from model.config import GenerationConfig
from model.processor import ImageProcessor, QwenImageProcessor
from model.rope import image_positions, text_positions
from model.sampling import Sampler, SamplingParams
from model.tokenizer import StreamDecoder, Tokenizer
from model.vlm import CASAModel


class CapacityError(RuntimeError):
    """Every batch row is taken."""


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
}
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
        if self.temperature is not None and 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature is {self.temperature!r}; it must be 0 (greedy) or at least {MIN_TEMPERATURE}"
            )
        return self


@dataclass
class TokenEvent:
    row: int
    frame: int  # index of the frame being captioned in this session
    token: int | None  # the emitted caption token; None on a final event that carries no token
    text: str  # decoded text delta
    done: bool = False
    reason: str | None = None  # when done: "stop" | "length" | "deadline"


@dataclass
class _Row:
    """Generation state machine of one session row."""

    settings: SessionSettings
    max_new_tokens: int
    detok: StreamDecoder
    pending: list[int] = field(default_factory=list)  # text tokens to feed at the next step
    frame_patches: torch.Tensor | None = None  # submitted frame waiting to start
    frame_deadline: float | None = None
    decoding: bool = False  # between a frame's prefill and its last token
    next_token: int | None = None  # sampled token to feed at the next step
    frames: int = 0  # frames started
    generated: list[int] = field(default_factory=list)
    position: int = 0  # next absolute position (token insertion only)


class Engine:
    def __init__(
        self,
        model: CASAModel,
        tokenizer: Tokenizer,
        gen: GenerationConfig,
        max_sessions: int = 16,
        max_context_tokens: int = 1024,
        window_tokens: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.lm.fuse_projections()
        self.tokenizer, self.gen = tokenizer, gen
        self.device, self.dtype = torch.device(device), dtype
        cfg = model.config
        self.processor = (QwenImageProcessor if cfg.processor == "qwen" else ImageProcessor).for_config(cfg)
        self.image_size = cfg.image_size
        self.insertion = cfg.casa.fusion == "insertion"
        self.max_sessions = max_sessions
        lm = cfg.lm
        self.state = StreamState(
            TextCache(lm.layers, max_sessions, lm.kv_heads, lm.head_dim, max_context_tokens, dtype, device),
            None
            if self.insertion
            else CASAState(
                len(model.lm.casa_ids),
                max_sessions,
                lm.kv_heads,
                lm.head_dim,
                cfg.image_tokens,
                window_tokens,
                dtype,
                device,
            ),
        )
        self.stop_ids = [tokenizer.token_id(t) for t in gen.stop_tokens]
        t = gen.template
        self.pre_ids = tokenizer.encode(t.pre_image)
        self.post_ids = tokenizer.encode(t.post_image)
        self.caption_prefix_ids = tokenizer.encode(t.caption_prefix)
        self.window_tokens = window_tokens
        self.sampler = Sampler(max_sessions, lm.vocab, self.stop_ids)
        self.rows: list[_Row | None] = [None] * max_sessions
        # seconds the last step() spent in the vision tower (0.0 when it started no frame): lets the
        # server split a step's time into vision encode and language model
        self.last_vision_seconds = 0.0

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw
    ) -> Engine:
        from model.weights import load_checkpoint

        model, tok, gen = load_checkpoint(path, device, dtype)
        return cls(model, tok, gen, device=device, dtype=dtype, **kw)

    # ---- sessions ---------------------------------------------------------------------------

    def _params(self, s: SessionSettings) -> SamplingParams:
        g = self.gen
        return SamplingParams(
            temperature=g.temperature if s.temperature is None else s.temperature,
            top_k=g.top_k if s.top_k is None else s.top_k,
            repetition_penalty=g.repetition_penalty if s.repetition_penalty is None else s.repetition_penalty,
            decay=g.repetition_decay,
            clamp=g.repetition_clamp,
            no_repeat_ngram=g.no_repeat_ngram if s.no_repeat_ngram is None else s.no_repeat_ngram,
            ngram_window=g.ngram_window,
            seed=s.seed,
        )

    def _max_new(self, s: SessionSettings) -> int:
        n = self.gen.max_new_tokens if s.max_new_tokens is None else s.max_new_tokens
        # a frame's window holds post_image + caption_prefix + caption + stop + pre_image
        room = self.window_tokens - len(self.post_ids) - len(self.caption_prefix_ids) - len(self.pre_ids) - 2
        return max(1, min(n, room))

    def prompt_ids(self, prompt: str | None) -> list[int]:
        t = self.gen.template
        text = t.prefix.format(prompt=t.default_prompt if prompt is None else prompt)
        return self.tokenizer.encode(text) + self.pre_ids

    def open(self, prompt: str | None = None, settings: SessionSettings | None = None) -> int:
        """Claim a free row, queue its prompt; returns the row. CapacityError when full."""
        try:
            row = self.rows.index(None)
        except ValueError:
            raise CapacityError(f"all {self.max_sessions} session slots are in use") from None
        settings = settings or SessionSettings()
        ids = self.prompt_ids(prompt)
        limit = self.max_prompt_tokens
        if len(ids) > limit:
            raise ValueError(f"prompt is {len(ids)} tokens; at most {limit} fit. Shorten the prompt.")
        self.state.reset(row)
        self.state.text.sink[row] = len(ids)  # the prompt is the attention sink: never evicted
        self.sampler.reset(row, self._params(settings))
        self.rows[row] = _Row(settings, self._max_new(settings), self.tokenizer.stream(), pending=ids)
        return row

    def close(self, row: int) -> None:
        """Free the row; its state is reset when it is next opened."""
        self.rows[row] = None

    def update(self, row: int, settings: SessionSettings) -> None:
        r = self._row(row)
        r.settings = settings
        r.max_new_tokens = self._max_new(settings)
        self.sampler.set_params(row, self._params(settings))

    def _row(self, row: int) -> _Row:
        r = self.rows[row]
        if r is None:
            raise KeyError(f"row {row} has no open session")
        return r

    def busy(self, row: int) -> bool:
        """True while a submitted frame is waiting or being captioned."""
        r = self._row(row)
        return r.frame_patches is not None or r.decoding

    def kv_tokens(self, row: int) -> int:
        return int(self.state.text.length[row])

    def row_has_work(self, row: int) -> bool:
        """True when the next step() will feed tokens for this row."""
        r = self.rows[row]
        return r is not None and bool(r.pending or r.frame_patches is not None or r.decoding)

    def has_work(self) -> bool:
        return any(self.row_has_work(i) for i in range(self.max_sessions))

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt (template included) that fits the first window and the cache sink."""
        return min(self.window_tokens, self.state.text.capacity // 2)

    def submit_frame(self, row: int, image: np.ndarray | torch.Tensor, deadline: float | None = None) -> int:
        """Queue a frame (H, W, 3) uint8 for captioning; returns its frame index in the session."""
        r = self._row(row)
        if self.busy(row):
            raise ValueError(
                f"row {row} is still captioning frame {r.frames - 1}; wait until busy() is False"
            )
        r.frame_patches = self.processor(image)
        r.frame_deadline = deadline
        return r.frames

    # ---- the batched step -------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One forward for every row with work; returns the caption tokens it produced."""
        feeds: dict[int, list[int | torch.Tensor]] = {}  # row -> items (token id or image token)
        sample_rows: list[int] = []
        starting: list[int] = []
        self.last_vision_seconds = 0.0
        for i, r in enumerate(self.rows):
            if r is None:
                continue
            if r.pending:  # prompt or close of the previous frame: no sampling
                feeds[i], r.pending = list(r.pending), []
            elif r.decoding:
                feeds[i] = [r.next_token]
                sample_rows.append(i)
            elif r.frame_patches is not None:
                starting.append(i)
                sample_rows.append(i)
        if starting:
            self._start_frames(starting, feeds)
        if not feeds:
            return []
        h = self._forward(feeds)
        if not sample_rows:
            return []
        # the last fed position: an inserted frame is one feed item but N positions
        last = torch.stack([h[i, _feed_length(feeds[i]) - 1] for i in sample_rows])
        no_stop = [len(self.rows[i].generated) < self.rows[i].settings.min_new_tokens for i in sample_rows]
        tokens = self.sampler.sample(sample_rows, self.model.lm.logits(last), no_stop)
        return [self._advance(i, tok) for i, tok in zip(sample_rows, tokens)]

    def _start_frames(self, rows: list[int], feeds: dict[int, list[int | torch.Tensor]]) -> None:
        patches = torch.stack([self.rows[i].frame_patches for i in rows]).to(self.device, self.dtype)
        t0 = time.perf_counter()
        image_tokens = self.model.encode_images(patches)  # (n, N, hidden)
        self.last_vision_seconds = time.perf_counter() - t0
        if not self.insertion:
            idx = torch.tensor(rows, device=self.device)
            self.model.lm.set_frame(idx, image_tokens, self.model.grid, self.state)
        for j, i in enumerate(rows):
            r = self.rows[i]
            post = self.post_ids + (self.caption_prefix_ids if r.frames == 0 else [])
            feeds[i] = ([image_tokens[j]] if self.insertion else []) + post
            r.frame_patches, r.decoding, r.generated = None, True, []
            r.frames += 1
            r.detok.reset()

    def _forward(self, feeds: dict[int, list[int | torch.Tensor]]) -> torch.Tensor:
        """Build the padded batch for rows [0, R) and run LanguageModel.step; returns hidden (R, T, D)."""
        lm = self.model.lm
        R = max(feeds) + 1
        lengths = {i: _feed_length(items) for i, items in feeds.items()}
        T = max(lengths.values())
        x = torch.zeros(R, T, lm.cfg.hidden, dtype=self.dtype, device=self.device)
        n_valid = torch.zeros(R, dtype=torch.long)
        sa_pos = torch.zeros(R, T, 3, dtype=torch.long)
        for i, items in feeds.items():
            n_valid[i] = lengths[i]
            if not self.insertion:
                self.state.text.make_room(i, lengths[i], lm.freqs)
            ids = [it for it in items if not isinstance(it, torch.Tensor)]
            emb = lm.embed_tokens(torch.tensor(ids, device=self.device)) if ids else None
            parts, k = [], 0
            for it in items:
                if isinstance(it, torch.Tensor):
                    parts.append(it)
                else:
                    parts.append(emb[k : k + 1])
                    k += 1
            x[i, : lengths[i]] = torch.cat(parts)
            if self.insertion:
                sa_pos[i, : lengths[i]] = self._insertion_positions(i, items)
        if not self.insertion:
            sa_pos = text_positions(self.state.text.length[:R], T)
        ca_pos = text_positions(self.state.casa.win_len[:R], T) if self.state.casa is not None else None
        return lm.step(
            x, n_valid, self.state, sa_pos.to(self.device), None if ca_pos is None else ca_pos.to(self.device)
        )

    def _insertion_positions(self, i: int, items: list[int | torch.Tensor]) -> torch.Tensor:
        """Absolute Qwen2.5-VL positions for the insertion baseline (see model/reference.py)."""
        r = self.rows[i]
        gh, gw = self.model.grid
        out = []
        for it in items:
            if isinstance(it, torch.Tensor):
                out.append(image_positions(torch.tensor([r.position]), (gh, gw))[0])
                r.position += max(gh, gw)
            else:
                out.append(torch.tensor([[r.position] * 3]))
                r.position += 1
        return torch.cat(out)

    def _advance(self, i: int, tok: int) -> TokenEvent:
        r = self.rows[i]
        frame = r.frames - 1
        self.sampler.observe(i, tok)
        if tok in self.stop_ids:
            self._finish(r, [tok])
            return TokenEvent(i, frame, None, "", done=True, reason="stop")
        r.generated.append(tok)
        text = r.detok.push(tok)
        reason = None
        if len(r.generated) >= r.max_new_tokens:
            reason = "length"
        elif r.frame_deadline is not None and time.monotonic() >= r.frame_deadline:
            reason = "deadline"
        if reason is not None:
            self._finish(r, [tok, self.stop_ids[0]])
            return TokenEvent(i, frame, tok, text, done=True, reason=reason)
        r.next_token = tok
        return TokenEvent(i, frame, tok, text)

    def _finish(self, r: _Row, tokens: list[int]) -> None:
        """End the frame: the stop token (and the next frame's pre-image tokens) go in next step."""
        r.decoding, r.next_token = False, None
        r.pending = tokens + self.pre_ids

    # ---- convenience ------------------------------------------------------------------------

    def caption(
        self, row: int, image: np.ndarray | torch.Tensor, deadline: float | None = None
    ) -> Iterator[TokenEvent]:
        """Caption one frame of one session, yielding its tokens (single-stream use: other rows'
        events produced meanwhile are dropped; the server drives step() itself)."""
        self.submit_frame(row, image, deadline)
        while True:
            for ev in self.step():
                if ev.row == row:
                    yield ev
                    if ev.done:
                        return


def _feed_length(items: list[int | torch.Tensor]) -> int:
    """Positions a row's feed takes: one per token id, N per inserted frame (N, hidden)."""
    return sum(it.shape[0] if isinstance(it, torch.Tensor) else 1 for it in items)
