"""Plumbing shared by the example-based objectives (sft, dpo and the preference methods built on dpo): the run's
chat format, its data sources, the resumable row stream, packed rows as batches, the data summary lines.

    fmt = chat_format(cfg, tokenizer)                  # finetune.template resolved; cfg is left as it is
    specs = source_specs(cfg)                          # data.source with finetune.weights / max_examples
    stream = RowStream(n, batch_size, make_batch, seed=seed, rank=rank, world_size=world)
    for lo, hi in val_slices(n, batch_size, n_batches, rank, world): ...   # the fixed held-out batches
    held_out_examples(cfg)                             # a run's held-out examples, as its objective split them

The train stream is a fixed list of rows reshuffled every epoch with (seed, epoch); rank r of w takes rows
[r·b, (r+1)·b) of each global batch of w·b rows. Its state is (epoch, cursor): a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .chat import IGNORE, TEMPLATES, ChatFormat, Packed, add_template_tokens, pack
from .records import SourceSpec

Batch = dict[str, torch.Tensor]
INDENT = " " * 10  # lines under the trainer's `data` line


class RowStream:
    """Deterministic, resumable, rank-aware batches over `n` items: each epoch a permutation drawn from
    (seed, epoch); each global batch takes `batch_size × world_size` consecutive items of it, this rank its
    slice. An epoch's tail shorter than a global batch is skipped (every rank gets full batches). With fewer
    items than one global batch, the batches run on across epochs instead (each step takes the next
    `batch_size × world_size` items of epoch 0's order, then epoch 1's, …; `small` is then True): every step
    is still full and a resumed run still sees the same batches."""

    def __init__(self, n: int, batch_size: int, make_batch: Callable[[np.ndarray], Batch], *, seed: int,
                 rank: int = 0, world_size: int = 1, what: str = "training examples"):
        if n < 1:
            raise DataError(f"no {what}; add data")
        self.n, self.b, self.make_batch = n, batch_size, make_batch
        self.seed, self.rank, self.world = seed, rank, world_size
        self.small = n < batch_size * world_size
        self.epoch, self.cursor = 0, 0
        self._perm, self._perm_epoch = None, -1

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def _take(self, epoch: int, cursor: int, k: int) -> tuple[list[int], int, int]:
        """The next `k` items from (epoch, cursor), running on across epochs; and the position after them."""
        out: list[int] = []
        while len(out) < k:
            if cursor == self.n:
                epoch, cursor = epoch + 1, 0
            got = self._order(epoch)[cursor: cursor + k - len(out)]
            out += got.tolist()
            cursor += len(got)
        return out, epoch, cursor

    def next(self) -> Batch:
        step = self.b * self.world
        if self.small:
            _, epoch, cursor = self._take(self.epoch, self.cursor, self.rank * self.b)
            idx, _, _ = self._take(epoch, cursor, self.b)
            _, self.epoch, self.cursor = self._take(self.epoch, self.cursor, step)
            return self.make_batch(np.asarray(idx))
        if self.cursor + step > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.b
        idx = self._order(self.epoch)[start: start + self.b]
        self.cursor += step
        return self.make_batch(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise DataError(f"the data changed since the checkpoint was written ({state['n']} items then, {self.n} "
                            f"now); resume with the same data.source and tokenizer")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def note(self, what: str) -> list[str]:
        """A line when the stream repeats items within a step (fewer items than one global batch)."""
        if not self.small:
            return []
        return [f"NOTE      {self.n} {what} for a global batch of {self.b * self.world} (train.batch_size × "
                f"ranks): each step takes the next {self.b * self.world} of them in shuffled order, across epochs"]


def val_slices(n: int, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1) -> Iterator[range]:
    """This rank's share of the fixed held-out batches over `n` items: batch i of rank r is items
    [(i·w + r)·b, (i·w + r + 1)·b) ∩ [0, n), for i < n_batches, while any is left."""
    for i in range(n_batches):
        lo = (i * world_size + rank) * batch_size
        if lo >= n:
            break
        yield range(lo, min(lo + batch_size, n))


def chat_format(cfg, tokenizer) -> ChatFormat:
    """The run's ChatFormat (finetune.template, system_prompt, train_on); `cfg` is not changed. A built-in template
    whose special tokens the tokenizer lacks gets them added (`fmt.added_tokens`; the model's embeddings are then
    grown to match, see lmlab.runs.load.build_model) and the tokenizer is saved with the run."""
    ft = cfg.finetune
    before = len(tokenizer)
    added = add_template_tokens(tokenizer, ft.template) if ft.template in TEMPLATES else []
    fmt = ChatFormat(tokenizer, ft.template, system=ft.system_prompt, train_on=ft.train_on)
    fmt.added_tokens = added
    fmt.vocab_before = before
    return fmt


def format_lines(fmt: ChatFormat) -> list[str]:
    """What the run says about its chat format beyond the template's name: the special tokens it added."""
    added = getattr(fmt, "added_tokens", [])
    if not added:
        return []
    return [f"tokenizer +{len(added)} special tokens for template {fmt.name} ({', '.join(added)}): "
            f"{fmt.vocab_before:,} → {len(fmt.tokenizer):,} tokens; the model's embeddings grow to match (new rows: "
            "the mean of the existing ones), saved with the run"]


