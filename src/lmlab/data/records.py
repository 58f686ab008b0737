"""What every example-based data set shares (instruction examples, preference pairs, unpaired feedback, prompts):
the message schema, where examples come from (`SourceSpec`), the bad-row policy and the per-source summary.

One conversation is a list of messages, `{"role": "system" | "user" | "assistant", "content": str}`: an
optional system message first, then user and assistant turns alternating (normalise.validate checks it).

Bad rows are reported as `file:line: reason` (`file[i]` for the i-th item of a JSON list, `file:row i` for
parquet and hub rows). `on_error="skip"` (default) counts them in the summary; `on_error="fail"` raises DataError
on the first.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from ..errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "dolly", "oasst", "sharegpt", "messages", "prompt_completion")  # normalise.py reads each
ON_ERROR = ("skip", "fail")
OASST_FIELDS = {"message_id", "parent_id", "role", "text"}  # what makes a row an oasst1 message (oasst.py)
STDLIB_INSTRUCT = "stdlib-instruct"  # the built-in instruction source (stdlib_instruct.py)

Conversation = list[dict[str, str]]
T = TypeVar("T")


def content_key(value) -> str:
    """A short hash of a JSON-able value: what an example's `key()` is (equal contents, equal keys; de-duplication
    and the split's default group)."""
    blob = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class RowError(ValueError):
    """One bad row; the message is the reason, without the location (the reader adds `file:line`)."""


@dataclass
class Example:
    """One normalised conversation and where it came from."""

    messages: Conversation
    source: str  # the source spec it was read from
    where: str  # "file:line", "file[i]", "hf:NAME:row i", "tree <id>", "module.func"
    group: str = ""  # split key: examples sharing it land in the same split (oasst: the tree id)

    def key(self) -> str:
        """Content hash: equal conversations have equal keys (used for de-duplication)."""
        return content_key(self.messages)


@dataclass
class SourceSpec:
    """One source of a mixture: `weight` scales its share of the training split (0.5 keeps half, 2.0 repeats
    it twice; fractional parts are drawn with the seed), `max_examples` caps it before the split."""

    path: str
    weight: float = 1.0
    max_examples: int | None = None
    format: str | None = None
    lang: str | None = None  # oasst: keep trees whose root message has this language

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if self.weight < 0:
            raise ConfigError(f"data source {self.path!r}: weight={self.weight} (finetune.weights) must be >= 0")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"data source {self.path!r}: max_examples={self.max_examples} (finetune.max_examples) "
                              "must be >= 1")
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"data source {self.path!r}: format={self.format!r}; allowed: {', '.join(FORMATS)}")


@dataclass
class SourceStats:
    read: int = 0  # rows (or trees) read
    kept: int = 0  # examples left after validation, de-duplication and the cap
    train: int = 0  # examples in the training split, after weighting
    val: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    first_error: dict[str, str] = field(default_factory=dict)  # reason -> "file:line" of its first occurrence


@dataclass
class DataSummary:
    """What went in and what came out, per source; `token_lengths` once tokenized (see chat.encode_examples)."""

    sources: dict[str, SourceStats] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    train: int = 0
    val: int = 0
    token_lengths: dict[str, int] = field(default_factory=dict)  # p50/p90/p99/max over encoded examples
    tokenized_dropped: Counter = field(default_factory=Counter)  # reason -> count (e.g. over-long)
    split: str = ""  # how the held-out split was made (mixture.split_line)

    def stats(self, source: str) -> SourceStats:
        return self.sources.setdefault(source, SourceStats())

    def drop(self, source: str, reason: str, where: str) -> None:
        st = self.stats(source)
        st.dropped[reason] += 1
        st.first_error.setdefault(reason, where)

    def add_token_lengths(self, lengths: list[int]) -> None:
        if lengths:
            p = np.percentile(np.asarray(lengths), [50, 90, 99])
            self.token_lengths = {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(max(lengths))}

    def why_dropped(self) -> str:
        """'; dropped: reason xN (e.g. file:line), …' for the three commonest reasons ('' when nothing was)."""
        drops = Counter()
        first = {}
        for s in self.sources.values():
            drops.update(s.dropped)
            for r, w in s.first_error.items():
                first.setdefault(r, w)
        if not drops:
            return ""
        return "; dropped: " + ", ".join(f"{r} x{n} (e.g. {first[r]})" for r, n in drops.most_common(3))

    def to_dict(self) -> dict:
        return {
            "train": self.train, "val": self.val, "token_lengths": dict(self.token_lengths),
            "tokenized_dropped": dict(self.tokenized_dropped), "split": self.split,
            "sources": {name: {"format": self.formats.get(name), "read": s.read, "kept": s.kept, "train": s.train,
                               "val": s.val, "dropped": dict(s.dropped), "first_error": dict(s.first_error)}
                        for name, s in self.sources.items()},
        }

    def format(self) -> str:
        """A short human table: one line per source, then the totals."""
        lines = []
        for name, s in self.sources.items():
            drops = ", ".join(f"{r}: {n} (first at {s.first_error[r]})" for r, n in s.dropped.most_common())
            lines.append(f"{name} [{self.formats.get(name, '?')}]: read {s.read}, kept {s.kept} "
                         f"-> train {s.train}, val {s.val}" + (f"; dropped {drops}" if drops else ""))
        lines.append(f"total: train {self.train}, val {self.val}")
        if self.token_lengths:
            lines.append("tokens per example: " + ", ".join(f"{k} {v}" for k, v in self.token_lengths.items()))
        if self.tokenized_dropped:
            lines.append("dropped when tokenizing: " + ", ".join(f"{k}: {v}" for k, v in
                                                                 self.tokenized_dropped.items()))
        return "\n".join(lines)


@dataclass
class SplitData(Generic[T]):
    """A loaded data set: the training items (weighted, as they will be drawn), the held-out ones, the summary."""

    train: list[T]
    val: list[T]
    summary: DataSummary


def report_bad(source: str, where: str, reason: str, summary: DataSummary, on_error: str) -> None:
    """A bad row: counted in `summary` (on_error=skip) or one DataError line naming where it is (fail)."""
    if on_error == "fail":
        raise DataError(f"{where}: {reason} (pass finetune.on_error=skip to count and skip bad rows)")
    summary.drop(source, reason, where)


def convert_rows(spec: SourceSpec, rows: Iterable[tuple[str, object]], convert: Callable[[object, str], object],
                 summary: DataSummary, on_error: str) -> list:
    """convert(row, where) for each (where, row) of `spec`'s rows, counted as read; a row it rejects with
    RowError is reported (`report_bad`)."""
    st = summary.stats(spec.path)
    out = []
    for where, row in rows:
        st.read += 1
        try:
            out.append(convert(row, where))
        except RowError as e:
            report_bad(spec.path, where, str(e), summary, on_error)
    return out
