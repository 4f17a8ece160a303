"""The streaming engine: many sessions, one batched step, Kyutai's per-frame procedure.

Its parts, one file each:
- model/engine/scheduler.py: owns every session row's lifecycle (plain Python) and plans each tick;
- model/engine/runner.py: executes a plan with static shapes (frames, varlen prefill, the
  fixed-shape decode step of model/decode.py, optionally compiled) and returns logits and timings;
  it owns tensors only;
- model/engine/sampling.py: per-row sampling;
- model/engine/vision_pipeline.py: optional; frames are preprocessed and encoded on their own thread.
The Engine coordinates them: a tick collects finished encodings, plans, runs the plan, samples,
and hands the sampled tokens back to the scheduler, which turns them into TokenEvents. Sessions are
batch rows of a preallocated StreamState (model/cache.py).

Threads: the Engine starts its vision thread (when asked for one) and stops it in `shutdown()`.
Every other method is called from one thread, the caller's (the server's inference worker).

Observers (`engine.observers`, called with each tick's StepResult) see what was fed and, with
`engine.record_logits = True`, the logits of every fed token: that is how the tests compare
streaming with the dense reference.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from casa_live.model.cache import StreamState
from casa_live.model.config import DEFAULT_CONTEXT_TOKENS, GenerationConfig
from casa_live.model.engine.runner import Runner, StepResult, pack_tree
from casa_live.model.engine.sampling import Sampler, SamplingParams, params_for
from casa_live.model.engine.scheduler import CapacityError, Plan, Scheduler, ScoreEvent, Template, TokenEvent
from casa_live.model.engine.settings import SessionSettings
from casa_live.model.engine.vision_pipeline import FrameEncoder, VisionPipeline, collect_encodings
from casa_live.model.processor import ImageProcessor, QwenImageProcessor
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel

__all__ = [
    "CapacityError",
    "Engine",
    "ScoreEvent",
    "SessionSettings",
    "StepFailed",
    "StepResult",
    "TokenEvent",
]

MAX_WATCHES = 8  # per session (docs/protocol.md)


class StepFailed(RuntimeError):
    """A tick raised: the rows that took part (their frames or feeds) have an unknown state and
    must be reset; every other row is untouched. The cause is chained."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"the engine step failed for rows {rows}")
        self.rows = rows


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
        branch_rows: int = 4,
        watch_tokens: int = 128,
    ) -> None:
        """max_sessions rows for sessions, and `branch_rows` more for question branches;
        `watch_tokens`: the most tokens a row's watches take once packed (their shared prefix
        once, then each one's rest), the room the caches keep past every row for scoring."""
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
        rows = max_sessions + branch_rows
        lm = cfg.lm
        # the caller's bound, else the checkpoint's (generation_config.json "context_tokens")
        self.max_context_tokens = max_context_tokens or gen.context_tokens or DEFAULT_CONTEXT_TOKENS
        self.state = StreamState.allocate(
            lm, rows, self.max_context_tokens, len(model.lm.casa_ids), self.processor.max_tokens,
            window_tokens, insertion=self.insertion, dtype=dtype, device=device, score_slots=watch_tokens,
        )  # fmt: skip
        self.watch_tokens = watch_tokens
        self.template = Template.resolve(gen, tokenizer, self.insertion)
        if not self.insertion and not self.template.post:
            # the first caption token is sampled at the first position that sees the frame
            raise ValueError("the template needs post_image tokens after the frame (e.g. <|vision_end|>)")
        self.window_tokens = window_tokens
        self.sampler = Sampler(rows, lm.vocab, self.template.stop)
        self.scheduler = Scheduler(rows, self.template, window_tokens, gen, prefill_min, branch_rows)
        self.runner = Runner(self.model, self.state, rows, compile=compile)
        if gen.template.question is not None and self.template.yes and self.template.no:
            self.runner.yes_no = (self.template.yes, self.template.no)
        self.observers: list[Callable[[StepResult], None]] = []
        self.last_result = StepResult()
        self._tickets = itertools.count(1)
        self.frames = FrameEncoder(self.processor, self.runner.encode, cfg.vision.merge)
        # one intra-op thread for the vision thread: with the decode thread it fills two cores
        self.pipeline = VisionPipeline(self.frames.encode_images, threads=1) if vision_thread else None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw
    ) -> Engine:
        from casa_live.model.checkpoint.load import load as load_checkpoint

        model, tok, gen = load_checkpoint(path, device, dtype)
        return cls(model, tok, gen, device=device, dtype=dtype, **kw)

    @property
    def record_logits(self) -> bool:
        return self.runner.record

    @record_logits.setter
    def record_logits(self, value: bool) -> None:
        self.runner.record = value

    def set_frame_ready_callback(self, fn: Callable[[], None] | None) -> None:
        """Called on the vision thread when encoded frames are ready (the server wakes its worker)."""
        if self.pipeline is not None:
            self.pipeline.notify = fn

    def shutdown(self) -> None:
        """Stop the vision thread this engine started (if any)."""
        if self.pipeline is not None:
            self.pipeline.stop()

    def warmup(self) -> None:
        """Run every decode bucket once (compiles them when compiled); touches only scratch slots."""
        self.runner.warmup()

    # ---- sessions ---------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None) -> list[int]:
        t = self.gen.template
        text = t.prefix.format(prompt=t.default_prompt if prompt is None else prompt)
        return self.tokenizer.encode(text) + self.template.pre

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt (template included) that fits the first window and the cache sink."""
        return min(self.window_tokens, self.state.text.capacity // 2)

    def open(self, prompt: str | None = None, settings: SessionSettings | None = None) -> int:
        """Claim a free row, queue its prompt; returns the row. CapacityError when full."""
        settings = settings or SessionSettings()
        ids = self.prompt_ids(prompt)
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(ids)} tokens; at most {self.max_prompt_tokens} fit. Shorten the prompt."
            )
        row = self.scheduler.open(ids, settings, self.tokenizer.stream())
        self._fresh(row, len(ids), settings)
        return row

    def _fresh(self, row: int, prompt_tokens: int, settings: SessionSettings) -> None:
        """Everything the row owns starts afresh: its caches (the prompt is the attention sink,
        never evicted) and its sampler."""
        self.state.reset(row, sink=prompt_tokens)
        self.sampler.reset(row, params_for(self.gen, settings))

    def close(self, row: int) -> None:
        """Free the row; its state is reset when it is next opened."""
        self.scheduler.close(row)

    def restart(self, row: int, prompt: str | None = None) -> None:
        """Start an idle row's stream over, in place: what a fresh `open(prompt)` would hold (its
        caches, sampler and detokenizer afresh, the prompt queued), with its settings, watches and
        frame numbering kept. The next frame's caption is then a stream's first: a model whose
        captions narrate changes restates the scene (GenerationConfig.restate_after_gap, used by
        the server after a gap in a live stream). ValueError: the row is busy or a branch."""
        ids = self.prompt_ids(prompt)
        self.scheduler.restart(row, ids, self.tokenizer.stream())
        self._fresh(row, len(ids), self.scheduler.row(row).settings)

    def update(self, row: int, settings: SessionSettings) -> None:
        self.scheduler.update(row, settings)
        self.sampler.set_params(row, params_for(self.gen, settings))

    def ask(self, row: int, question: str, max_new_tokens: int | None = None) -> tuple[int, int]:
        """Answer a question about `row`'s current frame on a side branch (docs/engine.md): the row's
        state at the frame's start (its image, the text before its caption) is copied into a branch
        row, which is fed the question and decodes the answer in the batched steps, beside the
        frame's caption if that is still going. Returns the branch row (its TokenEvents are the
        answer; freed when it ends) and the frame the answer sees. ValueError: no question
        template, the row cannot branch now (`can_ask`), or the question does not fit;
        CapacityError: no branch row is free."""
        form = self.gen.template.question
        if form is None:
            raise ValueError(
                "this model answers no questions (its generation config has no question template)"
            )
        fed = self.tokenizer.encode(form.format(question=question))
        room = self.window_tokens - len(fed) - 1  # the branch's window starts empty (copy_row)
        if room < 1:
            raise ValueError(
                f"the question is {len(fed)} tokens; it does not fit the model's window. Shorten it."
            )
        settings = SessionSettings(max_new_tokens=max_new_tokens, temperature=0.0)
        branch = self.scheduler.branch(
            row, fed, settings, self.tokenizer.stream(self.gen.template.answer_prefix), room
        )
        self.state.copy_row(row, branch)
        self.sampler.reset(branch, SamplingParams(temperature=0.0))  # answers are greedy, unpenalised
        frame = self.scheduler.row(branch).seen
        assert frame is not None
        return branch, frame

    def set_watches(self, row: int, questions: list[str]) -> None:
        """Score these yes/no questions on each of `row`'s frames from now on (replacing any
        before; [] stops): once each frame has started (token insertion: once its caption closes),
        every question is fed on a branch of the row in one forward with no decoding, and a
        ScoreEvent gives P(yes) / (P(yes) + P(no)) per question (docs/engine.md, "Watches").
        ValueError: the model answers no questions, or the questions do not fit `watch_tokens`."""
        if questions and self.runner.yes_no is None:
            raise ValueError(
                "this model cannot score watches (its generation config has no question template, "
                "or its tokenizer has no distinct first tokens for yes and no)"
            )
        if len(questions) > MAX_WATCHES:
            raise ValueError(f"{len(questions)} watches; at most {MAX_WATCHES} a session")
        form = self.gen.template.question
        fed = [self.tokenizer.encode(form.format(question=q)) for q in questions] if form else []
        if any(not f for f in fed):
            raise ValueError("a watch's question is empty")
        if fed and (n := len(pack_tree(fed).ids)) > self.watch_tokens:
            raise ValueError(
                f"the watches' questions take {n} tokens together; at most {self.watch_tokens} fit. "
                "Shorten them or set fewer."
            )
        self.scheduler.set_watches(row, fed)

    def can_ask(self, row: int) -> bool:
        """A frame has started on the row (token insertion: and its caption is closed) and a branch
        row is free: `ask` would start now."""
        return self.scheduler.can_branch(row) and self.scheduler.free_branch_row() is not None

    def busy(self, row: int) -> bool:
        """True while a submitted frame is waiting or being captioned."""
        return self.scheduler.row(row).busy

    def kv_tokens(self, row: int) -> int:
        return int(self.state.text.length[row])

    def free_rows(self) -> int:
        return self.scheduler.free_rows()

    def row_has_work(self, row: int) -> bool:
        """True when the next step() will feed tokens for this row (a frame still in the vision
        pipeline is not work yet: the pipeline's callback says when it is)."""
        return self.scheduler.has_work(row)

    def help_vision(self) -> bool:
        """Encode one batch of the vision thread's queued frames on the calling thread (the
        decode thread, when it has nothing to step); returns whether it encoded any."""
        return self.pipeline is not None and self.pipeline.help()

    def vision_backlog(self) -> int:
        """Frames waiting for the vision thread that no thread has taken yet."""
        return 0 if self.pipeline is None else self.pipeline.queued

    @property
    def vision_batch(self) -> int:
        """The most frames one vision batch takes."""
        return 0 if self.pipeline is None else self.pipeline.max_batch

    def has_work(self) -> bool:
        """True when a step() now would do something: feed a row, or collect encoded frames."""
        return self.scheduler.has_work() or (self.pipeline is not None and self.pipeline.has_results)

    def submit_frame(self, row: int, image: np.ndarray | torch.Tensor, deadline: float | None = None) -> int:
        """Queue a frame (H, W, 3) uint8 for captioning; returns its frame index in the session."""
        shape = tuple(image.shape)
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {shape}")
        ticket = next(self._tickets)
        if self.pipeline is not None:  # preprocessed and encoded on the vision thread
            index = self.scheduler.submit(row, ticket, deadline)
            self.pipeline.submit(row, ticket, image)
            return index
        patches, grid = self.frames.process(image)
        return self.scheduler.submit(row, ticket, deadline, patches, grid)

    # ---- the batched step -------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent | ScoreEvent]:
        """One tick for every row with work; returns the caption (and answer) tokens it produced,
        and the watch scores of the frames it scored (ScoreEvent, only for rows with watches). Inference
        mode, not just no_grad: no version counters or view tracking, 5-10% of a CPU decode step
        at small batches (where the step is bound by op dispatch, docs/engine.md). The caches are
        ordinary tensors updated in place, which inference mode allows."""
        self.last_result = res = StepResult()
        involved: set[int] = set()  # the rows this tick touches
        try:
            events = collect_encodings(self.scheduler, self.frames, self.pipeline, involved)
            plan = self.scheduler.plan()
            involved.update(f.row for f in plan.frames)
            involved.update(plan.prefill, plan.decode, plan.score)
            if plan.empty():
                if not events and self.pipeline is not None and self.pipeline.pending:
                    self.pipeline.wait(1.0)  # single-stream use: nothing to do until a frame is encoded
                return events
            return events + self._run(plan, res)
        except Exception as exc:
            raise StepFailed(sorted(involved)) from exc

    def _run(self, plan: Plan, res: StepResult) -> list[TokenEvent | ScoreEvent]:
        """Execute a plan, sample, and hand the sampled tokens back to the scheduler."""
        self.runner.run(plan, res)
        for fn in self.observers:
            fn(res)
        scored: list[TokenEvent | ScoreEvent] = [
            ScoreEvent(i, frame, res.scores[i]) for i, (frame, _) in plan.score.items()
        ]
        rows = [i for i in plan.sample if i in res.sample_logits]
        if any(p.counts == "fed" for p in self.sampler.params):
            # a prompt copied from the prefix cache counts as fed, as if prefilled
            prefill = {**plan.prefill, **{i: list(key) for i, key in plan.restore.items()}}
            self.sampler.feed_plan(prefill, plan.decode, rows)
        if not rows:
            return scored
        logits = torch.stack([res.sample_logits[i] for i in rows])
        tokens = self.sampler.sample(rows, logits, self.scheduler.stop_banned(rows))
        self.sampler.observe_many(rows, tokens)
        return scored + self.scheduler.update_from_output(rows, tokens, time.monotonic())

    # ---- convenience ------------------------------------------------------------------------

    def caption(
        self, row: int, image: np.ndarray | torch.Tensor, deadline: float | None = None
    ) -> Iterator[TokenEvent]:
        """Caption one frame of one session, yielding its tokens (single-stream use: other rows'
        events produced meanwhile are dropped; the server drives step() itself)."""
        self.submit_frame(row, image, deadline)
        while True:
            for ev in self.step():
                if isinstance(ev, TokenEvent) and ev.row == row:
                    yield ev
                    if ev.done:
                        return
