"""`casa convert SRC DST`: a Qwen2.5-VL or Kyutai CASA checkpoint -> our checkpoint format.

SRC is a directory or a Hugging Face repo id (ORG/NAME, optionally @REVISION or --revision), resolved
through the HF cache by model/checkpoint/hub.py: downloaded when online, the cache only with HF_HUB_OFFLINE=1.

The import is strict (every tensor consumed, every parameter filled); on failure the error lists
each missing or unexpected tensor under its checkpoint name and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="import a Qwen2.5-VL / Kyutai CASA checkpoint into casa-live's format",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="source directory (config.json, *.safetensors, tokenizer.json, ...) or a Hugging Face repo id "
        "ORG/NAME[@REV]",
    )
    p.add_argument("--revision", default=None, help="with a repo id: the branch, tag or commit to pin")
    p.add_argument("dst", help="output directory (created)")
    p.add_argument(
        "--casa-layers",
        default="all",
        help="Qwen2.5-VL only: blocks that get a CASA layer, 'all' or e.g. '0,2,4' (default all); "
        "with --shared on a Kyutai -Shared checkpoint: its CASA blocks",
    )
    p.add_argument("--shared", action="store_true", help="CASA layers reuse the self-attention weights")
    p.add_argument(
        "--fusion",
        choices=("casa", "ca", "insertion"),
        default="casa",
        help="Qwen2.5-VL only: fusion of the new layers (insertion = plain Qwen2.5-VL, no CASA layers)",
    )
    p.add_argument("--image-size", type=int, default=None, help="fixed frame side in pixels (default 448)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DST")


def parse_layers(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(
            f"--casa-layers: expected 'all' or comma-separated block indices, got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from casa_live.model.checkpoint.common import CheckpointError
    from casa_live.model.checkpoint.format import save_checkpoint
    from casa_live.model.checkpoint.hf import import_checkpoint
    from casa_live.model.checkpoint.hub import resolve_model
    from casa_live.model.config import CASAConfig

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        print(f"casa convert: {dst} exists and is not empty (use --force to overwrite)", file=sys.stderr)
        return 2
    casa = CASAConfig(fusion=args.fusion, layers=parse_layers(args.casa_layers), shared=args.shared)
    try:
        src = resolve_model(args.src, args.revision)
        model, tokenizer, gen, report = import_checkpoint(
            src, casa=casa, image_size=args.image_size, dtype=getattr(torch, args.dtype)
        )
    except CheckpointError as e:
        print(f"casa convert: {e}", file=sys.stderr)
        return 1
    save_checkpoint(dst, model, tokenizer, gen)
    print(report.summary())
    print(f"wrote {dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {args.dtype})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (tests): the same as `casa convert ...`."""
    p = argparse.ArgumentParser(prog="casa convert")
    add_arguments(p)
    return run(p.parse_args(argv))