def source_specs(cfg) -> list:
    """data.source (one or a list) as SourceSpecs with finetune.weights and finetune.max_examples."""
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    ft = cfg.finetune
    for key in ("weights", "max_examples"):
        values = getattr(ft, key)
        if values and len(values) != len(sources):
            raise ConfigError(f"finetune.{key}: {len(values)} values for {len(sources)} data sources")
    return [SourceSpec(str(s), weight=ft.weights[i] if ft.weights else 1.0,
                       max_examples=ft.max_examples[i] if ft.max_examples else None) for i, s in enumerate(sources)]


def load_tuning_data(load: Callable, cfg):
    """(the split data, max_len) of an objective's data.source: `load` is load_instruct, load_preference or
    load_unpaired, called with the run's sources, held-out fraction, split seed and error policy; max_len is
    finetune.max_len capped by data.seq_len."""
    ft = cfg.finetune
    data = load(source_specs(cfg), val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed_for(cfg.train.seed),
                on_error=ft.on_error)
    return data, min(ft.max_len or cfg.data.seq_len, cfg.data.seq_len)


def encode_kept(rows, encode_one: Callable, fmt: ChatFormat, max_len: int, overlong: str) -> list:
    """`encode_one(row, fmt, max_len, overlong)` of each row, the ones it drops (None: too long) left out."""
    out = (encode_one(r, fmt, max_len, overlong) for r in rows)
    return [e for e in out if e is not None]


def to_batch(p: Packed, rows=None) -> Batch:
    """Rows of packed examples as a batch of the trainer's form (targets = labels shifted left by one)."""
    rows = slice(None) if rows is None else torch.as_tensor(np.asarray(rows), dtype=torch.long)
    labels = p.labels[rows]
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return {"input_ids": p.input_ids[rows], "targets": targets, "seq_idx": p.seq_idx[rows],
            "position_ids": p.position_ids[rows]}


def rows_of(encoded, seq_len: int, pad_id: int, packing: bool) -> Packed:
    """Encoded examples as rows of `seq_len`: packed several to a row, or one per row."""
    if packing:
        return pack(encoded, seq_len, pad_id)
    parts = [pack([e], seq_len, pad_id) for e in encoded]
    return Packed(*(torch.cat([getattr(r, k) for r in parts]) for k in ("input_ids", "labels", "seq_idx",
                                                                         "position_ids")))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def summary_lines(summary, unit: str = "examples") -> list[str]:
    """The data summary, indented under the trainer's `data` line: per source, then how the held-out split was
    made and how many exact duplicates were dropped."""
    for s in summary.sources.values():  # a drop counted without a location (a cap) still prints
        for reason in s.dropped:
            s.first_error.setdefault(reason, "-")
    lines = summary.format().splitlines()
    dups = sum(s.dropped.get("duplicate", 0) for s in summary.sources.values())
    if dups:
        lines.append(f"{dups:,} exact-duplicate {unit} dropped (the first of each is kept)")
    if getattr(summary, "split", ""):
        lines.append(summary.split)
    return [INDENT + line for line in lines]


def held_out_examples(cfg) -> list:
    """The run's held-out examples before tokenizing, exactly as its objective splits them: instruction `Example`s
    for train.objective=sft, `PreferencePair`s for the preference objectives (data.source, finetune.weights /
    max_examples / on_error, data.val_fraction, data.split_seed or train.seed)."""
    kw = dict(val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed_for(cfg.train.seed),
              on_error=cfg.finetune.on_error)
    if cfg.train.objective == "sft":
        from .instruct import load_instruct

        return load_instruct(source_specs(cfg), **kw).val
    from .preference import load_preference

    return load_preference(source_specs(cfg), **kw).val
