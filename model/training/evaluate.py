"""Evaluate a model on held-out synthetic clips through the REAL streaming engine.

Captions are generated frame by frame from pixels by the engine (model/engine/engine.py, the path
the server uses), greedy unless the checkpoint says otherwise, never teacher-forced: each caption
conditions on the model's own earlier captions. Many clips run at once, one engine row each, so the
batched step is exercised too.

Metrics (all micro-averaged over frames):
- exact match: the caption equals the ground truth string;
- attribute F1 over (colour, shape, position) of the objects a caption mentions: per frame, the
  multiset of (attribute, value) pairs parsed from the caption against the ground truth's;
- change-event recall (and precision): an event "appears / moves <direction> / leaves" of a given
  colour + shape at frame t > 0 is recalled when the caption of frame t reports it;
- question accuracy, overall and per kind of model/world/questions.py (only for a model whose
  generation config has a question template): at a few frame boundaries per clip a question is asked
  on a side branch (Engine.ask, greedy) right after that frame's caption closed, before the next
  frame is submitted, and its answer (stripped) must equal the ground truth of the frame it saw.
Held-out seeds are below TRAIN_SEED_BASE (model/world/scene.py), which training never uses.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from casa_live.model.config import GenerationConfig
from casa_live.model.engine.engine import Engine
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.world import questions as qa
from casa_live.model.world.scene import Clip, Event, FrameTruth, WorldConfig, generate_clip, parse_caption

ATTRIBUTES = ("colour", "shape", "position")
CHANGES = ("appears", "moves", "leaves")


def _attrs(events: Iterable[Event], kinds: tuple[str, ...] = ATTRIBUTES) -> Counter:
    out: Counter = Counter()
    for e in events:
        for k in kinds:
            v = getattr(e, k)
            if v is not None:
                out[(k, v)] += 1
    return out


def _event_keys(events: Iterable[Event]) -> Counter:
    return Counter((e.kind, e.colour, e.shape, e.direction) for e in events if e.kind in CHANGES)


@dataclass
class Scores:
    frames: int = 0
    exact: int = 0
    attr_tp: Counter = field(default_factory=Counter)  # per attribute kind
    attr_pred: Counter = field(default_factory=Counter)
    attr_true: Counter = field(default_factory=Counter)
    events_true: Counter = field(default_factory=Counter)  # per event kind
    events_hit: Counter = field(default_factory=Counter)
    events_pred: int = 0
    events_pred_ok: int = 0

    def add(self, truth: FrameTruth, caption: str) -> None:
        self.frames += 1
        self.exact += caption.strip() == truth.caption
        pred = parse_caption(caption)
        p, t = _attrs(pred), _attrs(truth.events)
        for (kind, _), n in (p & t).items():
            self.attr_tp[kind] += n
        for (kind, _), n in p.items():
            self.attr_pred[kind] += n
        for (kind, _), n in t.items():
            self.attr_true[kind] += n
        if truth.index > 0:
            pe, te = _event_keys(pred), _event_keys(truth.events)
            hit = pe & te
            for key, n in te.items():
                self.events_true[key[0]] += n
            for key, n in hit.items():
                self.events_hit[key[0]] += n
            self.events_pred += sum(pe.values())
            self.events_pred_ok += sum(hit.values())

    @staticmethod
    def _f1(tp: int, npred: int, ntrue: int) -> float:
        if npred + ntrue == 0:
            return 1.0
        return 2 * tp / (npred + ntrue)

    def summary(self) -> dict:
        out = {
            "frames": self.frames,
            "exact_match": self.exact / max(1, self.frames),
            "attribute_f1": self._f1(
                sum(self.attr_tp.values()), sum(self.attr_pred.values()), sum(self.attr_true.values())
            ),
            "event_recall": sum(self.events_hit.values()) / max(1, sum(self.events_true.values())),
            "event_precision": self.events_pred_ok / max(1, self.events_pred),
            "events": sum(self.events_true.values()),
        }
        for k in ATTRIBUTES:
            out[f"f1_{k}"] = self._f1(self.attr_tp[k], self.attr_pred[k], self.attr_true[k])
        for k in CHANGES:
            out[f"recall_{k}"] = self.events_hit[k] / max(1, self.events_true[k])
        return out


@dataclass
class Answer:
    """One question asked at a frame boundary, its answer and the ground truth of the frame it saw."""

    seed: int
    frame: int  # the frame the answer saw (Engine.ask's)
    kind: str
    question: str
    answer: str  # the decoded answer, stripped
    truth: str  # questions.answer(question, truth[frame].objects)
    reason: str | None = None  # how the answer ended: "stop" | "length"

    @property
    def correct(self) -> bool:
        return self.answer == self.truth


@dataclass
class QuestionScores:
    """Exact-match accuracy of the answers, overall and per question kind (questions.KINDS)."""

    asked: Counter = field(default_factory=Counter)
    correct: Counter = field(default_factory=Counter)

    def add(self, answer: Answer) -> None:
        self.asked[answer.kind] += 1
        self.correct[answer.kind] += answer.correct

    def summary(self) -> dict:
        n = sum(self.asked.values())
        out: dict = {"questions": n, "question_accuracy": sum(self.correct.values()) / max(1, n)}
        for k in qa.KINDS:
            out[f"questions_{k}"] = self.asked[k]
            out[f"question_accuracy_{k}"] = self.correct[k] / self.asked[k] if self.asked[k] else float("nan")
        return out


def question_plan(clips: list[Clip], per_clip: int) -> list[dict[int, qa.Question]]:
    """Per clip, the questions to ask after some of its frames ({frame: question}): `per_clip`
    distinct frames drawn with an rng seeded by the clip's seed, each question sampled from that
    frame's objects (questions.sample, an rng seeded by clip and frame). Kinds take turns by seed, so
    over consecutive seeds all nine come up equally often."""
    plan = []
    for clip in clips:
        n = min(per_clip, len(clip.truth))
        frames = sorted(
            int(f) for f in np.random.default_rng([clip.seed, 0]).choice(len(clip.truth), n, False)
        )
        asks = {}
        for k, f in enumerate(frames):
            kind = qa.KINDS[(clip.seed * per_clip + k) % len(qa.KINDS)]
            asks[f] = qa.sample(clip.truth[f].objects, np.random.default_rng([clip.seed, 1, f]), kind)
        plan.append(asks)
    return plan


@dataclass
class EvalResult:
    metrics: dict
    seconds: float
    clips: list[tuple[int, list[str], list[str]]]  # (seed, predicted captions, true captions)
    answers: list[Answer] = field(default_factory=list)
    # whether the model has a question template (None: no questions were asked)
    answers_questions: bool | None = None

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "seconds": self.seconds}

    def question_table(self) -> list[tuple[str, int, float]]:
        """(kind, asked, accuracy) per question kind, then ("all", ...)."""
        m = self.metrics
        rows = [(k, m[f"questions_{k}"], m[f"question_accuracy_{k}"]) for k in qa.KINDS]
        return [*rows, ("all", m["questions"], m["question_accuracy"])]

    def wrong_answers(self, limit: int = 10) -> list[Answer]:
        return [a for a in self.answers if not a.correct][: max(0, limit)]

    def mistakes(self, limit: int = 10) -> list[tuple[int, int, str, str]]:
        """(seed, frame, predicted, true) of the first wrong captions."""
        out: list[tuple[int, int, str, str]] = []
        if limit <= 0:
            return out
        for seed, pred, true in self.clips:
            for i, (p, t) in enumerate(zip(pred, true)):
                if p.strip() != t:
                    out.append((seed, i, p, t))
                    if len(out) >= limit:
                        return out
        return out


def caption_clips(engine: Engine, clips: list[Clip], prompt: str | None = None) -> list[list[str]]:
    """Stream every clip through the engine (up to max_sessions at once); captions per clip."""
    return stream_clips(engine, clips, prompt)[0]


def stream_clips(
    engine: Engine,
    clips: list[Clip],
    prompt: str | None = None,
    asks: list[dict[int, qa.Question]] | None = None,
) -> tuple[list[list[str]], list[Answer]]:
    """Stream every clip through the engine (up to max_sessions at once): captions per clip, and the
    answers to `asks` (per clip, {frame: question}). A question for frame f is asked at f's boundary,
    once its caption is closed (Engine.can_ask: the close fed, a branch row free) and before frame
    f + 1 is submitted; its answer is decoded in the same batched steps as the captions (greedy,
    Engine.ask) and ends at its done event."""
    results: list[list[str]] = [[] for _ in clips]
    answers: list[Answer] = []
    todo = list(range(len(clips)))[::-1]
    active: dict[int, dict] = {}  # row -> {clip, next, ids, waiting, ask}
    branches: dict[int, dict] = {}  # branch row -> {clip, question, frame, ids}
    tok = engine.tokenizer
    while todo or active or branches:
        while todo and len(active) < engine.max_sessions:
            row = engine.open(prompt)
            active[row] = {"clip": todo.pop(), "next": 0, "ids": [], "waiting": False, "ask": None}
        for row, st in active.items():
            if st["waiting"]:
                continue
            if st["ask"] is not None:  # a question at this frame boundary, before the next frame
                if not engine.can_ask(row):
                    continue  # the caption's close is still being fed, or every branch row is busy
                branch, frame = engine.ask(row, st["ask"].text)
                branches[branch] = {"clip": st["clip"], "question": st["ask"], "frame": frame, "ids": []}
                st["ask"] = None
            if st["next"] < len(clips[st["clip"]].truth) and not engine.busy(row):
                engine.submit_frame(row, clips[st["clip"]].frames[st["next"]])
                st["waiting"] = True
        for ev in engine.step():
            b = branches.get(ev.row)
            if b is not None:
                if ev.token is not None:
                    b["ids"].append(ev.token)
                if ev.done:
                    del branches[ev.row]
                    clip, q = clips[b["clip"]], b["question"]
                    truth = qa.answer(q.text, clip.truth[b["frame"]].objects)
                    assert truth is not None, q.text
                    text = tok.decode(b["ids"]).strip()
                    answers.append(
                        Answer(clip.seed, b["frame"], q.kind, q.text, text, truth.answer, ev.reason)
                    )
                continue
            st = active.get(ev.row)
            if st is None:
                continue
            if ev.token is not None:
                st["ids"].append(ev.token)
            if ev.done:
                results[st["clip"]].append(tok.decode(st["ids"]))
                st["ids"], st["waiting"] = [], False
                if asks is not None:
                    st["ask"] = asks[st["clip"]].get(st["next"])
                st["next"] += 1
        for row in [
            r for r, st in active.items() if st["next"] >= len(clips[st["clip"]].truth) and st["ask"] is None
        ]:
            engine.close(row)  # a branch still answering is a copy: it does not need the row
            del active[row]
    return results, answers


def evaluate(
    engine: Engine,
    seeds: Iterable[int],
    frames: int = 16,
    prompt: str | None = None,
    world: WorldConfig | None = None,
    questions: int = 0,
) -> EvalResult:
    """Caption held-out clips with the engine and score them against the ground truth; with
    `questions`, also ask that many questions per clip at frame boundaries (question_plan) and score
    the answers, when the model answers questions (its generation config has a question template)."""
    from casa_live.model.world.scene import TRAIN_SEED_BASE

    seeds = list(seeds)
    if any(s >= TRAIN_SEED_BASE for s in seeds):
        raise ValueError(
            f"evaluation seeds must be held out: below {TRAIN_SEED_BASE} (training uses the rest)"
        )
    cfg = WorldConfig(**{**asdict(world or WorldConfig()), "frames": frames, "size": engine.image_size})
    clips = [generate_clip(s, cfg) for s in seeds]
    answers_questions = None if questions <= 0 else engine.gen.template.question is not None
    asks = question_plan(clips, questions) if answers_questions else None
    t0 = time.monotonic()
    captions, answers = stream_clips(engine, clips, prompt, asks)
    seconds = time.monotonic() - t0
    scores = Scores()
    for clip, preds in zip(clips, captions):
        for truth, caption in zip(clip.truth, preds):
            scores.add(truth, caption)
    metrics = scores.summary() | {"clips": len(clips), "frames_per_s": scores.frames / max(seconds, 1e-9)}
    if answers_questions:
        order = {s: i for i, s in enumerate(seeds)}
        answers.sort(key=lambda a: (order[a.seed], a.frame))
        q = QuestionScores()
        for a in answers:
            q.add(a)
        metrics |= q.summary()
    return EvalResult(
        metrics,
        seconds,
        [(c.seed, p, c.captions) for c, p in zip(clips, captions)],
        answers,
        answers_questions,
    )


# ---------------------------------------------------------------- teacher-forced diagnosis

SLOT_KINDS = ("first", "none", "appears", "moves", "leaves")  # frame 0, then by the frame's event


@dataclass
class SlotAccuracy:
    """Teacher-forced next-token accuracy per (caption kind, word index), and whole-caption rate.

    Free-running scores mix perception, reasoning over the history and compounding errors; this
    isolates each decision: with the true history, how often is word k of an "appears" caption
    right? E.g. word 1 of "the green triangle leaves" is the colour of the object that left (found
    by comparing the history with the frame), word 2 its shape (copied from the history).
    """

    correct: Counter = field(default_factory=Counter)  # (kind, index) -> correct predictions
    total: Counter = field(default_factory=Counter)
    captions_ok: Counter = field(default_factory=Counter)  # kind -> captions with every word right
    captions: Counter = field(default_factory=Counter)

    def table(self) -> list[str]:
        lines = []
        for kind in SLOT_KINDS:
            if not self.captions[kind]:
                continue
            words = sorted(i for k, i in self.total if k == kind)
            accs = " ".join(f"{self.correct[kind, i] / self.total[kind, i]:.2f}" for i in words)
            whole = self.captions_ok[kind] / self.captions[kind]
            lines.append(f"  {kind:<8} whole caption {whole:.3f} ({self.captions[kind]:>4})  by word: {accs}")
        return lines


def slot_accuracy(
    model: torch.nn.Module,
    tok: Tokenizer,
    gen: GenerationConfig,
    seeds: Iterable[int],
    frames: int = 16,
    clips_per_batch: int = 8,
) -> SlotAccuracy:
    """Teacher-forced accuracy of every caption word on held-out clips (dense CASA forward, the
    training batch of model/training/train.py)."""
    from casa_live.model.processor import ImageProcessor
    from casa_live.model.training.train import batch_from_clips, dense_logits

    processor = ImageProcessor.for_config(model.config)
    cfg = WorldConfig(frames=frames, size=model.config.image_size)
    clips = [generate_clip(s, cfg) for s in seeds]
    out = SlotAccuracy()
    for start in range(0, len(clips), clips_per_batch):
        chunk = clips[start : start + clips_per_batch]
        batch = batch_from_clips(chunk, tok, gen, processor, [None] * len(chunk))
        with torch.no_grad():
            pred = dense_logits(model, batch)[0].argmax(-1)  # (B, T): prediction for token t + 1
        for b, clip in enumerate(chunk):
            target, tokens, T = batch.target[b], batch.tokens[b], int(batch.text_len[b])
            frame, word, whole = -1, 0, True
            for t in range(1, T):
                if not target[t]:
                    continue
                if not target[t - 1]:  # a caption starts
                    frame, word, whole = frame + 1, 0, True
                    events = clip.truth[frame].events
                    kind = "first" if frame == 0 else (events[0].kind if events else "none")
                ok = int(pred[b, t - 1]) == int(tokens[t])
                out.correct[kind, word] += ok
                out.total[kind, word] += 1
                whole = whole and ok
                word += 1
                if t + 1 == T or not target[t + 1]:  # its stop token: the caption ends
                    out.captions[kind] += 1
                    out.captions_ok[kind] += whole
    return out
