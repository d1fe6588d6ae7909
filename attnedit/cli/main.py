"""The ``attnedit`` command. Each subcommand lives in its own module here and registers itself.

Errors a user can fix are printed as one line (``attnedit: error: ...``, exit code 2), never as a
traceback; set ``ATTNEDIT_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import AttnEditError

# subcommand modules, in the order the pipeline runs; each defines add_parser(subparsers)
COMMANDS = ["edit", "recipe_cmd", "convert", "inspect_cmd", "eval_cmd", "bench_cmd", "passkey_cmd", "report_cmd", "export_cmd"]

DESCRIPTION = """\
attnedit converts a trained causal LM's attention into a cheaper one (MLA or gated hybrid
sliding-window attention) and distils it back to the teacher's quality.

pipeline:  edit -> stage 1 (layer-wise teacher forcing) -> stage 2 (model-level KD) -> eval -> export
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnedit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"attnedit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # building the parser imports torch and transformers (seconds): Ctrl-C there is an interrupt too
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except AttnEditError as e:
        if os.environ.get("ATTNEDIT_DEBUG"):
            raise
        print(f"attnedit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnedit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
