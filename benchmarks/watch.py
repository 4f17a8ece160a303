"""Alert quality of watches on held-out world clips, at event level.

Each clip of the synthetic world (seeds below the training range, so never trained on) streams
through the engine in-process, every frame captioned in full, with watches set on its row: the
yes/no forms of the question language (model/world/questions.py), chosen from the clip's own
truth so that they do happen in it:
- `exists`: "is there a {colour} {shape}?" for an object that is in the clip at some frame;
- `colour_any`: "is there a {colour} object?" for a colour in the clip;
- `shape_any`: "is there a {shape}?" for a shape in the clip;
- `empty`: "is the scene empty?";
- `never`: "is there a {colour} {shape}?" for a colour and shape that are in no frame of the clip.
Every frame's score goes through the server's debounce (server/alerts.py `AlertTracker`, threshold
0.5, min_frames = clear_frames = 1, no cooldown), and the alerts are matched against the truth's:
an alert should start where the answer turns "yes" (an object appears) and end where it turns
"no" (it leaves). A predicted start (end) within one frame of a true one, each matched once, is a
hit. Printed per watch kind: precision and recall of starts and of ends, the per-frame agreement
of score >= 0.5 with the truth, and how many `never` watches fired at all (the target: none).

    python -m benchmarks.watch                                           # 50 clips x 16 frames
    python -m benchmarks.watch --model-dir /tmp/toy --clips 4 --frames 6  # a smoke run

Cost (CPU per captioned frame with 4 watches a stream, against none) is measured by the load test:
`python -m benchmarks.loadtest --clients 32 --watches 4` beside the same command without.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np

KINDS = ("exists", "colour_any", "shape_any", "empty", "never")
WINDOW = 1  # frames: how far a predicted start or end may be from the true one


@dataclass
class Tally:
    """Event counts of one watch kind (or of all)."""

    true_starts: int = 0
    pred_starts: int = 0
    hit_starts: int = 0
    true_ends: int = 0
    pred_ends: int = 0
    hit_ends: int = 0
    frames: int = 0
    frames_right: int = 0
    watches: int = 0
    fired: int = 0  # watches with at least one alert

    def add(self, other: Tally) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def row(self, name: str) -> str:
        def ratio(a: int, b: int) -> str:
            return f"{a / b:.3f}" if b else "-"

        return (
            f"| {name} | {self.watches} | {ratio(self.hit_starts, self.pred_starts)} "
            f"| {ratio(self.hit_starts, self.true_starts)} | {ratio(self.hit_ends, self.pred_ends)} "
            f"| {ratio(self.hit_ends, self.true_ends)} | {ratio(self.frames_right, self.frames)} "
            f"| {self.fired} |"
        )


def edges(active: list[bool]) -> tuple[list[int], list[int]]:
    """Frames where a yes/no sequence turns yes (starts; frame 0 if it begins yes) and turns no."""
    starts = [f for f, a in enumerate(active) if a and (f == 0 or not active[f - 1])]
    ends = [f for f, a in enumerate(active) if not a and f > 0 and active[f - 1]]
    return starts, ends


def matched(pred: list[int], true: list[int], window: int = WINDOW) -> int:
    """Predicted frames matched one-to-one to true frames within `window` (greedy, in order)."""
    free = list(true)
    hits = 0
    for f in pred:
        near = [t for t in free if abs(t - f) <= window]
        if near:
            free.remove(min(near, key=lambda t: abs(t - f)))
            hits += 1
    return hits


def alerts(
    scores: list[float], threshold: float = 0.5, min_frames: int = 1, clear_frames: int = 1
) -> tuple[list[int], list[int]]:
    """The frames where the server's debounce starts and ends alerts for these scores."""
    from casa_live.server.alerts import AlertTracker

    tracker = AlertTracker(threshold, min_frames, clear_frames, 0.0)
    starts, ends = [], []
    for f, s in enumerate(scores):
        event = tracker.observe(f, f * 0.5, s)
        if event == "started":
            starts.append(f)
        elif event == "ended":
            ends.append(f)
    return starts, ends


@dataclass
class ClipWatches:
    questions: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    truth: list[list[bool]] = field(default_factory=list)  # per watch, per frame


def plan_watches(truths: list, rng: np.random.Generator) -> ClipWatches:
    """The clip's watches (one per kind that the clip allows) and their per-frame truth."""
    from casa_live.model.world import questions as qa
    from casa_live.model.world.scene import COLOURS, SHAPES

    seen = [o for t in truths for o in t.objects]
    out = ClipWatches()

    def add(kind: str, q: qa.Question | None, make) -> None:  # type: ignore[no-untyped-def]
        if q is None:
            return
        out.questions.append(q.text)
        out.kinds.append(kind)
        out.truth.append([make(t.objects).answer == "yes" for t in truths])

    if seen:
        o = seen[int(rng.integers(len(seen)))]
        add("exists", qa.exists((), o.colour, o.shape), lambda objs: qa.exists(objs, o.colour, o.shape))
        c = seen[int(rng.integers(len(seen)))].colour
        add("colour_any", qa.colour_any((), c), lambda objs: qa.colour_any(objs, c))
        s = seen[int(rng.integers(len(seen)))].shape
        add("shape_any", qa.shape_any((), s), lambda objs: qa.shape_any(objs, s))
    add("empty", qa.empty(()), qa.empty)
    pairs = {(o.colour, o.shape) for o in seen}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
    if absent:
        c, s = absent[int(rng.integers(len(absent)))]
        add("never", qa.exists((), c, s), lambda objs: qa.exists(objs, c, s))
    return out


