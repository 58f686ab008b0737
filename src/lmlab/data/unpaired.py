"""Unpaired feedback for KTO: a prompt, one reply and whether it is desirable. Row forms (TRL's unpaired format):

    {"prompt": str | messages, "completion": str | messages, "label": true | false}
    {"messages": [..., {"role": "assistant", "content": …}], "label": true | false}   the last turn is the reply

    data = load_unpaired(["fb.jsonl"], val_fraction=0.05)
    enc = [encode_unpaired(e, ChatFormat(tokenizer)) for e in data.train]     # EncodedUnpaired
    batch = collate_unpaired(enc, pad_id)     # input_ids, labels (b, l); kl_input_ids, kl_labels (b, l2): each
                                              # prompt with the reply of the next row (the KL estimate's
                                              # mismatched pairs); desirable (b,) bool
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .chat import IGNORE, OVERLONG, ChatFormat
from .instruct import (
    ON_ERROR,
    Conversation,
    DataSummary,
    RowError,
    SourceSpec,
    iter_rows,
    split_held_out,
    split_line,
    validate,
)


@dataclass
class Unpaired:
    prompt: Conversation  # optional system turn, ..., ending with a user turn
    completion: str
    desirable: bool
    source: str = ""
    where: str = ""

    def key(self) -> str:
        blob = json.dumps([self.prompt, self.completion, self.desirable], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class UnpairedData:
    train: list[Unpaired]
    val: list[Unpaired]
    summary: DataSummary


@dataclass
class EncodedUnpaired:
    prompt_ids: list[int]  # ending with the assistant header
    completion_ids: list[int]  # the reply and its end-of-turn
    completion_labels: list[int]
    desirable: bool


def _messages(v, role: str) -> Conversation:
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                   and m.get("role") in ("system", "user", "assistant") for m in v):
        return [{"role": m["role"], "content": m["content"]} for m in v]
    raise RowError(f"expected a string or a list of {{role, content}} messages, got {type(v).__name__}")


def _label(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise RowError(f"'label' must be true or false, got {v!r}")


def row_to_unpaired(row: dict, source: str = "", where: str = "") -> Unpaired:
    """One row as an Unpaired example; RowError(reason) when it is bad."""
    if not isinstance(row, dict) or "label" not in row:
        raise RowError("needs a 'label' (true: desirable, false: undesirable)")
    label = _label(row["label"])
    if "messages" in row:
        msgs = _messages(row["messages"], "user")
    elif "completion" in row:
        prompt = _messages(row["prompt"], "user") if row.get("prompt") is not None else []
        reply = _messages(row["completion"], "assistant")
        msgs = [*prompt, *(reply[len(prompt):] if reply[: len(prompt)] == prompt and prompt else reply)]
    else:
        raise RowError("needs 'prompt' and 'completion', or 'messages'")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError("the last turn must be the assistant's reply")
    msgs = validate(msgs)
    return Unpaired(msgs[:-1], msgs[-1]["content"], label, source, where)


def load_unpaired(sources, *, val_fraction: float = 0.05, seed: int = 0, on_error: str = "skip") -> UnpairedData:
    """Read unpaired sources (files or `hf:` ids), drop bad rows and duplicates, cap and split each source."""
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(s) for s in (sources if isinstance(sources, list | tuple)
                                                                         else [sources])]
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    summary, seen, train, val = DataSummary(), set(), [], []
    for spec in specs:
        st = summary.stats(spec.path)
        summary.formats[spec.path] = "unpaired"
        rows = []
        for where, row in iter_rows(spec.path):
            st.read += 1
            try:
                ex = row_to_unpaired(row, spec.path, where)
            except RowError as e:
                if on_error == "fail":
                    raise DataError(f"{where}: {e} (pass finetune.on_error=skip to count and skip bad rows)") from None
                summary.drop(spec.path, str(e), where)
                continue
            if ex.key() in seen:
                summary.drop(spec.path, "duplicate", where)
                continue
            seen.add(ex.key())
            rows.append(ex)
        if spec.max_examples is not None and len(rows) > spec.max_examples:
            st.dropped["over max_examples"] += len(rows) - spec.max_examples
            rows = rows[: spec.max_examples]
        st.kept = len(rows)
        tr, va = split_held_out(rows, lambda e: e.key(), val_fraction, seed)
        st.train, st.val = len(tr), len(va)
        train += tr
        val += va
    if not train:
        raise DataError(f"unpaired data: no valid example in {', '.join(s.path for s in specs)}; rows need "
                        f"prompt/completion/label or messages/label")
    summary.train, summary.val = len(train), len(val)
    summary.split = split_line(val_fraction, len(train) + len(val), len(val))
    return UnpairedData(train, val, summary)


def encode_unpaired(ex: Unpaired, fmt: ChatFormat, max_len: int | None = None,
                    overlong: str = "truncate") -> EncodedUnpaired | None:
    """Tokenize with `fmt`'s template; the reply is what follows the rendered prompt (its labels: the reply and
    its end-of-turn). Over `max_len`: the reply is cut ("truncate"; None if no reply token fits) or None."""
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong={overlong!r}; allowed: {', '.join(OVERLONG)}")
    head = fmt.prompt_ids(ex.prompt)
    full = fmt.encode([*ex.prompt, {"role": "assistant", "content": ex.completion}])
    p = 0
    while p < min(len(head), len(full.input_ids)) and head[p] == full.input_ids[p]:
        p += 1
    ids, labels = full.input_ids[p:], full.labels[p:]
    while labels and labels[-1] == IGNORE:  # a separator after the end-of-turn
        ids, labels = ids[:-1], labels[:-1]
    if not labels:
        return None
    if max_len is not None and p + len(ids) > max_len:
        room = max_len - p
        if overlong == "drop" or room < 1:
            return None
        ids, labels = ids[:room], labels[:room]
    return EncodedUnpaired(full.input_ids[:p], ids, labels, ex.desirable)


def _rows(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, labels


def collate_unpaired(rows: list[EncodedUnpaired], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: `input_ids`/`labels` (prompt + own reply), `kl_input_ids`/`kl_labels` (prompt i + the
    reply of row i − 1, cyclically, as TRL builds KTO's KL pairs), `desirable` (b,) bool."""
    if len(rows) < 2:
        raise DataError("KTO needs at least 2 examples per batch (the KL estimate pairs each prompt with another "
                        "row's reply); raise train.batch_size")
    own = [(r.prompt_ids + r.completion_ids, [IGNORE] * len(r.prompt_ids) + r.completion_labels) for r in rows]
    shifted = rows[-1:] + rows[:-1]
    kl = [(r.prompt_ids + s.completion_ids, [IGNORE] * len(r.prompt_ids) + s.completion_labels)
          for r, s in zip(rows, shifted, strict=True)]
    ids, labels = _rows(own, pad_id)
    kl_ids, kl_labels = _rows(kl, pad_id)
    return {"input_ids": ids, "labels": labels, "kl_input_ids": kl_ids, "kl_labels": kl_labels,
            "desirable": torch.tensor([r.desirable for r in rows], dtype=torch.bool)}
