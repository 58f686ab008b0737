"""Preference pairs for DPO: read, normalise, split, tokenize, collate.

A pair is a prompt (a conversation ending with a user turn) and two assistant replies, `chosen` preferred to
`rejected`. Row forms, detected from the fields:

    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
        messages lists may hold the whole conversation (the shared leading turns become the prompt when
        "prompt" is absent or is repeated in them); what follows the prompt must be one assistant turn
    oasst1 message rows (see oasst.py): for every prompter message with at least two ranked assistant
        replies, chosen = the best rank, rejected = the worst; prompt = the path from the root; split by tree

    data = load_preference(["pairs.jsonl"], val_fraction=0.05)
    enc = [encode_pair(p, ChatFormat(tokenizer)) for p in data.train]    # EncodedPair(prompt, chosen, rejected)
    batch = collate_pairs(enc, pad_id)     # {"chosen_input_ids", "chosen_labels", "chosen_attention_mask",
                                           #  "rejected_..."}: (b, l) int64, labels -100 outside the reply
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .chat import IGNORE, OVERLONG, ChatFormat
from .mixture import load_sources
from .normalise import as_messages, validate
from .oasst import oasst_role, oasst_valid_trees
from .records import (
    OASST_FIELDS,
    Conversation,
    DataSummary,
    RowError,
    SourceSpec,
    SplitData,
    content_key,
    convert_rows,
    report_bad,
)
from .rows import Unparsable, first_row


@dataclass
class PreferencePair:
    prompt: Conversation  # optional system turn, ..., ending with a user turn
    chosen: str
    rejected: str
    source: str = ""
    where: str = ""
    group: str = ""  # split key (oasst: the tree id)

    def key(self) -> str:
        return content_key([self.prompt, self.chosen, self.rejected])


PreferenceData = SplitData[PreferencePair]


@dataclass
class EncodedPair:
    """Token ids of the prompt (ending with the assistant header) and of each reply (ending with the
    end-of-turn token); the reply labels are the reply ids, -100 where no loss is taken."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_labels: list[int]
    rejected_labels: list[int]


def load_preference(sources, *, val_fraction: float = 0.05, seed: int = 0, on_error: str = "skip",
                    dedup: bool = True) -> PreferenceData:
    """Read preference sources (files or `hf:` ids, see rows.iter_rows), drop bad rows and duplicates, cap, split
    and weight each source (mixture.load_sources: round(val_fraction × pairs) held out, whole groups by
    hash(seed, group)). DataError when no valid pair is left."""
    train, val, summary = load_sources(sources, read_pairs, what="preference data", unit="pair",
                                       val_fraction=val_fraction, seed=seed, on_error=on_error, dedup=dedup)
    return PreferenceData(train, val, summary)


def read_pairs(spec: SourceSpec | str, summary: DataSummary | None = None,
               on_error: str = "skip") -> list[PreferencePair]:
    """All valid pairs of one source, in file order."""
    spec = spec if isinstance(spec, SourceSpec) else SourceSpec(spec)
    summary = summary if summary is not None else DataSummary()
    where, row, rows = first_row(spec.path, "preference data")
    if isinstance(row, dict) and OASST_FIELDS <= set(row):
        summary.formats[spec.path] = "oasst"
        return _oasst_pairs(spec, rows, summary, on_error)
    if not isinstance(row, dict) or not {"chosen", "rejected"} <= set(row):
        fields = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: not preference data (fields: {fields}); expected prompt, chosen, rejected "
                        "or oasst message rows")
    summary.formats[spec.path] = "pairs"
    return convert_rows(spec, rows, lambda row, where: row_to_pair(row, spec.path, where), summary, on_error)


def row_to_pair(row: dict, source: str = "", where: str = "") -> PreferencePair:
    """One {prompt, chosen, rejected} row as a pair; RowError(reason) when it is bad."""
    if isinstance(row, Unparsable):
        raise RowError(row.reason)
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise RowError("needs fields 'chosen' and 'rejected'")
    prompt = as_messages(row.get("prompt"), "user") if row.get("prompt") is not None else []
    chosen, rejected = as_messages(row["chosen"], "assistant"), as_messages(row["rejected"], "assistant")
    if not prompt:  # whole conversations: the shared leading turns are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:  # the prompt may be repeated at the start of each reply list
        chosen = chosen[len(prompt):] if chosen[: len(prompt)] == prompt else chosen
        rejected = rejected[len(prompt):] if rejected[: len(prompt)] == prompt else rejected
    reply_c, reply_r = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if reply_c == reply_r:
        raise RowError("chosen and rejected are the same")
    prompt = validate([*prompt, {"role": "assistant", "content": reply_c}])[:-1]
    return PreferencePair(prompt, reply_c, reply_r, source, where)


