"""lmlab serve under load: tokens/s and time to first token with 1, 8 and 32 concurrent clients, against the same
requests sent one after another, per model.

    python bench/bench_serve.py                                   mamba-swelu-small, llama-small, inl-small
    python bench/bench_serve.py --models mamba-swelu-tiny --concurrency 1 4 --max-tokens 32

Each model is built from its named size with random weights (speed does not depend on what the weights are)
and the vocabulary of a byte-level BPE trained on the Python standard library, exported to a folder, and served
by `lmlab serve` in its own process; the clients are one asyncio process streaming /v1/completions over HTTP.
Every request has its own prompt of --prompt-tokens tokens and asks for --max-tokens tokens (greedy; a request
that meets the end-of-text token stops early, and the token counts are what the server reports). For a
concurrency c the c requests start at once; "one after another" sends the same c requests each after the last
answer. tokens/s = all completion tokens / wall time; time to first token is the median over the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table

LAUNCH = "import sys; from lmlab import cli; sys.exit(cli.main(sys.argv[1:]))"


def build_folders(names: list[str], out: Path, vocab: int) -> dict[str, Path]:
    import torch

    from lmlab.data.tokenizer import load_tokenizer, train_bpe
    from lmlab.models import build_config, build_model
    from lmlab.models.export import export

    train_bpe("stdlib", vocab, out / "tok", max_chars=2_000_000)
    folders = {}
    for name in names:
        tok = load_tokenizer(str(out / "tok"))
        torch.manual_seed(0)
        model = build_model(build_config(name, vocab_size=len(tok))).eval()
        folders[name] = export(model, tok, out / name)
        print(f"built {name}: {sum(p.numel() for p in model.parameters()):,} parameters (random weights)",
              flush=True)
    return folders


def start_server(folder: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", str(folder), "--port", "0",
                          "--max-batch", str(max_batch)], stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        m = re.search(r"listening\s+(http://\S+)", line)
        if m:
            return p, m.group(1)
    raise RuntimeError(f"lmlab serve {folder} did not start (exit {p.wait()})")


async def one(client, url: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0].get("token_ids"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - t0, tokens


async def measure(url: str, prompts: list[list[int]], max_tokens: int, together: bool) -> tuple[float, float]:
    """(completion tokens/s, median time to first token) for `prompts` sent at once or one after another."""
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 1)) as client:
        t0 = time.perf_counter()
        if together:
            results = await asyncio.gather(*(one(client, url, p, max_tokens) for p in prompts))
        else:
            results = [await one(client, url, p, max_tokens) for p in prompts]
        wall = time.perf_counter() - t0
    return sum(n for _, n in results) / wall, statistics.median(t for t, _ in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mamba-swelu-small", "llama-small", "inl-small"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (every model's vocab_size)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = ap.parse_args()

    import random

    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmlab-bench-serve-") as tmp:
        folders = build_folders(args.models, Path(tmp), args.vocab)
        for name, folder in folders.items():
            proc, url = start_server(folder, args.threads, max(args.concurrency))
            try:
                asyncio.run(measure(url, [[rng.randrange(args.vocab) for _ in range(8)]], 4, False))  # warm-up
                for c in args.concurrency:
                    prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_tokens)] for _ in range(c)]
                    tps_c, ttft_c = asyncio.run(measure(url, prompts, args.max_tokens, together=True))
                    tps_s, ttft_s = asyncio.run(measure(url, prompts, args.max_tokens, together=False))
                    rows.append([name, c, f"{tps_c:,.0f}", f"{tps_s:,.0f}", f"{tps_c / tps_s:.2f}×",
                                 f"{ttft_c * 1000:,.0f}", f"{ttft_s * 1000:,.0f}"])
                    print(" | ".join(map(str, rows[-1])), flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    table(f"lmlab serve: {args.prompt_tokens}-token prompts, {args.max_tokens} new tokens each, greedy, "
          f"{args.threads} server threads",
          ["model", "clients", "tok/s together", "tok/s one after another", "speed-up",
           "TTFT ms together (median)", "TTFT ms alone (median)"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
