"""lmlab generate: sample from a run or an exported model, streaming to the terminal."""

from __future__ import annotations

import dataclasses
import sys

from ._common import add_device_flag, add_sampling_flags, sampling_config


def add_arguments(p) -> None:
    p.add_argument("model", help="run folder (uses final/ or its latest checkpoint), model folder, or hub id")
    p.add_argument("-p", "--prompt", default="", help="prompt text (default: read stdin if piped)")
    add_sampling_flags(p, max_new_tokens=128, temperature=0.8)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context per token (slow)")
    add_device_flag(p)


def run(args) -> int:
    import torch

    from ..generate import TextStreamer, generate

    sampling = sampling_config(args)  # checked before the model loads
    prompt = args.prompt
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    from ..inference import load_for_inference

    model, tok = load_for_inference(args.model, args.device)
    ids = tok.encode(prompt) if prompt else [tok.eos_token_id]
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    cfg = dataclasses.replace(sampling, eos_id=None if args.no_stop else tok.eos_token_id)
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    gen = torch.Generator(device=dev).manual_seed(args.seed)
    generate(model, x, cfg, generator=gen, use_cache=not args.no_cache, on_token=TextStreamer(tok, write))
    sys.stdout.write("\n")
    return 0
