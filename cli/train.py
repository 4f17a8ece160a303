"""`casa train`: train a CASA model on the synthetic world (model/training/train.py), export a checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CASA model on the synthetic streaming-caption world (CPU)")
    p.add_argument("--out", default="runs/default", help="run directory: log, train state, checkpoint")
    p.add_argument("--preset", default="default", help="model preset (model/config.py)")
    p.add_argument("--fusion", choices=["casa", "ca", "insertion"], default="casa")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's frame size")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--min-frames", type=int, default=6)
    p.add_argument("--max-frames", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget; the LR schedule follows it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument(
        "--no-vision-probe",
        action="store_true",
        help="train without the auxiliary dense vision loss (a training-only head; see docs/training.md)",
    )
    p.add_argument(
        "--position-probe",
        type=float,
        default=0.0,
        metavar="W",
        help="weight of an auxiliary loss asking each image token where it lies (trains the vision "
        "position table of --abs-pos; a training-only head, docs/training.md)",
    )
    p.add_argument(
        "--world",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a WorldConfig field for the training clips, e.g. change_prob=0.85 (repeatable); "
        "validation and `casa eval` keep the default world",
    )
    p.add_argument(
        "--init", default=None, metavar="DIR",
        help="fine-tune: start from this checkpoint's weights and tokenizer (e.g. checkpoints/default)",
    )  # fmt: skip
    p.add_argument(
        "--questions", action="store_true",
        help="each training clip ends with a question about its last frame on a side branch "
        "(the question language of model/world/questions.py)",
    )  # fmt: skip
    p.add_argument(
        "--qa-clips", type=int, default=0,
        help="with --questions: this many more short clips a step, each ending with a question",
    )  # fmt: skip
    p.add_argument("--qa-frames", type=int, default=3, help="the short question clips' longest length")
    p.add_argument(
        "--qa-weight", action="append", default=[], metavar="KIND=W",
        help="with --questions: train on question kind KIND W times as often as a kind of weight 1 "
        "(repeatable; e.g. what_at=3)",
    )  # fmt: skip
    p.add_argument(
        "--qa-hard-negatives", type=float, default=0.0, metavar="P",
        help="with --questions: this share of the questions' random subjects are near misses (a present "
        "object's colour with another shape, or its shape with another colour)",
    )  # fmt: skip
    p.add_argument(
        "--abs-pos", type=int, default=None, metavar="N",
        help="give the vision tower an N x N table of absolute positions (zero at the start of a fine-tune; "
        "docs/training.md)",
    )  # fmt: skip
    p.add_argument(
        "--abs-pos-lr-scale", type=float, default=10.0, metavar="X",
        help="the position table's learning rate is X times --lr (default 10)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from casa_live.model.training.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(
        preset=args.preset,
        fusion=args.fusion,
        image_size=args.image_size,
        steps=args.steps,
        batch=args.batch,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        threads=args.threads,
        log_every=args.log_every,
        save_every=args.save_every,
        val_every=args.val_every,
        vision_probe=not args.no_vision_probe,
        position_probe=args.position_probe,
        time_budget_s=None if args.minutes is None else args.minutes * 60.0,
        world=world_overrides(args.world),
        init=args.init,
        questions=args.questions,
        qa_clips=args.qa_clips,
        qa_frames=args.qa_frames,
        qa_weights=qa_weights(args.qa_weight),
        qa_hard_negatives=args.qa_hard_negatives,
        abs_pos=args.abs_pos,
        abs_pos_lr_scale=args.abs_pos_lr_scale,
    )
    summary = train(cfg, args.out, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def qa_weights(items: list[str]) -> dict[str, float]:
    """["what_at=3", ...] -> {"what_at": 3.0}, kinds checked against the question language."""
    from casa_live.model.world.questions import KINDS

    out: dict[str, float] = {}
    for item in items:
        kind, sep, value = item.partition("=")
        if not sep or kind not in KINDS:
            raise SystemExit(f"--qa-weight {item!r}: expected KIND=W with KIND one of {', '.join(KINDS)}")
        try:
            out[kind] = float(value)
        except ValueError:
            raise SystemExit(f"--qa-weight {item!r}: W must be a number") from None
        if out[kind] < 0:
            raise SystemExit(f"--qa-weight {item!r}: W must be >= 0")
    return out


def world_overrides(items: list[str]) -> dict:
    """["change_prob=0.85", ...] -> {"change_prob": 0.85}, typed by the WorldConfig field."""
    import dataclasses

    from casa_live.model.world.scene import WorldConfig

    types = {f.name: type(f.default) for f in dataclasses.fields(WorldConfig)}
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types or key in ("size", "frames"):
            allowed = ", ".join(k for k in types if k not in ("size", "frames"))
            raise SystemExit(f"--world {item!r}: expected KEY=VALUE with KEY one of {allowed}")
        try:
            out[key] = types[key](value)
        except ValueError:
            raise SystemExit(f"--world {item!r}: {value!r} is not a {types[key].__name__}") from None
    return out
