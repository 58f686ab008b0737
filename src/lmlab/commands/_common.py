"""What several commands share, each defined once: the config flags (-c, KEY=VALUE, the short flags that alias
config keys and the listing of every key in --help), and the sampling, device, template, hardware and budget flags.

A short flag is an alias of one config key (ALIASES): it is typed, checked and documented by that key
(lmlab.config), and it becomes a `key=value` override, so a flag and its KEY=VALUE spelling cannot differ.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from typing import Any

# flag -> the config key it sets: the one table of short flags (every command that takes one takes it from here)
ALIASES: dict[str, str] = {
    "--model": "model.name",
    "--data": "data.source",
    "--text-field": "data.text_field",
    "--seq-len": "data.seq_len",
    "--steps": "train.max_steps",
    "--tokens": "train.max_tokens",
    "--token-ratio": "train.token_ratio",
    "--lr": "train.lr",
    "--batch": "train.batch_size",
    "--grad-accum": "train.grad_accum",
    "--optimizer": "train.optimizer",
    "--momentum": "train.momentum",
    "--checkpointing": "train.activation_checkpointing",
    "--method": "finetune.method",
    "--template": "finetune.template",
    "--lora-rank": "finetune.lora_rank",
    "--name": "run.name",
    "--out": "run.out_dir",
}
BUDGET = ("--steps", "--tokens", "--token-ratio")  # one of them, or none (train.max_steps's help says so)
CONFIG_DEFAULT = object()  # add_alias_flags(default=...): the config key's own default, not None


def add_alias_flags(p: argparse.ArgumentParser, flags: Sequence[str], *, group: Any = None,
                    help: dict[str, str] | None = None, nargs: dict[str, str] | None = None,
                    default: Any = None) -> None:
    """Add `flags` (keys of ALIASES) to `p` (or to `group`, one of its argument groups). Each is typed and checked
    by its config key: a bad value is one line naming the key and the flag. `help` replaces a key's help text
    for this command (the key is still named); `nargs` gives a flag several values (a list for the key);
    `default` is None (unset: the config file or the key's default decides) or CONFIG_DEFAULT."""
    from .. import config

    target = group if group is not None else p
    registry = dict(p.get_default("_aliases") or {})
    for flag in flags:
        key = config.keys()[ALIASES[flag]]
        dest = flag.lstrip("-").replace("-", "_")
        value = key.default if default is CONFIG_DEFAULT else default
        shown = f"; default {key.shown_default()}" if default is CONFIG_DEFAULT else ""
        text = f"{(help or {}).get(flag) or key.help} ({key.name}{shown})"
        if key.type is bool:
            target.add_argument(flag, dest=dest, action="store_true", default=value, help=text)
        else:
            metavar = "{" + ",".join(map(str, key.choices)) + "}" if key.choices else None
            target.add_argument(flag, dest=dest, type=_converter(key.name, flag), default=value, metavar=metavar,
                                nargs=(nargs or {}).get(flag), help=text)
        registry[dest] = (key.name, flag)
    p.set_defaults(_aliases=registry)


def _converter(key: str, flag: str):
    from .. import config
    from ..errors import ConfigError

    def convert(text: str) -> Any:
        try:
            return config.coerce(key, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(name_flag(str(e), {key: flag})) from None

    convert.__name__ = key  # what argparse names in its own messages
    return convert


def alias_overrides(args: argparse.Namespace) -> list[str]:
    """`key=value` overrides (values as JSON, which YAML reads back unchanged) for the alias flags given."""
    out = []
    for dest, (key, _) in (getattr(args, "_aliases", None) or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def name_flag(message: str, flags: dict[str, str]) -> str:
    """`key: msg` as `key: msg (--flag)` when `key` has a flag here (`flags`: key -> flag)."""
    key, sep, _ = message.partition(": ")
    if sep and key in flags and not message.endswith(f"({flags[key]})"):
        return f"{message} ({flags[key]})"
    return message


def flags_of(args: argparse.Namespace) -> dict[str, str]:
    """config key -> its alias flag, for the command `args` were parsed for."""
    return {key: flag for key, flag in (getattr(args, "_aliases", None) or {}).values()}


def add_config_flags(p: argparse.ArgumentParser, flags: Sequence[str] = (), *, sections: Sequence[str] | None = None,
                     help: dict[str, str] | None = None, nargs: dict[str, str] | None = None, config_file: bool = True,
                     overrides_help: str | None = None, epilog: str = "") -> None:
    """-c FILE, KEY=VALUE overrides, the alias `flags` (the budget ones in their own group), and an epilog that
    lists every key of `sections` (default: all) with its default and help, then `epilog`."""
    if config_file:
        p.add_argument("-c", "--config", help="YAML config file (sections: " + ", ".join(config_sections()) + ")")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=overrides_help or "dotted overrides, e.g. model.name=mamba-swelu-small train.lr=1e-3 "
                                          "(every key is listed below)")
    plain = [f for f in flags if f not in BUDGET]
    add_alias_flags(p, plain, help=help, nargs=nargs)
    budget = [f for f in flags if f in BUDGET]
    if budget:
        add_alias_flags(p, budget, group=p.add_argument_group("budget (one of)"), help=help)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    flags_here = {key: flag for key, flag in (p.get_default("_aliases") or {}).values()}
    p.epilog = config_keys_help(sections, flags_here, config_file) + (f"\n\n{epilog}" if epilog else "")


def config_sections() -> tuple[str, ...]:
    import dataclasses

    from ..config import Config

    return tuple(f.name for f in dataclasses.fields(Config))


def config_keys_help(sections: Sequence[str] | None = None, flags: dict[str, str] | None = None,
                     config_file: bool = True, width: int = 100) -> str:
    """Every key of `sections` (default: all), grouped by section: `key=default  {choices}  [--flag]` and its
    help below."""
    from .. import config

    flags, sections = flags or {}, sections or config_sections()
    out = [f"config keys (KEY=VALUE{' or the -c file' if config_file else ''}; the value shown is the default, "
           f"a [--flag] sets the same key):"]
    for section in sections:
        out.append(f"\n{section}:")
        for k in (k for k in config.keys().values() if k.name.startswith(section + ".")):
            head = f"  {k.name}={k.shown_default()}"
            if k.choices:
                head += "  {" + ", ".join(map(str, k.choices)) + "}"
            if k.name in flags:
                head += f"  [{flags[k.name]}]"
            out.append(head)
            out += textwrap.wrap(k.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                 break_on_hyphens=False)
        if section == "model":
            out.append("  model.KEY=VALUE\n      a named size's own settings, e.g. model.d_model=512 (lmlab models "
                       "--family F lists a family's sizes)")
    return "\n".join(out)


# ----------------------------------------------------------------------------------- flags without a config key
def add_device_flag(p: Any, help: str = "where the model runs") -> None:
    """--device: the choices of train.device (lmlab.config.Device)."""
    import typing

    from ..config import Device

    choices = typing.get_args(Device)
    p.add_argument("--device", default="auto", choices=choices, help=f"{help}: {', '.join(choices)} (default auto)")


def add_template_flag(p: Any) -> None:
    """--template of a chat model: the choices of finetune.template (lmlab.config.Template)."""
    import typing

    from ..config import Template

    choices = typing.get_args(Template)
    p.add_argument("--template", default="auto", choices=choices, metavar="TEMPLATE",
                   help=f"chat template: {', '.join(choices)} (default auto: the tokenizer's own, else plain)")


def add_sampling_flags(p: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float) -> None:
    """How new tokens are drawn (generate, chat, compare); the defaults are the command's. sampling_config checks
    them."""
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"new tokens at most (default {max_new_tokens})")
    g.add_argument("-t", "--temperature", type=float, default=temperature,
                   help=f"softmax temperature, 0 = greedy (default {temperature:g})")
    g.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens, 0 = off (default 50)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="sample from the smallest set holding this probability, 1 = off (default 0.95)")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")


