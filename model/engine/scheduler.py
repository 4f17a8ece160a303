"""The scheduler: owns every session row's lifecycle, in plain Python, and plans each tick.

The whole stream is one never-ending assistant turn (Kyutai's live-captioning procedure):
- open:  force template.prefix(prompt) + pre_image into the image-less first window;
- frame: the frame's image tokens start a new CASA window; force post_image (+ caption_prefix on
         frame 0), then sample until a stop token, max_new_tokens, or the frame's deadline;
- close: force the emitted stop token (or, when cut short, the stop token the model emitted last, or
         with `truncated_close="cut_word"` the cut token and the first stop token) and the next
         frame's pre_image tokens, in the window that is ending.

Every row transition happens here and nowhere else: `open`, `close`, `update`, `submit` (a frame
is queued), `encoded` (its image tokens are ready, or failed), `plan` (frames start, feeds are
assigned), `update_from_output` (sampled tokens advance rows, captions finish). The engine
(model/engine/engine.py) calls these in order; the runner executes the plans and owns only tensors.
Nothing here touches a tensor's values, so the tests drive row lifecycles without a model
(tests/test_scheduler.py).

Each tick `plan()` says, for every row with work, what the runner feeds it:
- `frames`: rows whose frame starts this tick (their image K/V is written before the forward);
- `decode`: one token in the fixed-shape batched step (model/decode.py). Sampled tokens and short
  forced runs (the close, the one-token post_image, a cut caption's close) go this way, one token
  a tick: a token costs the batched step a fraction of a row, where a second (varlen) forward
  costs a whole eager step, which under load turns into a cycle (more cut captions, more
  prefills);
- `prefill`: a run of >= `prefill_min` forced items, a question on a branch row, an inserted frame
  (the token-insertion baseline), or the prompt at open when no other row has work, in one varlen
  forward: the prompt must be in before frame 0 can start, so a lone session does not feed it a
  token a tick. A short prompt opened while other rows work goes through the batched step like any
  short forced run: sessions that open in a burst (a server restart, a camera fleet reconnecting)
  would otherwise cost an eager step each while every running session waits (docs/engine.md);
- `sample`: rows whose last fed position is sampled;
- `score`: rows whose watches are scored this tick, before any frame starts. A CASA row may be
  scored any time after its frame has started, whatever its caption has reached: the questions see
  the state a branch forks from (docs/engine.md, "Questions"). A token-insertion row holds its frame
  in its text, so it is scored once its caption is closed. Rows wait a little to be scored together
  (`_score_now`).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from casa_live.model.engine.settings import SessionSettings, effective

if TYPE_CHECKING:
    import torch


class CapacityError(RuntimeError):
    """Every batch row is taken."""


class Detokenizer(Protocol):
    """Turns a caption's tokens into text deltas (model/tokenizer.py StreamDecoder)."""

    def push(self, token: int) -> str: ...
    def reset(self) -> None: ...


@dataclass
class Template:
    """The token ids of the per-frame procedure, resolved once from the generation config."""

    pre: list[int]  # before each frame's image (after the prompt, and after each caption's close)
    post: list[int]  # after each frame's image; the caption's first token is sampled at its last
    caption_prefix: list[int]  # after frame 0's post tokens (e.g. "This video shows")
    stop: list[int]  # tokens that end a caption
    insertion: bool = False  # token insertion: the image tokens are fed in the text stream
    # first tokens of the answers "yes" and "no" (and their capitalised forms): a watch's score
    # weighs one set against the other (docs/engine.md, "Watches")
    yes: list[int] = field(default_factory=list)
    no: list[int] = field(default_factory=list)

    @classmethod
    def resolve(cls, gen: Any, tokenizer: Any, insertion: bool) -> Template:
        """From a GenerationConfig's template and stop tokens; a checkpoint may name its frame
        delimiters as token ids (model/checkpoint/hf/config.py)."""
        t = gen.template
        return cls(
            pre=list(t.pre_image_ids) if t.pre_image_ids is not None else tokenizer.encode(t.pre_image),
            post=list(t.post_image_ids) if t.post_image_ids is not None else tokenizer.encode(t.post_image),
            caption_prefix=tokenizer.encode(t.caption_prefix),
            stop=[tokenizer.token_id(s) for s in gen.stop_tokens],
            insertion=insertion,
            **answer_ids(tokenizer, t.answer_prefix),
        )