def encode_pair(pair: PreferencePair, fmt: ChatFormat, max_len: int | None = None,
                overlong: str = "truncate") -> EncodedPair | None:
    """Tokenize a pair with `fmt`'s template. The prompt is the longest shared prefix of the two rendered
    conversations that ends at or before the assistant header; labels cover the reply and its end-of-turn.
    Over `max_len` (prompt + longer reply): replies are cut ("truncate"; None if the prompt alone does not
    leave room for one reply token) or the pair is dropped (None)."""
    if overlong not in OVERLONG:
        raise ConfigError(f"finetune.overlong={overlong!r}; allowed: {', '.join(OVERLONG)}")
    head = fmt.prompt_ids(pair.prompt)
    full_c = fmt.encode([*pair.prompt, {"role": "assistant", "content": pair.chosen}])
    full_r = fmt.encode([*pair.prompt, {"role": "assistant", "content": pair.rejected}])
    p = _common_prefix(head, full_c.input_ids, full_r.input_ids)
    reply_c, labels_c = _trim(full_c.input_ids[p:], full_c.labels[p:])
    reply_r, labels_r = _trim(full_r.input_ids[p:], full_r.labels[p:])
    if max_len is not None and p + max(len(reply_c), len(reply_r)) > max_len:
        room = max_len - p
        if overlong == "drop" or room < 1:
            return None
        reply_c, labels_c, reply_r, labels_r = reply_c[:room], labels_c[:room], reply_r[:room], labels_r[:room]
    return EncodedPair(full_c.input_ids[:p], reply_c, reply_r, labels_c, labels_r)


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (b, l) tensors for each side: `{side}_input_ids` = prompt + reply, `{side}_labels` (-100 on
    the prompt and the padding), `{side}_attention_mask` (1 on real tokens), side in chosen / rejected."""
    if not pairs:
        raise DataError("collate_pairs: no pairs")
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [(p.prompt_ids + getattr(p, f"{side}_ids"), [IGNORE] * len(p.prompt_ids) +
                 getattr(p, f"{side}_labels")) for p in pairs]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (x, y) in enumerate(seqs):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        out[f"{side}_input_ids"], out[f"{side}_labels"], out[f"{side}_attention_mask"] = ids, labels, mask
    return out


# ----------------------------------------------------------------------------------------------------------


def _reply(msgs: Conversation, name: str) -> str:
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError(f"'{name}' must add exactly one assistant turn after the prompt")
    reply = msgs[0]["content"].strip()
    if not reply:
        raise RowError(f"empty {name} response")
    return reply


def _common_prefix(*seqs: list[int]) -> int:
    n = 0
    while all(n < len(s) for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _trim(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Drop trailing non-target tokens (a separator after the end-of-turn)."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    return ids[:end], labels[:end]


def _oasst_pairs(spec: SourceSpec, rows, summary: DataSummary, on_error: str) -> list[PreferencePair]:
    trees = oasst_valid_trees(spec, rows, summary, on_error)
    out = []
    for tid, tree in trees.items():
        stack = [(tree["root"], [])]
        while stack:
            node, path = stack.pop()
            path = [*path, {"role": oasst_role(node), "content": (node["text"] or "").strip()}]
            kids = tree["children"].get(node["message_id"], [])
            stack += [(k, path) for k in reversed(kids)]
            ranked = [k for k in kids if k.get("rank") is not None and k["role"] == "assistant"]
            if node["role"] != "prompter" or len(ranked) < 2:
                continue
            best = min(ranked, key=lambda k: (k["rank"], str(k["message_id"])))
            worst = max(ranked, key=lambda k: (k["rank"], str(k["message_id"])))
            where = f"{spec.path}: message {node['message_id']}"
            try:
                prompt = validate([*path, {"role": "assistant", "content": "x"}])[:-1]
                if best["rank"] == worst["rank"]:
                    raise RowError("replies share one rank")
                out.append(PreferencePair(prompt, _reply([_turn(best)], "chosen"), _reply([_turn(worst)], "rejected"),
                                          spec.path, where, group=tid))
            except RowError as e:
                report_bad(spec.path, where, str(e), summary, on_error)
    return out


def _turn(r: dict) -> dict[str, str]:
    return {"role": "assistant", "content": r["text"] or ""}
