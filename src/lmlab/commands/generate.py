"""lmlab generate: sample from a run or an exported model, streaming to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "generate text from a run, an exported model folder, or a hub model"


def add_arguments(p) -> None:
    p.add_argument("model", help="run folder (uses final/ or its latest checkpoint), model folder, or hub id")
    p.add_argument("-p", "--prompt", default="", help="prompt text (default: read stdin if piped)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context per token (slow)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def load_for_inference(spec: str, device: str = "auto"):
    """(model, tokenizer) from a run folder, a model folder or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import load_tokenizer
    from ..errors import LmlabError
    from ..train.runtime import pick_device

    dev = pick_device(device)
    path = Path(spec)
    if (path / "run.json").is_file() or (path / "config.yaml").is_file():  # a run folder
        if (path / "final" / "config.json").is_file():
            path = path / "final"
        else:
            from ..config import load_config
            from ..train import checkpoint as ckpt
            from ..train.setup import build_model

            latest = ckpt.latest_checkpoint(path / "checkpoints")
            if latest is None:
                raise LmlabError(f"{spec}: run has neither final/ nor a complete checkpoint yet")
            cfg = load_config(path / "config.yaml")
            tok = load_tokenizer(str(path / "tokenizer"))
            model = build_model(cfg, tok)
            ckpt.load_checkpoint(latest, model)
            return model.to(dev).eval(), tok
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmlabError(f"{spec}: no config.json (not a model folder or run folder)")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the generated text is the output
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.to(dev).eval(), load_tokenizer(str(path))
    from ..models.hf import load_model

    model = load_model(spec)
    return model.to(dev).eval(), load_tokenizer(spec)


def run(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..generate import SamplingConfig, TextStreamer, generate

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")
    prompt = args.prompt
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    model, tok = load_for_inference(args.model, args.device)
    ids = tok.encode(prompt) if prompt else [tok.eos_token_id]
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, eos_id=None if args.no_stop else tok.eos_token_id)
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    gen = torch.Generator(device=dev).manual_seed(args.seed)
    generate(model, x, cfg, generator=gen, use_cache=not args.no_cache, on_token=TextStreamer(tok, write))
    sys.stdout.write("\n")
    return 0
