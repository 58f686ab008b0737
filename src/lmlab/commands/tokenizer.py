"""`lmlab tokenizer train SOURCE... --out DIR` and `lmlab tokenizer info SPEC`."""

from __future__ import annotations

import argparse
import time

from ._common import CONFIG_DEFAULT, add_alias_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train a byte-level BPE on SOURCE (files, folders, globs, jsonl/parquet, 'stdlib', 'hf:NAME')",
        description="Train a byte-level BPE (with <|endoftext|>) and save it so AutoTokenizer can load it.",
    )
    t.add_argument("source", nargs="+", metavar="SOURCE", help="text to train on; several are concatenated")
    t.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="vocabulary size (default 4096)")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (tokenizer.json + config)")
    add_alias_flags(t, ("--text-field",), default=CONFIG_DEFAULT)
    t.add_argument("--max-chars", type=int, default=None, metavar="N", help="train on the first N characters")
    i = sub.add_parser(
        "info",
        help="show vocab size, eos token and fingerprint",
        description="Show a tokenizer's vocab size, eos token and fingerprint.",
    )
    i.add_argument("path", metavar="PATH", help="tokenizer folder, tokenizer.json, hub id, or 'stdlib-bpe'")


def run(args: argparse.Namespace) -> int:
    from lmlab.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe

    if args.action == "train":
        source = args.source[0] if len(args.source) == 1 else args.source
        t0 = time.perf_counter()
        tok = train_bpe(source, args.vocab_size, args.out, args.text_field, args.max_chars)
        print(
            f"trained byte-level BPE: {len(tok)} tokens in {time.perf_counter() - t0:.1f} s -> {args.out} "
            f"(fingerprint {tokenizer_fingerprint(tok)})"
        )
        return 0
    tok = load_tokenizer(args.path)
    print(f"tokenizer    {args.path}")
    print(f"class        {type(tok).__name__}")
    print(f"vocab size   {len(tok)}")
    print(f"eos          {tok.eos_token!r} (id {tok.eos_token_id})")
    print(f"fingerprint  {tokenizer_fingerprint(tok)}")
    return 0
