"""Perplexity of a model on text sources, one number per source.

    token_perplexity(model, tokens, seq_len=256)                 -> {"loss", "ppl", "tokens", "windows"}
    source_perplexity(model, tokenizer, "notes/", seq_len=256)   any source `lmlab.data.sources` reads
    run_validation_tokens(run_dir, tokenizer)                    a run's own validation split, rebuilt exactly

Text is tokenized the way training tokenizes it (`prepare_corpus`: documents joined by eos, no BOS, cached under
`cache_dir()/data/`), then scored in consecutive non-overlapping windows of `seq_len` tokens, the same windows
the trainer's validation uses (`eval_batches`). The loss is the mean next-token cross-entropy in nats over every
scored token; ppl = exp(loss).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import document_ids, eval_batches
from ..errors import DataError

log = logging.getLogger(__name__)


@torch.no_grad()
def token_perplexity(model, tokens: np.ndarray, seq_len: int, *, batch_size: int = 8, max_tokens: int | None = None,
                     eos_id: int | None = None, document_masking: bool = False) -> dict:
    """Mean loss and perplexity of `model` over the first `max_tokens` (default: all) of `tokens`, in windows of
    `seq_len` targets. With `document_masking` (and `eos_id`) the model resets its state at document ends, as it
    did in training."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    n_batches = max(1, math.ceil(n_windows / batch_size))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    loss_sum, count, windows = 0.0, 0, 0
    try:
        for x, y in eval_batches(tokens, seq_len, batch_size, n_batches):
            if windows >= n_windows:
                break
            x, y = x[: n_windows - windows].to(device), y[: n_windows - windows].to(device)  # (B, T)
            kw = {"seq_idx": document_ids(x, eos_id)} if document_masking and eos_id is not None else {}
            logits = model(x, **kw).logits  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            loss_sum += float(loss)
            count += y.numel()
            windows += x.size(0)
    finally:
        model.train(was)
    mean = loss_sum / count
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count, "windows": windows, "seq_len": seq_len}


def source_tokens(tokenizer, source, *, text_field: str = "text", max_docs: int | None = None) -> np.ndarray:
    """All tokens of `source` (documents joined by eos), tokenized once and cached like training data."""
    from ..data.shards import prepare_corpus

    return prepare_corpus(source, tokenizer, val_fraction=0.0, text_field=text_field, max_docs=max_docs).train


def source_perplexity(model, tokenizer, source, *, seq_len: int = 256, batch_size: int = 8,
                      max_tokens: int | None = None, text_field: str = "text", max_docs: int | None = None,
                      document_masking: bool = False) -> dict:
    """`token_perplexity` of `model` on a text source (file, folder, glob, jsonl, parquet, "stdlib", "hf:...")."""
    tokens = source_tokens(tokenizer, source, text_field=text_field, max_docs=max_docs)
    if len(tokens) <= seq_len:
        raise DataError(f"data source {source!r}: {len(tokens)} tokens, fewer than one window of {seq_len}; "
                        f"use a larger source or a smaller --seq-len")
    return token_perplexity(model, tokens, seq_len, batch_size=batch_size, max_tokens=max_tokens,
                            eos_id=tokenizer.eos_token_id, document_masking=document_masking)


def run_validation_tokens(run_dir: Path | str, tokenizer) -> tuple[np.ndarray, dict]:
    """The validation split of a run, rebuilt from its config.yaml with the same source, seed, val_fraction and
    max_docs (a cache hit when the run's shards are still there). Returns (tokens, info); info["matches_run"] is
    False when the data fingerprint differs from the one the run recorded (the source changed since)."""
    import json

    from ..config import load_config
    from ..data.shards import prepare_corpus

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    corpus = prepare_corpus(cfg.data.source, tokenizer, val_fraction=cfg.data.val_fraction,
                            seed=cfg.data.split_seed_for(cfg.train.seed),
                            text_field=cfg.data.text_field, max_docs=cfg.data.max_docs)
    recorded = None
    if (run_dir / "run.json").is_file():
        recorded = json.loads((run_dir / "run.json").read_text()).get("data_fingerprint")
    matches = recorded is None or recorded == corpus.fingerprint
    if not matches:
        log.warning("%s: the data changed since training (fingerprint %s, run recorded %s)", run_dir,
                    corpus.fingerprint, recorded)
    info = {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "fingerprint": corpus.fingerprint,
            "matches_run": matches, "document_masking": cfg.data.document_masking, "val_docs": corpus.val_docs}
    if len(corpus.val) == 0:
        raise DataError(f"{run_dir}: the run has no validation split (data.val_fraction={cfg.data.val_fraction})")
    return corpus.val, info
