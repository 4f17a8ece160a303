"""The streaming engine: many sessions, one batched step, Kyutai's per-frame procedure.

Three parts, one file each:
- model/scheduler.py: every session row's state machine (plain Python) and the plan of one tick;
- model/runner.py: executes a plan with static shapes (frames, varlen prefill, the fixed-shape
  decode step of model/decode.py, optionally compiled) and returns logits and timings;
- model/vision_pipeline.py: optional; frames are preprocessed and encoded on their own thread.
The Engine joins them with the sampler (model/sampling.py) and turns sampled tokens into
TokenEvents. Sessions are batch rows of a preallocated StreamState.

Observers (`engine.observers`, called with each tick's StepResult) see what was fed and, with
`engine.record_logits = True`, the logits of every fed token: that is how the tests compare
streaming with the dense reference.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from casa_live.model.cache import CASAState, InsertionSpans, StreamState, TextCache
from casa_live.model.config import DEFAULT_CONTEXT_TOKENS, GenerationConfig
from casa_live.model.engine.runner import Runner, StepResult
from casa_live.model.engine.sampling import Sampler, SamplingParams
from casa_live.model.engine.scheduler import (
    MIN_TEMPERATURE,
    SETTING_BOUNDS,
    Plan,
    RowState,
    Scheduler,
    SessionSettings,
)
from casa_live.model.engine.vision_pipeline import Encoding, VisionPipeline
from casa_live.model.processor import ImageProcessor, QwenImageProcessor
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel

__all__ = [
    "MIN_TEMPERATURE",
    "SETTING_BOUNDS",
    "CapacityError",
    "Engine",
    "SessionSettings",
    "StepResult",
    "TokenEvent",
]


class CapacityError(RuntimeError):
    """Every batch row is taken."""


@dataclass
class TokenEvent:
    row: int
    frame: int  # index of the frame being captioned in this session
    token: int | None  # the emitted caption token; None on a final event that carries no token
    text: str  # decoded text delta
    done: bool = False
    reason: str | None = None  # when done: "stop" | "length" | "deadline" | "error"


class Engine:
    def __init__(
        self,
        model: CASAModel,
        tokenizer: Tokenizer,
        gen: GenerationConfig,
        max_sessions: int = 16,
        max_context_tokens: int | None = None,
        window_tokens: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        vision_thread: bool = False,
        prefill_min: int = 8,
        max_pixels: int | None = None,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.lm.fuse_projections()
        self.model.vision.fuse()
        self.tokenizer, self.gen = tokenizer, gen
        self.device, self.dtype = torch.device(device), dtype
        cfg = model.config
        # Qwen-family models keep the frame's aspect ratio within a pixel budget (max_pixels; None:
        # image_size^2), so frames have varying image-token counts; the bundled model is square
        self.processor: ImageProcessor | QwenImageProcessor = (
            QwenImageProcessor.for_config(cfg, image_size=None, max_pixels=max_pixels)
            if cfg.processor == "qwen"
            else ImageProcessor.for_config(cfg)
        )
        self.image_size = cfg.image_size
        self.insertion = cfg.casa.fusion == "insertion"
        self.max_sessions = max_sessions
        lm = cfg.lm
        # the caller's bound, else the checkpoint's (generation_config.json "context_tokens")
        self.max_context_tokens = max_context_tokens or gen.context_tokens or DEFAULT_CONTEXT_TOKENS
        self.state = StreamState(
            TextCache(
                lm.layers, max_sessions, lm.kv_heads, lm.head_dim, self.max_context_tokens, dtype, device
            ),
            None
            if self.insertion
            else CASAState(
                len(model.lm.casa_ids),
                max_sessions,
                lm.kv_heads,
                lm.head_dim,
                self.processor.max_tokens,  # the largest frame the pixel budget allows
                window_tokens,
                dtype,
                device,
            ),
            InsertionSpans(max_sessions) if self.insertion else None,
        )
        self.stop_ids = [tokenizer.token_id(t) for t in gen.stop_tokens]
        t = gen.template
        # a checkpoint may name its frame delimiters as token ids (model/hf/config.py)
        self.pre_ids = list(t.pre_image_ids) if t.pre_image_ids is not None else tokenizer.encode(t.pre_image)
        self.post_ids = (
            list(t.post_image_ids) if t.post_image_ids is not None else tokenizer.encode(t.post_image)
        )
        self.caption_prefix_ids = tokenizer.encode(t.caption_prefix)
        if not self.insertion and not self.post_ids:
            # the first caption token is sampled at the first position that sees the frame
            raise ValueError("the template needs post_image tokens after the frame (e.g. <|vision_end|>)")
        self.window_tokens = window_tokens
        self.sampler = Sampler(max_sessions, lm.vocab, self.stop_ids)
        self.scheduler = Scheduler(max_sessions, prefill_min)
        self.runner = Runner(self.model, self.state, max_sessions, compile=compile)
        self.observers: list[Callable[[StepResult], None]] = []
        self.last_result = StepResult()
        self._tickets = itertools.count(1)
        self._failed: list[TokenEvent] = []  # frames whose encoding failed, reported at the next step
        # one intra-op thread for the vision thread: with the decode thread it fills two cores
        self.pipeline = VisionPipeline(self._encode_frames, threads=1) if vision_thread else None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw
    ) -> Engine:
        from casa_live.model.checkpoint.load import load as load_checkpoint

        model, tok, gen = load_checkpoint(path, device, dtype)
        return cls(model, tok, gen, device=device, dtype=dtype, **kw)

    @property
    def rows(self) -> list[RowState | None]:
        return self.scheduler.rows

    @property
    def record_logits(self) -> bool:
        return self.runner.record

    @record_logits.setter
    def record_logits(self, value: bool) -> None:
        self.runner.record = value

    @property
    def last_vision_seconds(self) -> float:
        """Seconds the last step() spent in the vision tower (0.0 when it started no frame); with
        the vision pipeline, the encode time of the frames that started in that step."""
        return self.last_result.vision_s

    def set_frame_ready_callback(self, fn: Callable[[], None] | None) -> None:
        """Called on the vision thread when encoded frames are ready (the server wakes its worker)."""
        if self.pipeline is not None:
            self.pipeline.notify = fn

    def shutdown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()

    def warmup(self) -> None:
        """Run every decode bucket once (compiles them when compiled); touches only scratch slots."""
        self.runner.warmup()

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
            top_p=g.top_p if s.top_p is None else s.top_p,
            eos_bias=g.eos_bias if s.eos_bias is None else s.eos_bias,
            counts=g.penalty_counts,
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
        row = self.scheduler.free_row()
        if row is None:
            raise CapacityError(f"all {self.max_sessions} session slots are in use")
        settings = settings or SessionSettings()
        ids = self.prompt_ids(prompt)
        limit = self.max_prompt_tokens
        if len(ids) > limit:
            raise ValueError(f"prompt is {len(ids)} tokens; at most {limit} fit. Shorten the prompt.")
        self.state.reset(row)
        self.state.text.sink[row] = len(ids)  # the prompt is the attention sink: never evicted
        self.runner.positions[row] = 0
        self.sampler.reset(row, self._params(settings))
        self.rows[row] = RowState(
            settings,
            self._max_new(settings),
            self.tokenizer.stream(),
            forced=collections.deque(ids),
            prefill_forced=True,
        )
        return row

    def close(self, row: int) -> None:
        """Free the row; its state is reset when it is next opened."""
        self.rows[row] = None

    def update(self, row: int, settings: SessionSettings) -> None:
        r = self._row(row)
        r.settings = settings
        r.max_new_tokens = self._max_new(settings)
        self.sampler.set_params(row, self._params(settings))

    def _row(self, row: int) -> RowState:
        r = self.rows[row]
        if r is None:
            raise KeyError(f"row {row} has no open session")
        return r

    def busy(self, row: int) -> bool:
        """True while a submitted frame is waiting or being captioned."""
        return self._row(row).busy

    def kv_tokens(self, row: int) -> int:
        return int(self.state.text.length[row])

    def row_has_work(self, row: int) -> bool:
        """True when the next step() will feed tokens for this row (a frame still in the vision
        pipeline is not work yet: the pipeline's callback says when it is)."""
        return self.scheduler.has_work(row, self._frame_ready(row))

    def has_work(self) -> bool:
        self._collect_vision()
        return any(self.row_has_work(i) for i in range(self.max_sessions))

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt (template included) that fits the first window and the cache sink."""
        return min(self.window_tokens, self.state.text.capacity // 2)

    def submit_frame(self, row: int, image: np.ndarray | torch.Tensor, deadline: float | None = None) -> int:
        """Queue a frame (H, W, 3) uint8 for captioning; returns its frame index in the session."""
        r = self._row(row)
        if r.busy:
            raise ValueError(
                f"row {row} is still captioning frame {r.frames - 1}; wait until busy() is False"
            )
        shape = tuple(image.shape)
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {shape}")
        r.frame_deadline = deadline
        r.frame_ticket = next(self._tickets)
        r.image_tokens = r.frame_kv = None
        if self.pipeline is not None:  # preprocessed and encoded on the vision thread
            self.pipeline.submit(row, r.frame_ticket, image)
        else:
            r.frame_patches, r.frame_grid = self.processor.process(image)
        r.frame_waiting = True
        return r.frames

    # ---- frames -----------------------------------------------------------------------------

    def _encode_frames(self, images: list) -> list[Encoding]:
        """Vision thread: preprocess and encode frames; per frame its image tokens (N, hidden),
        CASA K/V ((Lc, Hkv, N, D) x 2) and patch grid."""
        return self._encode_patches([self.processor.process(im) for im in images])

    def _encode_patches(self, frames: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[Encoding]:
        """Encode (patches, patch grid) per frame, one vision batch per grid (a camera's frames
        all share one, so batching is kept; aspect-preserving resizes make grids differ)."""
        out: list[Encoding | None] = [None] * len(frames)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (_, grid) in enumerate(frames):
            groups.setdefault(grid, []).append(j)
        for grid, idx in groups.items():
            tokens, kv = self.runner.encode(torch.stack([frames[j][0] for j in idx]), grid)
            for n, j in enumerate(idx):
                out[j] = (tokens[n], None if kv is None else (kv[0][:, n], kv[1][:, n]), grid)
        return out  # type: ignore[return-value]

    def _frame_ready(self, row: int) -> bool:
        r = self.rows[row]
        return r is not None and r.frame_waiting and (self.pipeline is None or r.image_tokens is not None)

    def _collect_vision(self) -> None:
        """Attach finished encodings to their rows; a failed one ends its frame with an error
        event, reported at the next step."""
        if self.pipeline is None:
            return
        failed = []
        for enc in self.pipeline.take():
            r = self.rows[enc.row]
            if r is None or r.frame_ticket != enc.ticket or not r.frame_waiting:
                continue  # the row was closed or reopened meanwhile
            if enc.tokens is None:
                r.frame_waiting = False
                failed.append(TokenEvent(enc.row, r.frames, None, "", done=True, reason="error"))
                r.frames += 1
                continue
            r.image_tokens, r.frame_kv, r.frame_grid = enc.tokens, enc.kv, enc.grid
            r.vision_s = enc.seconds
        self._failed.extend(failed)

    def _start_frames(self, plan: Plan, res: StepResult) -> None:
        rows = plan.frames
        if self.pipeline is None:
            t0 = time.perf_counter()
            enc = self._encode_patches([(self.rows[i].frame_patches, self.rows[i].frame_grid) for i in rows])
            res.vision_s = time.perf_counter() - t0
            res.frame_vision_s = [res.vision_s / len(rows)] * len(rows)
            for i, (tok, kv, _) in zip(rows, enc):
                self.rows[i].image_tokens, self.rows[i].frame_kv = tok, kv
        else:
            res.frame_vision_s = [self.rows[i].vision_s for i in rows]
            res.vision_s = sum(res.frame_vision_s)
        tokens = [self.rows[i].image_tokens for i in rows]
        if not self.insertion:  # one write per image-token count (frames of one grid share it)
            by_n: dict[int, list[int]] = {}
            for j, i in enumerate(rows):
                by_n.setdefault(tokens[j].shape[0], []).append(i)
            for group in by_n.values():
                kv = tuple(torch.stack([self.rows[i].frame_kv[s] for i in group], dim=1) for s in (0, 1))
                self.runner.start_frames(group, kv)
        for j, i in enumerate(rows):
            r = self.rows[i]
            self.runner.grids[i] = self._merged(r.frame_grid)
            res.frames[i] = tokens[j]
            post = self.post_ids + (self.caption_prefix_ids if r.frames == 0 else [])
            r.forced.extend(([tokens[j]] if self.insertion else []) + post)
            r.sample_after_forced = True
            r.frame_patches = r.image_tokens = r.frame_kv = None
            r.frame_waiting = False
            r.decoding, r.generated = True, []
            r.frames += 1
            r.detok.reset()
            self.scheduler.assign(plan, i)

    def _merged(self, patch_grid: tuple[int, int] | None) -> tuple[int, int]:
        """Image-token grid of a frame from its patch grid (the model's default when unknown)."""
        if patch_grid is None:
            return self.model.grid
        m = self.model.config.vision.merge
        return patch_grid[0] // m, patch_grid[1] // m

    # ---- the batched step -------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One tick for every row with work; returns the caption tokens it produced. Inference
        mode, not just no_grad: no version counters or view tracking, 5-10% of a CPU decode step
        at small batches (where the step is bound by op dispatch, docs/engine.md). The caches are ordinary tensors
        updated in place, which inference mode allows."""
        self._collect_vision()
        events, self._failed = list(self._failed), []
        ready = (
            None if self.pipeline is None else {i for i in range(self.max_sessions) if self._frame_ready(i)}
        )
        plan = self.scheduler.plan(ready)
        res = StepResult()
        if plan.frames:
            self._start_frames(plan, res)
        if plan.empty():
            self.last_result = res
            if not events and self.pipeline is not None and self.pipeline.pending:
                self.pipeline.wait(1.0)  # single-stream use: nothing to do until a frame is encoded
            return events
        self.runner.run(plan.prefill, plan.decode, plan.sample, res)
        self.last_result = res
        for fn in self.observers:
            fn(res)
        rows = [i for i in plan.sample if i in res.sample_logits]
        if any(p.counts == "fed" for p in self.sampler.params):
            self._feed_sampler(plan, rows)
        if not rows:
            return events
        logits = torch.stack([res.sample_logits[i] for i in rows])
        no_stop = [len(self.rows[i].generated) < self.rows[i].settings.min_new_tokens for i in rows]
        tokens = self.sampler.sample(rows, logits, no_stop)
        self.sampler.observe_many(rows, tokens)
        return events + [self._advance(i, tok) for i, tok in zip(rows, tokens)]

    def _feed_sampler(self, plan: Plan, sampled: list[int]) -> None:
        """Rows whose sampler counts fed tokens (SamplingParams.counts == "fed"): every text token
        this tick fed joins their n-gram history, and each row about to be sampled is charged the
        token fed at its sampled position."""
        fed = {i for i in (*plan.prefill, *plan.decode) if self.sampler.params[i].counts == "fed"}
        for i in fed:
            items = plan.prefill.get(i, [])
            tokens = [t for t in items if isinstance(t, int)]
            self.sampler.feed(i, tokens + ([plan.decode[i]] if i in plan.decode else []))
        charged = [i for i in sampled if i in fed]
        last = [plan.decode[i] if i in plan.decode else plan.prefill[i][-1] for i in charged]
        self.sampler.charge(charged, [t if isinstance(t, int) else None for t in last])

    def _advance(self, i: int, tok: int) -> TokenEvent:
        r = self.rows[i]
        frame = r.frames - 1
        if tok in self.stop_ids:
            r.last_stop = tok
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
            self._finish(r, self._cut_close(r, tok))
            return TokenEvent(i, frame, tok, text, done=True, reason=reason)
        r.next_token = tok
        return TokenEvent(i, frame, tok, text)

    def _cut_close(self, r: RowState, tok: int) -> list[int]:
        """What closes a caption cut short by max_new_tokens or the deadline (docs/engine.md):
        "last_stop" (Kyutai's procedure) feeds the stop token the model itself emitted most
        recently in this session (the first stop id before it has emitted any) and not the cut
        word; "cut_word" feeds the cut word, then the first stop id."""
        mode = r.settings.truncated_close or self.gen.truncated_close
        if mode == "cut_word":
            return [tok, self.stop_ids[0]]
        return [self.stop_ids[0] if r.last_stop is None else r.last_stop]

    def _finish(self, r: RowState, tokens: list[int]) -> None:
        """End the frame: the stop token (and the next frame's pre-image tokens) are forced next."""
        r.decoding, r.next_token = False, None
        r.forced.extend(tokens + self.pre_ids)

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
