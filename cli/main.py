"""`casa`: one command-line entry point; each subcommand lives in its own small module of cli/.

Subcommand modules import nothing heavy at import time (torch, the server) so `casa --help` is fast;
each defines `register(subparsers)` which adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from casa_live import cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casa", description="casa-live: streaming video captioning on CASA models"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        if info.name == "main" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"casa_live.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
