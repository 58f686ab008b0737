"""Objectives: what the trainer optimises. The loop asks an objective for the loss of a batch; it knows
nothing else about the task.

    objective.data(cfg, tokenizer, rt)   → ObjectiveData: a resumable train stream, validation batches,
                                          the data manifest (fingerprints) and summary lines
    objective.count(batch)               → how many units the loss sums over (target tokens, pairs)
    objective.loss(model, batch)         → (summed loss, {metric: summed value}) — sums, never means
    objective.setup(model, wrapped, rt)  → once, after the strategy wrapped the model (reference models)
    objective.before_step(model, step)   → before each step's batches are drawn (on-policy rollouts)

The trainer divides by the total count over every micro-batch of an optimizer step and every rank, so a
batch with few targets (masked labels, short examples) weighs exactly as much as its targets. Metrics are
sums too and are normalised the same way.

A batch is a dict of tensors; `input_ids` (b, l) and `targets` (b, l) (the next token at each position,
-100 where nothing is predicted) for token objectives, optional `seq_idx` (b, l) for packed documents.

The token losses go through lmlab.train.losses: with train.chunked_loss (auto: when a micro-batch's fp32 logits
exceed train.loss_chunk_mb) the LM head and the loss run a chunk of tokens at a time and the full logits never
exist; `token_loss_sum` on the logits is the plain path.

A new objective is one class plus one `register_objective` line (see tests/test_objectives.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..data.loader import document_ids
from ..errors import ConfigError
from .losses import LossChunking, lm_loss_sum, token_loss_sum, upcast_half  # noqa: F401  (re-exported)

Batch = dict[str, torch.Tensor]


class TrainStream(Protocol):
    """A deterministic, resumable source of training batches for this rank."""

    def next(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class ObjectiveData:
    train: TrainStream
    val: Callable[[], Iterable[Batch]]  # a fresh iterator over the fixed validation batches
    manifest: dict[str, Any] = field(default_factory=dict)  # written into run.json: fingerprints, counts
    lines: list[str] = field(default_factory=list)  # what the trainer prints about the data
    baseline_ppl: Callable[[], float | None] = lambda: None  # a reference perplexity for the summary


class Objective:
    name = "objective"
    unit = "tokens"  # what count() counts, for the logs

    def __init__(self, cfg):
        self.cfg = cfg

    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        raise NotImplementedError

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["targets"] != -100).sum()

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    _chunking: LossChunking | None = None

    @property
    def chunking(self) -> LossChunking:
        """Whether a micro-batch's LM head and loss run chunk by chunk: train.chunked_loss and train.loss_chunk_mb,
        unless set (tests and benchmarks set a policy of their own)."""
        return self._chunking if self._chunking is not None else LossChunking.of(self.cfg)

    @chunking.setter
    def chunking(self, value: LossChunking) -> None:
        self._chunking = value

    def check_model(self, model) -> None:
        """Refuse, before any compute, a model this objective cannot train with the run's settings (subclasses
        call this too)."""
        self.chunking.check(model)

    def setup(self, model, wrapped, rt) -> None:
        """Once, after the model is on its device and wrapped by the strategy (sharded under FSDP), before a
        checkpoint is restored: build what the loss needs beside the policy (a frozen reference model)."""

    def before_step(self, model, step: int) -> None:
        """At the start of every optimizer step, before its batches are drawn from `data().train`: work that
        needs the current weights, such as sampling rollouts for on-policy objectives. `step` is the number of
        steps already taken. The model is in train mode on entry and must be on return."""


def model_output(model, batch: Batch):
    """The model's forward on a token batch; packed-document ids go to models that declare they honour them."""
    if "seq_idx" in batch:
        return model(batch["input_ids"], seq_idx=batch["seq_idx"])
    return model(batch["input_ids"])


def model_logits(model, batch: Batch) -> torch.Tensor:
    """(b, l, V) logits of `model_output`."""
    return model_output(model, batch).logits


