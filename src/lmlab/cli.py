"""The `lmlab` command. Each subcommand lives in `lmlab.commands.<module>` and provides

    HELP: str                                   one line for `lmlab --help`
    add_arguments(p: argparse.ArgumentParser)   its flags
    run(args: argparse.Namespace) -> int        the work (exit code)

A command's module is imported only when that command runs, so `lmlab --help` imports neither torch
nor transformers.
User errors (LmlabError) become one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under lmlab.commands, one line for `lmlab --help`; the module's HELP says the same)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "train mamba-swelu-tiny on the Python standard library in ~3 minutes on a CPU "
                                 "(no network needed)"),
    "pretrain": ("pretrain", "pretrain a model on raw text (new run folder under runs/)"),
    "resume": ("resume", "continue a run from its latest checkpoint (model, optimizer, RNG and data position "
                         "restored)"),
    "finetune": ("finetune", "instruction-tune a model (full, LoRA or QLoRA) on chat data: assistant-only loss, "
                             "leak-free packing"),
    "dpo": ("dpo", "preference-tune a model with DPO on chosen/rejected pairs (full, LoRA or QLoRA)"),
    "grpo": ("grpo", "reinforcement learning with verifiable rewards (GRPO): sample groups of answers, reward them, "
                     "learn from the better ones"),
    "export": ("export", "write a run's model folder, its LoRA adapter folder (--merge: adapters folded into the base) "
                         "or a GGUF file for llama.cpp (--format gguf), each with a model card"),
    "serve": ("serve", "serve a run or model over an OpenAI-compatible HTTP API (chat, completions, streaming) with "
                       "a chat page"),
    "push": ("push", "upload a run's exported model (weights, tokenizer, model card) to the Hugging Face Hub"),
    "recipes": ("recipes", "list fine-tuning recipes (Alpaca, Vicuna, LoRA, QLoRA, DPO, ...) or print one as YAML "
                           "to copy"),
    "advise": ("advise", "score a fine-tuning setup (config, recipe or run) against the rules of thumb: LR, batch, "
                         "steps, warmup"),
    "chat": ("chat", "chat with a run or model: streaming, template-aware, with history, system prompt, /reset and "
                     "/exit"),
    "compare": ("compare", "answer the same prompts with two models (base vs tuned) side by side; score optional "
                           "reference answers"),
    "generate": ("generate", "generate text from a run, an exported model folder, or a hub model"),
    "models": ("models", "list model families and named sizes with exact parameter counts"),
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer on your data, or show a tokenizer's vocab size, "
                               "eos and fingerprint"),
    "estimate": ("estimate", "plan a training run: parameters, memory per GPU (does it fit?), FLOPs, time and "
                             "cost"),
    "inspect": ("inspect", "show the per-layer SWELU k and λ of a run over training (table and plot)"),
    "import": ("import_", "convert an original MambaSWELU / INL-LLM .pt checkpoint into a model folder "
                          "(config.json + safetensors)"),
    "eval": ("eval", "perplexity per data source and benchmarks (lm-eval) of a run or model; two models: print "
                     "deltas"),
    "study": ("study", "run a study (a grid of runs from one YAML file) on this machine, Slurm or Ray; re-run to "
                       "resume it"),
    "report": ("report", "write a self-contained HTML report (+ markdown, CSV) comparing the runs of a study or a "
                         "list of runs"),
    "watch": ("watch", "live dashboard of one or more runs in the terminal (works over SSH)"),
    "status": ("status", "where runs stand: status, step, loss, val loss, ETA, checkpoint, disk (text or --json)"),
    "plot": ("plot", "plot loss, val loss, LR and throughput of one or more runs to an image file"),
    "doctor": ("doctor", "diagnose runs: divergence, spikes, stalls, overfitting, slow or starved GPUs, "
                         "checkpoints, disk"),
}


def _load(module: str):
    return importlib.import_module(f"lmlab.commands.{module}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (for its flags), so `lmlab --help` stays light."""
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    from .errors import LmlabError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
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
    except BrokenPipeError:  # `lmlab doctor runs/* | head`: the reader left; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