def sampling_config(args: argparse.Namespace, eos_id: int | None = None):
    """The SamplingConfig of add_sampling_flags' flags, checked (one line naming the flag)."""
    import math

    from ..errors import ConfigError
    from ..generate import SamplingConfig

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature: must be a number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0: off), got {args.top_k}")
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                          top_k=args.top_k, top_p=args.top_p, eos_id=eos_id)


def add_hardware_flags(p: Any, *, hardware: str | None = None, gpus: int | None = None, gpus_flag: bool = True,
                       price: bool = True, hardware_help: str = "", gpus_help: str = "") -> None:
    """--hardware (a GPU of the planner's table), --gpus (data-parallel devices) and --price-per-hour; the help
    says what the command does with them, the defaults are the command's."""
    from ..plan.hardware import HARDWARE

    p.add_argument("--hardware", default=hardware,
                   help=f"GPU model ({', '.join(HARDWARE)}, cpu)" + (f": {hardware_help}" if hardware_help else "")
                   + (f" (default {hardware})" if hardware else ""))
    if gpus_flag:
        p.add_argument("--gpus", type=int, default=gpus,
                       help="data-parallel GPUs" + (f": {gpus_help}" if gpus_help else "")
                       + (f" (default {gpus})" if gpus else ""))
    if price:
        p.add_argument("--price-per-hour", type=float,
                       help="USD per GPU-hour (default: the hardware table's typical price)")


def console():
    """A rich Console; when stdout is not a terminal (a pipe, a log file) tables get room instead of wrapping."""
    import shutil
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=max(140, shutil.get_terminal_size((140, 24)).columns))
