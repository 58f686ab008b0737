"""Supervised fine-tuning (`train.objective=sft`): next-token loss on the assistant turns of conversations.

    data.source        instruction sources (files, hf:NAME, stdlib-instruct), mixed by finetune.weights and
                       capped by finetune.max_examples (see lmlab.data.instruct)
    finetune.template  the chat template (lmlab.data.chat); the resolved name is recorded in run.json
                       (data.template), config.yaml keeps what was asked; the run's tokenizer carries the
                       template, so "auto" resolves the same way on resume. A built-in template whose special
                       tokens the tokenizer lacks adds them (the model's embeddings grow to match)
    finetune.train_on  assistant (default): loss on the replies and their end-of-turn token; all: every token
    finetune.packing   several examples per row of data.seq_len, kept apart (below); else one example per row

A batch: `input_ids` (b, l), `targets` (b, l) (the token predicted at each position: the labels of
lmlab.data.chat shifted left by one, -100 elsewhere, so no target crosses from one example into the next),
`seq_idx` (b, l) (the example within the row) and `position_ids` (b, l) (restarting at every example).
Packed examples never see each other: lmlab's models reset their state / attention at `seq_idx` boundaries;
transformers models get `position_ids` and a block-diagonal causal mask (b, 1, l, l) built from `seq_idx`.

The train stream is lmlab.data.examples.RowStream over the rows (deterministic, resumable, rank-sliced).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from ..data.chat import IGNORE, block_causal_mask, encode_examples
from ..data.examples import (
    RowStream,
    chat_format,
    format_lines,
    load_tuning_data,
    pad_id,
    rows_of,
    summary_lines,
    to_batch,
    val_slices,
)
from .losses import lm_loss_sum
from .objectives import Batch, Objective, ObjectiveData


def packed_output(model, batch: Batch):
    """The model's forward on a packed batch, its examples kept apart, for lmlab's models and transformers' alike."""
    core = getattr(model, "module", model)  # under DDP
    if getattr(core, "supports_packed_documents", False):
        return model(batch["input_ids"], seq_idx=batch["seq_idx"])
    mask = block_causal_mask(batch["seq_idx"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])


def packed_logits(model, batch: Batch) -> torch.Tensor:
    """(b, l, V) logits of `packed_output`."""
    return packed_output(model, batch).logits


class SFT(Objective):
    name = "sft"

    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        from ..data.instruct import load_instruct
        from ..data.tokenizer import tokenizer_fingerprint

        ft, t = cfg.finetune, cfg.train
        fmt = self.format = chat_format(cfg, tokenizer)
        data, max_len = load_tuning_data(load_instruct, cfg)
        train = encode_examples(data.train, fmt, max_len=max_len, overlong=ft.overlong, summary=data.summary)
        val = encode_examples(data.val, fmt, max_len=max_len, overlong=ft.overlong) if data.val else []
        pad = pad_id(tokenizer)
        rows = rows_of(train, cfg.data.seq_len, pad, ft.packing)
        stream = RowStream(len(rows), t.batch_size, lambda idx: to_batch(rows, idx), seed=t.seed, rank=rt.rank,
                           world_size=rt.world_size, what=f"training rows of {cfg.data.seq_len} tokens")
        val_rows = rows_of(val, cfg.data.seq_len, pad, ft.packing) if val else None

        def val_batches() -> Iterator[Batch]:
            if val_rows is None:
                return
            for r in val_slices(len(val_rows), t.batch_size, t.eval_batches, rt.rank, rt.world_size):
                yield to_batch(val_rows, r)

        n_targets = int((rows.labels != IGNORE).sum())
        fingerprint = hashlib.sha256("\n".join(e.key() for e in data.train).encode()).hexdigest()[:16]
        manifest = {"data": {"examples": data.summary.to_dict(), "rows": len(rows), "target_tokens": n_targets,
                             "template": fmt.name, "packing": ft.packing},
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": fingerprint}
        lines = [f"data      {len(data.train):,} train / {len(data.val):,} held-out examples → {len(rows):,} rows "
                 f"of {cfg.data.seq_len} ({'packed' if ft.packing else 'one per row'}), {n_targets:,} target tokens "
                 f"({'assistant turns' if ft.train_on == 'assistant' else 'every token'}), template {fmt.name}"]
        lines += summary_lines(data.summary)
        lines += format_lines(fmt) + stream.note(f"training rows of {cfg.data.seq_len} tokens")
        if not val:
            lines.append("WARNING   no held-out examples (data.val_fraction): validation loss is not measured")
        # the exported model chats in plain transformers: the inference template travels with the tokenizer
        tokenizer.chat_template = fmt.inference_template()  # export writes it and stops generation at its end
        return ObjectiveData(stream, val_batches, manifest, lines)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss_sum(model, lambda: packed_output(model, batch), batch["targets"], self.chunking), {}
