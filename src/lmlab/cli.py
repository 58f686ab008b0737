"""The `lmlab` command. Each subcommand lives in `lmlab.commands.<module>` and provides

    add_arguments(p: argparse.ArgumentParser)   its flags (shared ones from lmlab.commands._common)
    run(args: argparse.Namespace) -> int        the work (exit code)

and its one-line help is the listing below (the only place it is written). A command's module is imported only
when that command runs, so `lmlab --help` imports neither torch nor transformers.
User errors (LmlabError, and flags argparse refuses) become one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # under lmlab.commands
    help: str  # one line for `lmlab --help`, and the command's description


# command name -> Command(module, help)
COMMANDS: dict[str, Command] = {
    "quickstart": Command("quickstart", "train mamba-swelu-tiny on the Python standard library in ~2 minutes on a CPU "
                                        "(no network needed)"),
    "pretrain": Command("pretrain", "pretrain a model on raw text (new run folder under runs/)"),
    "resume": Command("resume", "continue a run from its latest checkpoint (model, optimizer, RNG and data position "
                                "restored)"),
    "finetune": Command("finetune", "instruction-tune a model (full, LoRA or QLoRA) on chat data: assistant-only loss,"
                                    " leak-free packing"),
    "dpo": Command("dpo", "preference-tune a model with DPO on chosen/rejected pairs (full, LoRA or QLoRA)"),
    "grpo": Command("grpo", "reinforcement learning with verifiable rewards (GRPO): sample groups of answers, reward "
                            "them, learn from the better ones"),
    "export": Command("export", "write a run's model folder, its LoRA adapter folder (--merge: adapters folded into "
                                "the base) or a GGUF file for llama.cpp (--format gguf), each with a model card"),
    "serve": Command("serve", "serve a run or model over an OpenAI-compatible HTTP API (chat, completions, streaming) "
                              "with a chat page"),
    "push": Command("push", "upload a run's exported model (weights, tokenizer, model card) to the Hugging Face Hub"),
    "recipes": Command("recipes", "list fine-tuning recipes (Alpaca, Vicuna, LoRA, QLoRA, DPO, ...) or print one as "
                                  "YAML to copy"),
    "advise": Command("advise", "score a fine-tuning setup (config, recipe or run) against the rules of thumb: LR, "
                                "batch, steps, warmup"),
    "chat": Command("chat", "chat with a run or model: streaming, template-aware, with history, system prompt, /reset "
                            "and /exit"),
    "compare": Command("compare", "answer the same prompts with two models (base vs tuned) side by side; score "
                                  "optional reference answers"),
    "generate": Command("generate", "generate text from a run, an exported model folder, or a hub model"),
    "models": Command("models", "list model families and named sizes with exact parameter counts"),
    "tokenizer": Command("tokenizer", "train a byte-level BPE tokenizer on your data, or show a tokenizer's vocab "
                                      "size, eos and fingerprint"),
    "estimate": Command("estimate", "plan a training run: parameters, memory per GPU (does it fit?), FLOPs, time and "
                                    "cost"),
    "inspect": Command("inspect", "show the per-layer SWELU k and λ of a run over training (table and plot)"),
    "import": Command("import_", "convert an original MambaSWELU / INL-LLM .pt checkpoint into a model folder "
                                 "(config.json + safetensors)"),
    "eval": Command("eval", "perplexity per data source and benchmarks (lm-eval) of a run or model; two models: print "
                            "deltas"),
    "study": Command("study", "run a study (a grid of runs from one YAML file) on this machine, Slurm or Ray; re-run "
                              "to resume it"),
    "report": Command("report", "write a self-contained HTML report (+ markdown, CSV) comparing the runs of a study or"
                                " a list of runs"),
    "watch": Command("watch", "live dashboard of one or more runs in the terminal (works over SSH)"),
    "status": Command("status", "where runs stand: status, step, loss, val loss, ETA, checkpoint, disk (text or "
                                "--json)"),
    "plot": Command("plot", "plot loss, val loss, LR and throughput of one or more runs to an image file"),
    "doctor": Command("doctor", "diagnose runs: divergence, spikes, stalls, overfitting, slow or starved GPUs, "
                                "checkpoints, disk"),
}


def _load(module: str):
    return importlib.import_module(f"lmlab.commands.{module}")


class Parser(argparse.ArgumentParser):
    """argparse, with a refused flag or value reported on one line (`lmlab CMD: error: ...`, exit 2) like every
    other user error; `--help` shows the usage."""

    def error(self, message: str):
        import re

        message = re.sub(r"^argument [^:]+: (?=.*\(--[\w-]+\)$)", "", message)  # it names the flag itself
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (for its flags), so `lmlab --help` stays light."""
    parser = Parser(
        prog="lmlab",
        description="Pretrain, fine-tune, evaluate and compare small language models.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name == command:
            mod = _load(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from . import __version__

    return f"lmlab {__version__}"


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, with `key=value` overrides also taken after flags (`lmlab resume RUN --force
    train.max_steps=20`: argparse alone fills the positional list once, before the flag, and refuses the rest)."""
    args, extra = parser.parse_known_args(argv)
    if isinstance(getattr(args, "overrides", None), list):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from .errors import LmlabError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args = _parse(parser, argv)
    except SystemExit as e:
        if e.code == 2:  # refused, and said so on one line
            return 2
        raise
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except LmlabError as e:
        from .commands._common import flags_of, name_flag

        print(f"lmlab {args.command}: error: {name_flag(str(e), flags_of(args))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmlab doctor runs/* | head`: the reader left; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
