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

from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .chat import IGNORE, OVERLONG, ChatFormat
from .mixture import load_sources
from .normalise import as_messages, validate
from .records import Conversation, DataSummary, RowError, SourceSpec, SplitData, content_key, convert_rows
from .rows import Unparsable, iter_rows


@dataclass
class Unpaired:
    prompt: Conversation  # optional system turn, ..., ending with a user turn
    completion: str
    desirable: bool
    source: str = ""
    where: str = ""
    group: str = ""  # split key ('' : the content key)

    def key(self) -> str:
        return content_key([self.prompt, self.completion, self.desirable])


UnpairedData = SplitData[Unpaired]


@dataclass
class EncodedUnpaired:
    prompt_ids: list[int]  # ending with the assistant header
    completion_ids: list[int]  # the reply and its end-of-turn
    completion_labels: list[int]
    desirable: bool


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
    if isinstance(row, Unparsable):
        raise RowError(row.reason)
    if not isinstance(row, dict) or "label" not in row:
        raise RowError("needs a 'label' (true: desirable, false: undesirable)")
    label = _label(row["label"])
    if "messages" in row:
        msgs = as_messages(row["messages"], "user")
    elif "completion" in row:
        prompt = as_messages(row["prompt"], "user") if row.get("prompt") is not None else []
        reply = as_messages(row["completion"], "assistant")
        msgs = [*prompt, *(reply[len(prompt):] if reply[: len(prompt)] == prompt and prompt else reply)]
    else:
        raise RowError("needs 'prompt' and 'completion', or 'messages'")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError("the last turn must be the assistant's reply")
    msgs = validate(msgs)
    return Unpaired(msgs[:-1], msgs[-1]["content"], label, source, where)


def load_unpaired(sources, *, val_fraction: float = 0.05, seed: int = 0, on_error: str = "skip") -> UnpairedData:
    """Read unpaired sources (files or `hf:` ids), drop bad rows and duplicates, cap, split and weight each source
    (mixture.load_sources)."""
    train, val, summary = load_sources(sources, read_unpaired, what="unpaired data", unit="example",
                                       val_fraction=val_fraction, seed=seed, on_error=on_error,
                                       hint="; rows need prompt/completion/label or messages/label")
    return UnpairedData(train, val, summary)


def read_unpaired(spec: SourceSpec | str, summary: DataSummary | None = None,
                  on_error: str = "skip") -> list[Unpaired]:
    """All valid examples of one source, in file order."""
    spec = spec if isinstance(spec, SourceSpec) else SourceSpec(spec)
    summary = summary if summary is not None else DataSummary()
    summary.formats[spec.path] = "unpaired"
    return convert_rows(spec, iter_rows(spec.path), lambda row, where: row_to_unpaired(row, spec.path, where),
                        summary, on_error)


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