def answer_ids(tokenizer: Any, prefix: str = "") -> dict[str, list[int]]:
    """{"yes": ids, "no": ids}: the first token of each of "yes", "Yes", "YES" (and of "no"...),
    each after the model's answer prefix (PromptTemplate.answer_prefix), those that begin both
    answers left out. The first token decides a yes/no answer: a model that answers "yes" has put
    its weight on the first token of "yes" (with a byte-level BPE that may be just "y", so the
    score is P(first token), docs/engine.md)."""
    first = {
        word: {
            ids[0] for v in (word, word.capitalize(), word.upper()) if (ids := tokenizer.encode(prefix + v))
        }
        for word in ("yes", "no")
    }
    both = first["yes"] & first["no"]
    return {word: sorted(ids - both) for word, ids in first.items()}


@dataclass
class FrameEncoding:
    """What the vision tower made of one frame."""

    tokens: torch.Tensor  # image tokens (N, hidden)
    kv: tuple[torch.Tensor, torch.Tensor] | None  # CASA image K/V (Lc, Hkv, N, D) x 2; None for insertion
    grid: tuple[int, int]  # image-token grid (gh, gw), gh * gw = N
    seconds: float = 0.0  # this frame's share of its vision batch


@dataclass
class InsertedFrame:
    """A feed item of token-insertion models: a frame's image tokens in the text stream."""

    tokens: torch.Tensor  # (N, hidden)
    grid: tuple[int, int]  # image-token grid (gh, gw): it sets the items' Qwen positions


Item = int | InsertedFrame  # a token id, or an inserted frame


@dataclass
class PendingFrame:
    """A submitted frame that has not started."""

    ticket: int  # which submission this is (a late vision result for an older one is ignored)
    deadline: float | None  # time.monotonic() after which its caption is cut
    patches: torch.Tensor | None = None  # preprocessed (P, C*p*p) when encoded at the step (no pipeline)
    patch_grid: tuple[int, int] | None = None
    encoding: FrameEncoding | None = None  # set by `encoded`; the frame can start


# prompts whose K/V the prefix cache keeps (Scheduler.prefixes): a few distinct prompts serve most
# fleets (the default one above all); each is at most a window of tokens
PREFIX_CACHE = 8
# Watch scoring waits to batch rows (Scheduler._score_now): at most this many rows, this long.
SCORE_BATCH = 8
SCORE_WAIT_S = 0.1


@dataclass
class RowState:
    """One session row. Host data only; mutated by the Scheduler alone."""

    settings: SessionSettings
    max_new_tokens: int  # resolved: the session's, the model's default, capped by the window
    min_new_tokens: int
    truncated_close: str
    detok: Detokenizer
    forced: collections.deque[Item] = field(default_factory=collections.deque)  # fed before sampling
    sample_after_forced: bool = False  # the last forced item's output is the caption's first token
    prefill_forced: bool = False  # feed the forced run in one varlen forward (the prompt at open)
    pending: PendingFrame | None = None  # a submitted frame that has not started
    frame_deadline: float | None = None  # of the frame being captioned
    decoding: bool = False  # between a frame's start and its last token
    next_token: int | None = None  # sampled token to feed at the next tick
    frames: int = 0  # frames started (or failed)
    first: int = 0  # the number of its stream's first frame (Scheduler.restart keeps the numbering)
    seen: int | None = None  # the frame whose image the row holds (started last; not a failed one)
    last_stop: int | None = None  # the stop token this session's model emitted most recently
    generated: list[int] = field(default_factory=list)  # the current caption's tokens
    branch_of: int | None = None  # a question branch: the session row it was copied from
    # the prompt's K/V: copied from the prefix cache at the next plan (restore), or saved into it
    # once the prompt has been fed (capture); the key is the prompt's token ids
    restore: tuple[int, ...] | None = None
    capture: tuple[int, ...] | None = None
    watches: list[list[int]] = field(default_factory=list)  # fed ids of each watch's question
    scored: int = 0  # frames whose watches are scored (or that need none: failed, no watches)
    score_since: float | None = None  # when plan() first saw the row's frame waiting for its scores

    @property
    def busy(self) -> bool:
        """A submitted frame is waiting or being captioned."""
        return self.pending is not None or self.decoding

    def startable(self) -> bool:
        """The pending frame may start at the next plan (the previous caption is closed)."""
        return self.pending is not None and not self.forced and not self.decoding

    def frame_ready(self) -> bool:
        """The pending frame starts at the next plan: startable, and its image tokens are here."""
        return self.startable() and self.pending is not None and self.pending.encoding is not None