def stream_scores(engine, clips: list, plans: list[ClipWatches]) -> list[list[list[float]]]:  # type: ignore[no-untyped-def]
    """Per clip, per watch, the score of every frame (up to max_sessions clips at once)."""
    from casa_live.model.engine.engine import ScoreEvent, TokenEvent

    scores: list[list[list[float]]] = [[[] for _ in p.questions] for p in plans]
    todo = list(range(len(clips)))[::-1]
    active: dict[int, dict] = {}  # row -> {clip, next, waiting}
    while todo or active:
        while todo and len(active) < engine.max_sessions:
            row = engine.open(None)
            k = todo.pop()
            engine.set_watches(row, plans[k].questions)
            active[row] = {"clip": k, "next": 0, "waiting": False, "scored": 0}
        for row, st in active.items():
            n = len(clips[st["clip"]].truth)
            # the next frame once the last one is captioned; scoring runs before it starts
            if not st["waiting"] and st["next"] < n and not engine.busy(row):
                engine.submit_frame(row, clips[st["clip"]].frames[st["next"]])
                st["next"] += 1
                st["waiting"] = True
        for ev in engine.step():
            st = active.get(ev.row)
            if st is None:
                continue
            if isinstance(ev, ScoreEvent):
                for w, s in enumerate(ev.scores):
                    scores[st["clip"]][w].append(s)
                st["scored"] += 1
            elif isinstance(ev, TokenEvent) and ev.done:
                st["waiting"] = False
        for row in [r for r, st in active.items() if st["scored"] >= len(clips[st["clip"]].truth)]:
            engine.close(row)
            del active[row]
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="default: the bundled model")
    ap.add_argument("--clips", type=int, default=50, help="held-out clips, seeds 0..CLIPS-1")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--sessions", type=int, default=16, help="clips streamed at once")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument(
        "--debounce",
        nargs="+",
        default=["1:1"],
        metavar="MIN:CLEAR",
        help="the watches' min_frames:clear_frames, one table each from the same scores (default 1:1, "
        "the protocol's default); a start or end that the debounce delays by one frame is still a hit",
    )
    args = ap.parse_args(argv)
    debounces = [tuple(int(x) for x in d.split(":")) for d in args.debounce]

    from dataclasses import asdict

    from casa_live.model.checkpoint.assets import default_model_dir
    from casa_live.model.engine.engine import Engine
    from casa_live.model.world.scene import WorldConfig, generate_clip

    model_dir = args.model_dir or str(default_model_dir())
    engine = Engine.from_checkpoint(model_dir, max_sessions=args.sessions, branch_rows=0)
    if engine.runner.yes_no is None:
        print(f"{model_dir}: this model scores no watches (no question template)", file=sys.stderr)
        return 2
    cfg = WorldConfig(**{**asdict(WorldConfig()), "frames": args.frames, "size": engine.image_size})
    clips = [generate_clip(seed, cfg) for seed in range(args.clips)]
    plans = [plan_watches(c.truth, np.random.default_rng([c.seed, 23])) for c in clips]
    scores = stream_scores(engine, clips, plans)
    for min_frames, clear_frames in debounces:
        print_table(model_dir, args, plans, scores, min_frames, clear_frames)
    return 0


def print_table(
    model_dir: str, args, plans: list[ClipWatches], scores, min_frames: int, clear_frames: int
) -> None:  # type: ignore[no-untyped-def]
    tallies = {k: Tally() for k in KINDS}
    for plan, per_watch in zip(plans, scores):
        for kind, truth, s in zip(plan.kinds, plan.truth, per_watch):
            t = tallies[kind]
            true_starts, true_ends = edges(truth)
            pred_starts, pred_ends = alerts(s, args.threshold, min_frames, clear_frames)
            t.watches += 1
            t.fired += bool(pred_starts)
            t.true_starts += len(true_starts)
            t.pred_starts += len(pred_starts)
            t.hit_starts += matched(pred_starts, true_starts)
            t.true_ends += len(true_ends)
            t.pred_ends += len(pred_ends)
            t.hit_ends += matched(pred_ends, true_ends)
            t.frames += len(truth)
            t.frames_right += sum((x >= args.threshold) == y for x, y in zip(s, truth))
    total = Tally()
    for k in KINDS:
        if k != "never":
            total.add(tallies[k])
    print(
        f"model {model_dir}: {args.clips} held-out clips x {args.frames} frames, threshold {args.threshold}, "
        f"min_frames = {min_frames}, clear_frames = {clear_frames}; a start or end within {WINDOW} frame "
        "of the truth's is a hit"
    )
    print(
        "| watch kind | watches | start precision | start recall | end precision | end recall | frame agreement | watches that fired |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in KINDS:
        print(tallies[k].row(k))
    print(total.row("all but never"))
    print()


if __name__ == "__main__":
    raise SystemExit(main())
