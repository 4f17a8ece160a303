"""`casa eval`: caption held-out synthetic clips with the streaming engine and score them, and ask
questions at frame boundaries (model/world/questions.py) when the model answers questions."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on held-out synthetic clips through the streaming engine"
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--frames", type=int, default=16, help="frames per clip (2 fps)")
    p.add_argument(
        "--seed-start", type=int, default=0, help="first held-out seed (seeds must be < 1,000,000)"
    )
    p.add_argument("--sessions", type=int, default=16, help="clips streamed at once (engine rows)")
    p.add_argument("--prompt", default=None, help="prompt text (default: the checkpoint's default prompt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--max-context", type=int, default=4096, help="text KV cache bound (insertion stores frames there)"
    )
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument(
        "--questions",
        type=int,
        default=2,
        help="questions per clip, asked at that many frame boundaries (greedy answers, exact match per "
        "question kind); 0: none. Only for a model whose generation config has a question template",
    )
    p.add_argument("--show", type=int, default=5, help="print this many wrong captions (and wrong answers)")
    p.add_argument(
        "--slots",
        action="store_true",
        help="also print teacher-forced accuracy per caption word and event kind (where it fails)",
    )
    p.add_argument("--min-f1", type=float, default=None, help="exit 1 if attribute F1 is below this")
    p.add_argument("--min-recall", type=float, default=None, help="exit 1 if event recall is below this")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from casa_live.model.checkpoint.assets import default_model_dir
    from casa_live.model.engine.engine import Engine
    from casa_live.model.training.evaluate import evaluate

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model_dir()
    engine = Engine.from_checkpoint(path, max_sessions=args.sessions, max_context_tokens=args.max_context)
    seeds = range(args.seed_start, args.seed_start + args.clips)
    result = evaluate(engine, seeds, frames=args.frames, prompt=args.prompt, questions=args.questions)
    m = result.metrics
    print(
        f"model {path} ({engine.model.config.casa.fusion}): {m['clips']} clips x {args.frames} frames, seeds {args.seed_start}..{args.seed_start + args.clips - 1}"
    )
    rows = [
        ("exact match", m["exact_match"]),
        ("attribute F1 (colour, shape, position)", m["attribute_f1"]),
        ("  F1 colour", m["f1_colour"]),
        ("  F1 shape", m["f1_shape"]),
        ("  F1 position", m["f1_position"]),
        (f"change-event recall ({m['events']} events)", m["event_recall"]),
        ("  appears", m["recall_appears"]),
        ("  moves", m["recall_moves"]),
        ("  leaves", m["recall_leaves"]),
        ("change-event precision", m["event_precision"]),
    ]
    for name, value in rows:
        print(f"  {name:<42} {value:.4f}")
    print(f"  {'frames per second (streaming, batched)':<42} {m['frames_per_s']:.1f}")
    for seed, frame, pred, true in result.mistakes(args.show):
        print(f"  seed {seed} frame {frame}: got {pred!r}, expected {true!r}")
    print_questions(result, args)
    if args.slots:
        from casa_live.model.training.evaluate import slot_accuracy

        print("teacher-forced accuracy (true history), per caption kind and word index:")
        for line in slot_accuracy(engine.model, engine.tokenizer, engine.gen, seeds, args.frames).table():
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    ok = (args.min_f1 is None or m["attribute_f1"] >= args.min_f1) and (
        args.min_recall is None or m["event_recall"] >= args.min_recall
    )
    return 0 if ok else 1


def print_questions(result, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """The question accuracy table per kind (or why there is none)."""
    if result.answers_questions is None:
        return
    if not result.answers_questions:
        print("questions: the model answers no questions (its generation config has no question template)")
        return
    m = result.metrics
    print(
        f"questions: {m['questions']} ({args.questions} per clip, at frame boundaries), greedy answers, "
        "exact match with the ground truth of the frame the answer saw"
    )
    print(f"  {'kind':<12} {'asked':>6} {'accuracy':>9}")
    for kind, asked, acc in result.question_table():
        print(f"  {kind:<12} {asked:>6} {acc:>9.4f}")
    for a in result.wrong_answers(args.show):
        print(f"  seed {a.seed} frame {a.frame}: {a.question!r} got {a.answer!r}, expected {a.truth!r}")
