"""Packed, deterministic, resumable, rank-aware batches over a token array.

The token array is the concatenation of documents, each followed by EOS. It is cut into
non-overlapping windows of seq_len + 1 tokens (input = window[:-1], target = window[1:]).
Epoch e visits the windows in the order of a permutation drawn from (seed, e). A global cursor
counts the windows consumed by all ranks together; on each micro-step rank r of w takes windows
cursor + r·b … cursor + (r+1)·b − 1 and the cursor advances by w·b. The cursor and epoch are the
whole state: a checkpoint stores them and a resumed run continues with exactly the same batches,
with any number of ranks that divides the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError


def document_ids(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(b, l) tokens → (b, l) document index per position; a new document starts after each EOS."""
    is_eos = (x == eos_id).to(torch.int64)
    starts = torch.zeros_like(is_eos)
    starts[:, 1:] = is_eos[:, :-1]
    return starts.cumsum(dim=1)


@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # windows consumed in this epoch, all ranks together

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


class TokenBatches:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise DataError(
                f"corpus too small: {len(tokens):,} tokens make {self.n_windows} windows of {seq_len + 1} "
                f"tokens, fewer than one global batch of {self.global_batch}; use more data or lower "
                f"data.seq_len / train.batch_size")
        self.state = LoaderState()
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.n_windows)
            else:
                self._perm = np.arange(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def _windows(self, idx: np.ndarray) -> torch.Tensor:
        L = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * L: i * L + L + 1], dtype=np.int64) for i in idx])
        return torch.from_numpy(rows)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, for this rank."""
        if self.state.cursor + self.global_batch > self.n_windows:  # drop the ragged tail, next epoch
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._order(self.state.epoch)
        start = self.state.cursor + self.rank * self.batch_size
        rows = self._windows(order[start: start + self.batch_size])
        self.state.cursor += self.global_batch
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {**self.state.to_dict(), "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "n_windows": self.n_windows}

    def load_state_dict(self, d: dict) -> None:
        for k in ("seed", "seq_len", "global_batch", "n_windows"):
            if d.get(k) != getattr(self, k):
                raise DataError(f"cannot resume the data position: {k} was {d.get(k)} and is now "
                                f"{getattr(self, k)} (the data, seq_len or global batch changed)")
        self.state = LoaderState(int(d["epoch"]), int(d["cursor"]))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int,
                 rank: int = 0, world_size: int = 1):
    """The fixed validation set: the first n_batches·batch_size·world_size windows, split over ranks.

    Yields (inputs, targets); fewer batches if the validation split is small (at least one window).
    """
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"validation split too small ({len(tokens)} tokens) for seq_len {seq_len}; "
                        f"raise data.val_fraction or lower data.seq_len")
    loader = TokenBatches.__new__(TokenBatches)
    loader.tokens, loader.seq_len = tokens, seq_len
    per_rank = max(1, min(n_batches * batch_size, n_windows // world_size))
    idx = np.arange(rank * per_rank, (rank + 1) * per_rank)
    idx = idx[idx < n_windows]
    for i in range(0, len(idx), batch_size):
        rows = loader._windows(idx[i: i + batch_size])
        yield rows[:, :-1], rows[:, 1:]
