"""lmlab generate: sample from a run or an exported model, streaming to the terminal."""

from __future__ import annotations

import sys

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
    from ..inference import load_for_inference

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
