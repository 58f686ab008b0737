"""Perplexity of a model on text sources, one number per source.

    token_perplexity(model, tokens, seq_len=256)                 -> {"loss", "ppl", "tokens", "windows"}
    source_perplexity(model, tokenizer, "notes/", seq_len=256)   any source `lmlab.data.sources` reads
    run_validation_tokens(run_dir, tokenizer)                    a run's own validation split, rebuilt exactly
    run_split_score(model, tokenizer, run_dir, seq_len=256)      that split scored, for any objective

Text is tokenized the way training tokenizes it (`prepare_corpus`: documents joined by eos, no BOS, cached under
`cache_dir()/data/`), then scored in consecutive non-overlapping windows of `seq_len` tokens, the same windows
the trainer's validation uses (`eval_batches`). The loss is the mean next-token cross-entropy in nats over every
scored token; ppl = exp(loss).

A fine-tuned run's split is not text: `run_split_score` rebuilds its held-out examples as the trainer did
(`lmlab.train.objectives.held_out_batches`: the run's sources, split, template and encoding) and scores the
loss on their targets (the assistant turns of an SFT run); for preference pairs (DPO and kin) it scores the
chosen replies and how often the model gives the chosen reply the higher log-probability.
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


def run_tokenizer(run_dir: Path | str):
    """The tokenizer a run trained with: its final/ export, else the copy in the run folder."""
    from ..data.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    for folder in (run_dir / "final", run_dir / "tokenizer"):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(str(folder))
    raise DataError(f"{run_dir}: no tokenizer in final/ or tokenizer/")


def run_split_score(model, tokenizer, run_dir: Path | str, *, seq_len: int | None = None, batch_size: int = 8,
                    max_tokens: int | None = None, document_masking: bool = False) -> dict:
    """`model` scored on the held-out split of the run at `run_dir`. Returns {"loss", "ppl", "tokens", "split",
    "source", ...}; "split" says what was scored ("text", "held-out examples (…)", "held-out preference pairs").

    Text splits (pretraining) are re-tokenized with `tokenizer`, the model's own. Held-out examples are encoded
    with the run's tokenizer, so a model is scored on them only when its tokenizer tokenizes alike (DataError)."""
    from ..config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.train.objective == "pretrain":
        tokens, info = run_validation_tokens(run_dir, tokenizer)
        r = token_perplexity(model, tokens, seq_len or cfg.data.seq_len, batch_size=batch_size,
                             max_tokens=max_tokens, eos_id=tokenizer.eos_token_id, document_masking=document_masking)
        return {**r, "split": "text", "source": info["source"], "matches_run": info["matches_run"]}
    return heldout_score(model, tokenizer, run_dir, cfg)


@torch.no_grad()
def heldout_score(model, tokenizer, run_dir: Path, cfg) -> dict:
    """The held-out examples of a fine-tuning run (train.objective other than pretrain), scored on `model`."""
    from ..data.tokenizer import tokenizer_fingerprint
    from ..runtime import Runtime
    from ..train.objectives import held_out_batches

    run_tok = run_tokenizer(run_dir)
    if tokenizer_fingerprint(run_tok) != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{run_dir.name}: its examples are encoded with another tokenizer than this model's")
    device = next(model.parameters()).device
    objective, batches = held_out_batches(cfg, run_tok, Runtime(device=device, precision="fp32"))
    if not batches:
        raise DataError(f"{run_dir.name}: no held-out examples (data.val_fraction={cfg.data.val_fraction})")
    source = cfg.data.source if isinstance(cfg.data.source, str) else ", ".join(map(str, cfg.data.source))
    template = getattr(getattr(objective, "format", None), "name", cfg.finetune.template)
    was = model.training
    model.eval()
    try:
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        if "targets" in batches[0]:  # token targets (sft): the objective's own loss, summed, over its count
            loss = sum(float(objective.loss(model, b)[0]) for b in batches)
            count = sum(int(objective.count(b)) for b in batches)
            what = "assistant turns" if cfg.finetune.train_on == "assistant" else "every token"
            mean = loss / max(count, 1)
            return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count,
                    "split": f"held-out examples ({what}, template {template})", "source": source}
        if "chosen_input_ids" in batches[0]:
            return _pairs_score(model, batches) | {"split": f"held-out preference pairs (chosen replies, template "
                                                            f"{template})", "source": source}
    finally:
        model.train(was)
    raise DataError(f"{run_dir.name}: train.objective={cfg.train.objective} holds out neither text, examples "
                    f"nor preference pairs")


def _pairs_score(model, batches) -> dict:
    """Loss per token of the chosen replies; preference accuracy: log π(chosen) > log π(rejected), per pair."""
    from ..train.dpo import sequence_logps

    nll, tokens, wins, pairs = 0.0, 0, 0, 0
    for b in batches:
        logp = {}
        for side in ("chosen", "rejected"):
            ids, labels = b[f"{side}_input_ids"], b[f"{side}_labels"]
            logp[side] = sequence_logps(model(ids).logits, labels)
            if side == "chosen":
                nll -= float(logp[side].sum())
                tokens += int((labels[:, 1:] != -100).sum())
        wins += int((logp["chosen"] > logp["rejected"]).sum())
        pairs += int(b["chosen_input_ids"].shape[0])
    mean = nll / max(tokens, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": tokens, "pairs": pairs,
            "preference_accuracy": wins / max(pairs, 1)}
