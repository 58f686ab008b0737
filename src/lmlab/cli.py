"""The `lmlab` command. Each subcommand lives in `lmlab.commands.<module>` and provides

    HELP: str                                   one line for `lmlab --help`
    add_arguments(p: argparse.ArgumentParser)   its flags
    run(args: argparse.Namespace) -> int        the work (exit code)

Modules are imported only when their command runs, so `lmlab --help` stays fast.
User errors (LmlabError) become one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under lmlab.commands
COMMANDS: dict[str, str] = {
    "quickstart": "quickstart",
    "pretrain": "pretrain",
    "resume": "resume",
    "generate": "generate",
    "models": "models",
    "tokenizer": "tokenizer",
    "estimate": "estimate",
    "inspect": "inspect",
}


def _load(module: str):
    return importlib.import_module(f"lmlab.commands.{module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab",
        description="Pretrain, fine-tune, evaluate and compare small language models.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        mod = _load(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from . import __version__

    return f"lmlab {__version__}"


def main(argv: list[str] | None = None) -> int:
    from .errors import LmlabError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except LmlabError as e:
        print(f"lmlab {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