# ------------------------------------------------------------------------------------------- pretraining
class _TokenStream:
    """TokenBatches as batches of the objective's form."""

    def __init__(self, windows, eos_id: int | None):
        self.windows, self.eos_id = windows, eos_id

    def next(self) -> Batch:
        return _token_batch(*self.windows.next(), self.eos_id)

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)


def _token_batch(x: torch.Tensor, y: torch.Tensor, eos_id: int | None) -> Batch:
    batch = {"input_ids": x, "targets": y}
    if eos_id is not None:
        batch["seq_idx"] = document_ids(x, eos_id)
    return batch


class Pretrain(Objective):
    """Next-token prediction on packed windows of raw text."""

    name = "pretrain"

    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        from ..data.corpus import build_corpus
        from ..data.loader import TokenBatches, eval_batches

        corpus = build_corpus(cfg, tokenizer, rt)
        t, d = cfg.train, cfg.data
        eos = tokenizer.eos_token_id if d.document_masking else None
        windows = TokenBatches(corpus.train, d.seq_len, t.batch_size, seed=t.seed, rank=rt.rank,
                               world_size=rt.world_size)

        def val() -> Iterator[Batch]:
            for x, y in eval_batches(corpus.val, d.seq_len, t.batch_size, t.eval_batches, rt.rank, rt.world_size):
                yield _token_batch(x, y, eos)

        manifest = {"data": corpus.manifest, "tokenizer_fingerprint": corpus.manifest.get("tokenizer_fingerprint"),
                    "data_fingerprint": corpus.fingerprint}
        lines = [f"data      {corpus.manifest.get('train_tokens', len(corpus.train)):,} train tokens, "
                 f"{len(corpus.val):,} validation tokens ({corpus.dir})"]
        return ObjectiveData(_TokenStream(windows, eos), val, manifest, lines, lambda: unigram_baseline(corpus))

    def check_model(self, model) -> None:
        if self.cfg.data.document_masking and not getattr(model, "supports_packed_documents", False):
            raise ConfigError(f"data.document_masking: {type(model).__name__} cannot reset at document boundaries")
        super().check_model(model)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss_sum(model, lambda: model_output(model, batch), batch["targets"], self.chunking), {}


def unigram_baseline(corpus) -> float:
    """Perplexity of a unigram model fit on the training split, on the validation split."""
    from ..data.shards import unigram_entropy

    return math.exp(unigram_entropy(np.asarray(corpus.val), corpus.vocab_size, ref=np.asarray(corpus.train)))


def held_out_batches(cfg, tokenizer, rt) -> tuple[Objective, list[Batch]]:
    """The run's objective (train.objective of `cfg`) and its validation batches, rebuilt exactly as the trainer
    built them: the same sources, split, template and encoding, this rank's share. `tokenizer` is the run's own
    (`<run>/tokenizer` or its export). Objectives that need a reference model (dpo) get it from `setup`."""
    objective = make_objective(cfg)
    return objective, list(objective.data(cfg, tokenizer, rt).val())


# ------------------------------------------------------------------------------------------- registry
# name → the class, or "module:Class" imported on first use (so the registry costs no import)
OBJECTIVES: dict[str, type[Objective] | str] = {}


def register_objective(cls: type[Objective] | str, name: str | None = None) -> None:
    OBJECTIVES[name or cls.name] = cls


def make_objective(cfg) -> Objective:
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective: unknown objective {name!r}; allowed: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if isinstance(cls, str):
        import importlib

        module, _, attr = cls.partition(":")
        cls = OBJECTIVES[name] = getattr(importlib.import_module(module), attr)
    return cls(cfg)


register_objective(Pretrain)
register_objective("lmlab.train.sft:SFT", "sft")
register_objective("lmlab.train.dpo:DPO", "dpo")
register_objective("lmlab.train.ipo:IPO", "ipo")
register_objective("lmlab.train.simpo:SimPO", "simpo")
register_objective("lmlab.train.orpo:ORPO", "orpo")
register_objective("lmlab.train.kto:KTO", "kto")
register_objective("lmlab.train.grpo:GRPO", "grpo")