@dataclass
class TokenEvent:
    row: int
    frame: int  # index of the frame being captioned in this session
    token: int | None  # the emitted caption token; None on a final event that carries no token
    text: str  # decoded text delta
    done: bool = False
    reason: str | None = None  # when done: "stop" | "length" | "deadline" | "error"


@dataclass
class ScoreEvent:
    """A frame's watch scores: P(yes) / (P(yes) + P(no)) after each watch's question, in the
    order the row's watches were set (docs/engine.md, "Watches")."""

    row: int
    frame: int
    scores: list[float]


@dataclass
class FrameStart:
    row: int
    encoding: FrameEncoding


@dataclass
class Plan:
    frames: list[FrameStart] = field(default_factory=list)
    prefill: dict[int, list[Item]] = field(default_factory=dict)
    decode: dict[int, int] = field(default_factory=dict)
    sample: list[int] = field(default_factory=list)
    # rows whose current frame's watches are scored this tick, before any frame starts (the scoring
    # forward reads the frame's image K/V and the row's text cache): row -> (frame, fed ids per watch)
    score: dict[int, tuple[int, list[list[int]]]] = field(default_factory=dict)
    # the prefix cache (Scheduler.prefixes): prompts dropped from it, rows whose prompt K/V are
    # copied from it (first in the tick), rows whose prompt K/V are saved into it (last in the
    # tick, once the prompt's final token is written); keys are prompts' token ids
    forget: list[tuple[int, ...]] = field(default_factory=list)
    restore: dict[int, tuple[int, ...]] = field(default_factory=dict)
    capture: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.score or self.restore or self.capture)


