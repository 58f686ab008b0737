"""Helpers shared by command modules."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (sections: model, data, train, run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. model.name=mamba-swelu-small train.lr=1e-3 data.source=corpus/")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (one of)")
    g.add_argument("--steps", type=int, help="optimizer steps (train.max_steps)")
    g.add_argument("--tokens", type=float, help="training tokens, e.g. 2.5e9 (train.max_tokens)")
    g.add_argument("--token-ratio", type=float,
                   help="tokens per parameter: 20 = Chinchilla, 100 = LLaMA-style (train.token_ratio)")


def budget_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "steps", None) is not None:
        out.append(f"train.max_steps={args.steps}")
    if getattr(args, "tokens", None) is not None:
        out.append(f"train.max_tokens={int(args.tokens)}")
    if getattr(args, "token_ratio", None) is not None:
        out.append(f"train.token_ratio={args.token_ratio}")
    return out


def console():
    """A rich Console; when stdout is not a terminal (a pipe, a log file) tables get room instead of wrapping."""
    import shutil
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=max(140, shutil.get_terminal_size((140, 24)).columns))
