"""Supervised fine-tuning (`train.objective=sft`): next-token loss on the assistant turns of conversations.

    data.source        instruction sources (files, hf:NAME, stdlib-instruct), mixed by finetune.weights and
                       capped by finetune.max_examples (see lmlab.data.instruct)
    finetune.template  the chat template (lmlab.data.chat); "auto" is resolved once and saved in config.yaml,
                       so a resumed run encodes exactly as the first one did
    finetune.train_on  assistant (default): loss on the replies and their end-of-turn token; all: every token
    finetune.packing   several examples per row of data.seq_len, kept apart (below); else one example per row

A batch: `input_ids` (b, l), `targets` (b, l) (the token predicted at each position: the labels of
lmlab.data.chat shifted left by one, -100 elsewhere, so no target crosses from one example into the next),
`seq_idx` (b, l) (the example within the row) and `position_ids` (b, l) (restarting at every example).
Packed examples never see each other: lmlab's models reset their state / attention at `seq_idx` boundaries;
transformers models get `position_ids` and a block-diagonal causal mask (b, 1, l, l) built from `seq_idx`.

The train stream is a fixed list of rows reshuffled every epoch with (seed, epoch); rank r of w takes rows
[r·b, (r+1)·b) of each global batch of w·b rows. Its state is (epoch, cursor): a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..data.chat import IGNORE, ChatFormat, Packed, block_causal_mask, encode_examples, pack
from ..errors import ConfigError, DataError
from .objectives import Batch, Objective, ObjectiveData, token_loss_sum


class RowStream:
    """Deterministic, resumable, rank-aware batches over `n` items: each epoch a permutation drawn from
    (seed, epoch); each global batch takes `batch_size × world_size` consecutive items of it, this rank its
    slice. An epoch's tail shorter than a global batch is skipped (every rank gets full batches)."""

    def __init__(self, n: int, batch_size: int, make_batch: Callable[[np.ndarray], Batch], *, seed: int,
                 rank: int = 0, world_size: int = 1, what: str = "training examples"):
        if n < batch_size * world_size:
            raise DataError(f"{n} {what} but one step needs {batch_size * world_size} (train.batch_size × ranks); "
                            f"lower train.batch_size or add data")
        self.n, self.b, self.make_batch = n, batch_size, make_batch
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._perm, self._perm_epoch = None, -1

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, 7, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> Batch:
        step = self.b * self.world
        if self.cursor + step > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.b
        idx = self._order()[start: start + self.b]
        self.cursor += step
        return self.make_batch(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise DataError(f"the data changed since the checkpoint was written ({state['n']} items then, {self.n} "
                            f"now); resume with the same data.source and tokenizer")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def chat_format(cfg, tokenizer) -> ChatFormat:
    """The run's ChatFormat; resolves finetune.template "auto" in `cfg` (saved with the run)."""
    ft = cfg.finetune
    fmt = ChatFormat(tokenizer, ft.template, system=ft.system_prompt, train_on=ft.train_on)
    ft.template = fmt.name
    return fmt


def source_specs(cfg) -> list:
    """data.source (one or a list) as SourceSpecs with finetune.weights and finetune.max_examples."""
    from ..data.instruct import SourceSpec

    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    ft = cfg.finetune
    for key in ("weights", "max_examples"):
        values = getattr(ft, key)
        if values and len(values) != len(sources):
            raise ConfigError(f"finetune.{key}: {len(values)} values for {len(sources)} data sources")
    return [SourceSpec(str(s), weight=ft.weights[i] if ft.weights else 1.0,
                       max_examples=ft.max_examples[i] if ft.max_examples else None) for i, s in enumerate(sources)]


def to_batch(p: Packed, rows=None) -> Batch:
    """Rows of packed examples as a batch of the trainer's form (targets = labels shifted left by one)."""
    rows = slice(None) if rows is None else torch.as_tensor(np.asarray(rows), dtype=torch.long)
    labels = p.labels[rows]
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return {"input_ids": p.input_ids[rows], "targets": targets, "seq_idx": p.seq_idx[rows],
            "position_ids": p.position_ids[rows]}


def rows_of(encoded, seq_len: int, pad_id: int, packing: bool) -> Packed:
    if packing:
        return pack(encoded, seq_len, pad_id)
    parts = [pack([e], seq_len, pad_id) for e in encoded]
    return Packed(*(torch.cat([getattr(r, k) for r in parts]) for k in ("input_ids", "labels", "seq_idx",
                                                                         "position_ids")))


def summary_lines(summary) -> list[str]:
    """The data summary, indented under the trainer's `data` line."""
    for s in summary.sources.values():  # a drop counted without a location (a cap) still prints
        for reason in s.dropped:
            s.first_error.setdefault(reason, "-")
    return ["          " + line for line in summary.format().splitlines()]


def packed_logits(model, batch: Batch) -> torch.Tensor:
    """(b, l, V) logits with packed examples kept apart, for lmlab's models and transformers' alike."""
    core = getattr(model, "module", model)  # under DDP
    if getattr(core, "supports_packed_documents", False):
        return model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    mask = block_causal_mask(batch["seq_idx"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits


class SFT(Objective):
    name = "sft"

    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        from ..data.instruct import load_instruct

        ft, t = cfg.finetune, cfg.train
        fmt = chat_format(cfg, tokenizer)
        data = load_instruct(source_specs(cfg), val_fraction=cfg.data.val_fraction,
                             seed=cfg.data.split_seed_for(t.seed),
                             on_error=ft.on_error)
        max_len = min(ft.max_len or cfg.data.seq_len, cfg.data.seq_len)
        train = encode_examples(data.train, fmt, max_len=max_len, overlong=ft.overlong, summary=data.summary)
        val = encode_examples(data.val, fmt, max_len=max_len, overlong=ft.overlong) if data.val else []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = rows_of(train, cfg.data.seq_len, pad, ft.packing)
        stream = RowStream(len(rows), t.batch_size, lambda idx: to_batch(rows, idx), seed=t.seed, rank=rt.rank,
                           world_size=rt.world_size, what=f"training rows of {cfg.data.seq_len} tokens")
        val_rows = rows_of(val, cfg.data.seq_len, pad, ft.packing) if val else None

        def val_batches() -> Iterator[Batch]:
            if val_rows is None:
                return
            b, w = t.batch_size, rt.world_size
            for i in range(t.eval_batches):
                lo = (i * w + rt.rank) * b
                if lo >= len(val_rows):
                    break
                yield to_batch(val_rows, range(lo, min(lo + b, len(val_rows))))

        n_targets = int((rows.labels != IGNORE).sum())
        fingerprint = hashlib.sha256("\n".join(e.key() for e in data.train).encode()).hexdigest()[:16]
        from ..data.tokenizer import tokenizer_fingerprint

        manifest = {"data": {"examples": data.summary.to_dict(), "rows": len(rows), "target_tokens": n_targets,
                             "template": fmt.name, "packing": ft.packing},
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": fingerprint}
        lines = [f"data      {len(data.train):,} train / {len(data.val):,} held-out examples → {len(rows):,} rows "
                 f"of {cfg.data.seq_len} ({'packed' if ft.packing else 'one per row'}), {n_targets:,} target tokens "
                 f"({'assistant turns' if ft.train_on == 'assistant' else 'every token'}), template {fmt.name}"]
        lines += summary_lines(data.summary)
        if not val:
            lines.append("WARNING   no held-out examples (data.val_fraction): validation loss is not measured")
        # the exported model chats in plain transformers: the inference template travels with the tokenizer
        tokenizer.chat_template = fmt.inference_template()  # export writes it and stops generation at its end
        return ObjectiveData(stream, val_batches, manifest, lines)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_loss_sum(packed_logits(model, batch), batch["targets"]), {}