class Scheduler:
    def __init__(
        self,
        max_rows: int,
        template: Template,
        window_tokens: int,
        gen: object,
        prefill_min: int = 8,
        branch_rows: int = 0,
        prefix_cache: int = PREFIX_CACHE,
    ) -> None:
        """window_tokens: text tokens a CASA window holds (it caps max_new_tokens); gen: the
        GenerationConfig whose fields are the settings' defaults; the last `branch_rows` of the
        `max_rows` rows are kept for question branches (sessions never take them); prefix_cache:
        how many prompts' K/V are kept (0: none, every prompt is fed)."""
        self.rows: list[RowState | None] = [None] * max_rows
        self.template, self.window_tokens, self.gen = template, window_tokens, gen
        self.prefill_min = prefill_min
        self.session_rows = max_rows - branch_rows
        # the prompts whose K/V the prefix cache holds (the runner holds the tensors, following
        # the plans), least recently used first: a session opened (or restarted) on one of them
        # copies its K/V instead of feeding it. Every session on the default prompt shares one.
        self.prefixes: collections.OrderedDict[tuple[int, ...], None] = collections.OrderedDict()
        self.prefix_capacity = prefix_cache

    # ---- lifecycle ----------------------------------------------------------------------------

    def open(self, prompt_ids: list[int], settings: SessionSettings, detok: Detokenizer) -> int:
        """Claim a free row for a session; its prompt is forced first. CapacityError when full."""
        try:
            i = self.rows.index(None, 0, self.session_rows)
        except ValueError:
            raise CapacityError(f"all {self.session_rows} session slots are in use") from None
        self.rows[i] = self._new_row(prompt_ids, settings, detok)
        return i

    def _new_row(self, prompt_ids: list[int], settings: SessionSettings, detok: Detokenizer) -> RowState:
        """A session row at its stream's start: its prompt's K/V copied from the prefix cache, or
        the prompt forced in one prefill (and then saved into the cache)."""
        key = tuple(prompt_ids)
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            r = RowState(settings, 0, 0, "", detok, restore=key)
        else:
            forced = collections.deque(prompt_ids)
            r = RowState(settings, 0, 0, "", detok, forced=forced, prefill_forced=True, capture=key)
        self._apply(r, settings)
        return r

    def close(self, i: int) -> None:
        """Free the row (the engine resets its tensors when the row is next opened)."""
        self.rows[i] = None

    def restart(self, i: int, prompt_ids: list[int], detok: Detokenizer) -> None:
        """Start an idle session row's stream over in place: its prompt forced again as at open,
        its settings and watches kept, and its frame count kept so that the frame numbers of its
        events go on rising (the engine resets its tensors). The close of its last caption, if
        still to be fed, goes with the history. ValueError: a frame is pending or being captioned,
        or the row is a question branch."""
        old = self.row(i)
        if old.busy or old.branch_of is not None:
            raise ValueError(f"row {i} is not an idle session row; it restarts between frames only")
        r = self._new_row(prompt_ids, old.settings, detok)
        r.watches, r.frames, r.scored, r.first = old.watches, old.frames, old.frames, old.frames
        self.rows[i] = r

    def can_branch(self, parent: int) -> bool:
        """A question branch of the session row can start now. CASA: once a frame has started; the
        branch forks where the frame started (StreamState.copy_row), whatever the caption has
        reached. Token insertion: at a frame boundary (a frame captioned and its caption closed,
        no frame started since), its state the whole text with the frame in it."""
        r = self.rows[parent]
        return r is not None and r.branch_of is None and r.seen is not None and self._forkable(r)

    def _forkable(self, r: RowState) -> bool:
        """The row's state is what a question forks from: always for CASA (the text up to the mark
        and the frame's image); token insertion only once the frame's caption is closed (the whole
        text, the frame in it). Branches and watch scoring share this rule."""
        return not self.template.insertion or (not r.forced and not r.decoding)

    def free_branch_row(self) -> int | None:
        return next((i for i in range(self.session_rows, len(self.rows)) if self.rows[i] is None), None)

    def branch(
        self, parent: int, fed_ids: list[int], settings: SessionSettings, detok: Detokenizer, room: int
    ) -> int:
        """Claim a branch row for a question on `parent` (can_branch must hold; the engine copies
        the parent's tensors into it): `fed_ids` are forced, then the answer is sampled until a
        stop token or max_new_tokens (capped by `room`, the window's free text slots). When the
        answer ends, the row is freed. CapacityError when no branch row is free."""
        if not self.can_branch(parent):
            raise ValueError(
                f"row {parent} cannot branch now: no frame has started yet"
                + (", or its caption is not closed" if self.template.insertion else "")
            )
        i = self.free_branch_row()
        if i is None:
            raise CapacityError("every question branch row is busy; retry when an answer is done")
        p = self.row(parent)
        r = RowState(settings, 0, 0, "", detok, forced=collections.deque(fed_ids), branch_of=parent)
        self._apply(r, settings)
        r.max_new_tokens = max(1, min(r.max_new_tokens, room))
        r.sample_after_forced, r.decoding = True, True
        assert p.seen is not None
        r.seen, r.frames = p.seen, p.seen + 1  # the answer's events carry the frame it sees
        self.rows[i] = r
        return i

    def set_watches(self, i: int, watches: list[list[int]]) -> None:
        """The questions (fed ids) scored on each of the row's frames from now on, replacing any
        before. A frame already captioned and not scored yet is scored with the new list."""
        r = self.row(i)
        if r.branch_of is not None:
            raise ValueError(f"row {i} is a question branch; watches belong to session rows")
        r.watches = [list(w) for w in watches]

    def _needs_score(self, r: RowState) -> bool:
        """The row's current frame has started and its watches are not scored yet; token insertion:
        and its caption is closed (its state the whole text with the frame in it)."""
        return (
            bool(r.watches)
            and r.scored < r.frames
            and r.branch_of is None
            and r.seen == r.frames - 1
            and self._forkable(r)
        )

    def update(self, i: int, settings: SessionSettings) -> None:
        """New settings apply from the next sampled token."""
        self._apply(self.row(i), settings)

    def _apply(self, r: RowState, settings: SessionSettings) -> None:
        e = effective(self.gen, settings)
        t = self.template
        # a frame's window holds post_image + caption_prefix + caption + stop + pre_image
        room = self.window_tokens - len(t.post) - len(t.caption_prefix) - len(t.pre) - 2
        r.settings = settings
        r.max_new_tokens = max(1, min(e["max_new_tokens"], room))
        r.min_new_tokens = e["min_new_tokens"]
        r.truncated_close = e["truncated_close"]

    def row(self, i: int) -> RowState:
        r = self.rows[i]
        if r is None:
            raise KeyError(f"row {i} has no open session")
        return r

    def free_rows(self) -> int:
        """Free session rows."""
        return sum(r is None for r in self.rows[: self.session_rows])

    def submit(
        self,
        i: int,
        ticket: int,
        deadline: float | None,
        patches: torch.Tensor | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> int:
        """Queue a frame; returns its index in the session. Without patches it is being encoded
        elsewhere (the vision pipeline) and waits for `encoded`."""
        r = self.row(i)
        if r.busy:
            raise ValueError(f"row {i} is still captioning frame {r.frames - 1}; wait until busy() is False")
        r.pending = PendingFrame(ticket, deadline, patches, patch_grid)
        return r.frames

    def to_encode(self) -> list[int]:
        """Rows whose frame could start now but has no image tokens yet, and whose patches are
        here to encode (the engine encodes them before planning when no pipeline runs)."""
        return [
            i
            for i, r in enumerate(self.rows)
            if r is not None
            and r.startable()
            and r.pending.encoding is None
            and r.pending.patches is not None
        ]

    def encoded(self, i: int, ticket: int, encoding: FrameEncoding | None) -> TokenEvent | None:
        """A frame's encoding is ready (None: it failed, and the frame ends with an error event,
        returned). A result for a closed row or an older submission is ignored."""
        r = self.rows[i]
        if r is None or r.pending is None or r.pending.ticket != ticket:
            return None
        if encoding is None:
            r.pending = None
            r.frames += 1
            r.scored = r.frames  # the row still holds the previous frame: nothing new to score
            return TokenEvent(i, r.frames - 1, None, "", done=True, reason="error")
        r.pending.encoding, r.pending.patches = encoding, None
        return None

    # ---- the tick ------------------------------------------------------------------------------

    def has_work(self, i: int | None = None) -> bool:
        """Whether the next tick feeds tokens for row i (any row when None): forced tokens, a
        caption, or a frame that can start (encoded, or with patches the engine encodes at the
        tick). A frame still on the vision thread is not work yet."""
        rows = range(len(self.rows)) if i is None else (i,)
        for j in rows:
            r = self.rows[j]
            if r is None:
                continue
            if r.forced or r.decoding or self._needs_score(r):
                return True
            if r.pending is not None and (r.pending.encoding is not None or r.pending.patches is not None):
                return True
        return False

    def plan(self) -> Plan:
        """Score the watches of the rows whose frame waits for them (when `_score_now` says so),
        start every frame that can start, then assign each row with work its feed."""
        plan = Plan()
        due = [i for i, r in enumerate(self.rows) if r is not None and self._needs_score(r)]
        if due and self._score_now(due):
            for i in due:
                r = self.row(i)
                plan.score[i] = (r.frames - 1, r.watches)
                r.scored, r.score_since = r.frames, None
        # rows that feed something this tick without a prompt prefill of their own (counted
        # before frames start: a starting frame's short forced run does not make a prompt wait)
        busy = sum(
            1 for r in self.rows if r is not None and (r.decoding or (r.forced and not r.prefill_forced))
        )
        for i, r in enumerate(self.rows):
            if r is not None and r.restore is not None:
                plan.restore[i], r.restore = r.restore, None
        for i, r in enumerate(self.rows):
            if r is not None and r.frame_ready():
                plan.frames.append(FrameStart(i, self._start_frame(r)))
        for i, r in enumerate(self.rows):
            if r is not None:
                self._assign(plan, i, r, busy)
        return plan

    def _score_now(self, due: list[int]) -> bool:
        """Whether the rows waiting for their scores are scored this tick, all together. A scoring
        forward of a few rows costs mostly its fixed overhead on a CPU (four watches: one row ~13 ms,
        eight rows ~43 ms), and frames start (token insertion: captions close) at scattered ticks,
        so rows wait to be scored together: until one of them has its next frame ready (a frame
        overwrites the image K/V the scores read), `SCORE_BATCH` of them wait, one has waited
        `SCORE_WAIT_S`, or the tick has nothing else to do (docs/engine.md, "Watches")."""
        now = time.monotonic()
        rows = [self.row(i) for i in due]
        for r in rows:
            if r.score_since is None:
                r.score_since = now
        if len(rows) >= SCORE_BATCH or any(
            r.frame_ready() or now - r.score_since >= SCORE_WAIT_S for r in rows
        ):
            return True
        return not any(r is not None and (r.forced or r.decoding or r.frame_ready()) for r in self.rows)

    def _start_frame(self, r: RowState) -> FrameEncoding:
        pending = r.pending
        assert pending is not None and pending.encoding is not None
        enc = pending.encoding
        t = self.template
        inserted = [InsertedFrame(enc.tokens, enc.grid)] if t.insertion else []
        r.forced.extend([*inserted, *t.post, *(t.caption_prefix if r.frames == r.first else [])])
        r.sample_after_forced = True
        r.pending, r.frame_deadline = None, pending.deadline
        r.decoding, r.generated = True, []
        r.frames += 1
        r.seen = r.frames - 1
        r.detok.reset()
        return enc

    def _assign(self, plan: Plan, i: int, r: RowState, busy: int) -> None:
        if r.forced:
            has_frame = any(isinstance(it, InsertedFrame) for it in r.forced)
            prompt = r.prefill_forced and busy == 0
            # a question (a branch's forced run) goes in one forward however short: it is rare
            # next to captions, and a token a tick would put its whole length before the answer
            branch = r.branch_of is not None
            if has_frame or prompt or branch or len(r.forced) >= self.prefill_min:
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
            if not r.forced and r.capture is not None:  # the prompt's last token is fed this tick
                self._capture(plan, i, r.capture)
                r.capture = None
        elif r.decoding:
            assert r.next_token is not None
            plan.decode[i] = r.next_token
            plan.sample.append(i)

    def _capture(self, plan: Plan, i: int, key: tuple[int, ...]) -> None:
        """Save row i's prompt into the prefix cache (unless another row already did), dropping
        the least recently used prompt past the cache's capacity."""
        if key in self.prefixes or self.prefix_capacity <= 0:
            return
        self.prefixes[key] = None
        plan.capture[i] = key
        while len(self.prefixes) > self.prefix_capacity:
            plan.forget.append(self.prefixes.popitem(last=False)[0])

    def stop_banned(self, rows: list[int]) -> list[bool]:
        """Per row: the caption is shorter than min_new_tokens, so a stop token may not be sampled."""
        return [len(self.row(i).generated) < self.row(i).min_new_tokens for i in rows]

    def update_from_output(self, rows: list[int], tokens: list[int], now: float) -> list[TokenEvent]:
        """The tokens sampled for `rows` this tick advance their captions; `now` (time.monotonic())
        is checked against each frame's deadline. Returns one event per row."""
        return [self._advance(i, tok, now) for i, tok in zip(rows, tokens)]

    def _advance(self, i: int, tok: int, now: float) -> TokenEvent:
        r = self.row(i)
        frame = r.frames - 1
        if r.branch_of is not None:
            return self._advance_branch(i, r, tok, frame)
        if tok in self.template.stop:
            r.last_stop = tok
            self._finish(r, [tok])
            return TokenEvent(i, frame, None, "", done=True, reason="stop")
        r.generated.append(tok)
        text = r.detok.push(tok)
        reason = None
        if len(r.generated) >= r.max_new_tokens:
            reason = "length"
        elif r.frame_deadline is not None and now >= r.frame_deadline:
            reason = "deadline"
        if reason is not None:
            self._finish(r, self._cut_close(r, tok))
            return TokenEvent(i, frame, tok, text, done=True, reason=reason)
        r.next_token = tok
        return TokenEvent(i, frame, tok, text)

    def _advance_branch(self, i: int, r: RowState, tok: int, frame: int) -> TokenEvent:
        """An answer's token: it ends on a stop token or at max_new_tokens, and then its row is
        freed at once (nothing is fed after an answer: the branch is discarded)."""
        if tok in self.template.stop:
            self.rows[i] = None
            return TokenEvent(i, frame, None, "", done=True, reason="stop")
        r.generated.append(tok)
        text = r.detok.push(tok)
        if len(r.generated) >= r.max_new_tokens:
            self.rows[i] = None
            return TokenEvent(i, frame, tok, text, done=True, reason="length")
        r.next_token = tok
        return TokenEvent(i, frame, tok, text)

    def _cut_close(self, r: RowState, tok: int) -> list[int]:
        """What closes a caption cut short by max_new_tokens or the deadline (docs/engine.md):
        "last_stop" (Kyutai's procedure) feeds the stop token the model itself emitted most
        recently in this session (the first stop id before it has emitted any) and not the cut
        word; "cut_word" feeds the cut word, then the first stop id."""
        stop = self.template.stop
        if r.truncated_close == "cut_word":
            return [tok, stop[0]]
        return [stop[0] if r.last_stop is None else r.last_stop]

    def _finish(self, r: RowState, tokens: list[int]) -> None:
        """End the frame: the close (and the next frame's pre-image tokens) are forced next."""
        r.decoding, r.next_token = False, None
        r.forced.extend([*tokens, *self.template.pre])
