"""Instruction data: read many formats, normalise to one message schema, mix, de-duplicate, split, summarise.

One conversation is a list of messages, `{"role": "system" | "user" | "assistant", "content": str}`: an
optional system message first, then user and assistant turns alternating, ending with an assistant turn.

    data = load_instruct(["alpaca.json", SourceSpec("hf:OpenAssistant/oasst1", lang="en", weight=2.0),
                          "stdlib-instruct"], val_fraction=0.02, seed=0)
    data.train, data.val        # lists of Example (messages + where they came from)
    print(data.summary.format())

Formats, detected from the fields of the first row (or forced with `SourceSpec(format=...)`):

    alpaca             instruction, input, output                    (JSON list or JSONL)
    dolly              instruction, context, response, category
    oasst              oasst1 message rows: message_id, parent_id, role (prompter/assistant), text, lang, rank,
                       deleted, message_tree_id; trees rebuilt, the best-ranked path per tree, split by tree
    sharegpt           conversations: [{from: human|gpt|system, value}]
    messages           OpenAI chat: messages: [{role, content}]
    prompt_completion  prompt, completion

Sources: local .json (a list, or JSONL written as .json), .jsonl, .parquet (pyarrow); `hf:NAME[:CONFIG][@SPLIT]`
(the `datasets` library, online only); the built-in `stdlib-instruct` (see stdlib_instruct.py).

Bad rows are reported as `file:line: reason` (`file[i]` for the i-th item of a JSON list, `file:row i` for
parquet and hub rows). `on_error="skip"` (default) counts them in the summary; `on_error="fail"` raises DataError
on the first. No valid example at all is always a DataError.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..fsutil import error_line

ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "dolly", "oasst", "sharegpt", "messages", "prompt_completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
ON_ERROR = ("skip", "fail")
STDLIB_INSTRUCT = "stdlib-instruct"

Conversation = list[dict[str, str]]


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
        blob = json.dumps(self.messages, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


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
    split: str = ""  # how the held-out split was made (split_line)

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
class InstructData:
    train: list[Example]
    val: list[Example]
    summary: DataSummary


# ---------------------------------------------------------------------------------------------------------- load


def load_instruct(
    sources: str | SourceSpec | list[str | SourceSpec],
    *,
    val_fraction: float = 0.02,
    seed: int = 0,
    on_error: str = "skip",
    dedup: bool = True,
) -> InstructData:
    """Read every source, drop bad rows and exact duplicates, cap, split and weight (see the module docstring).

    Each source holds out round(val_fraction × its examples) (at least 1; `split_held_out`), whole groups in the
    order of hash(seed, group), so its split does not change when other sources are added or reordered; oasst
    trees and stdlib modules' functions are grouped so they never straddle it.
    Validation examples are never weighted. Raises DataError when no valid example is left.
    """
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(s) for s in _as_list(sources)]
    if not specs:
        raise DataError("no instruction data source given; pass a file, 'hf:NAME' or 'stdlib-instruct'")
    if on_error not in ON_ERROR:
        raise ConfigError(f"finetune.on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    summary, seen = DataSummary(), set()
    train: list[Example] = []
    val: list[Example] = []
    for spec in specs:
        examples = read_source(spec, summary, on_error=on_error)
        if dedup:
            examples = _dedup(examples, seen, summary)
        examples = _cap(examples, spec, seed, summary)
        st = summary.stats(spec.path)
        st.kept = len(examples)
        tr, va = split_held_out(examples, lambda e: e.group or e.key(), val_fraction, seed)
        tr = _weight(tr, spec.weight, seed)
        st.train, st.val = len(tr), len(va)
        train += tr
        val += va
    if not train:
        raise DataError(f"instruction data: no valid training example in {', '.join(s.path for s in specs)}"
                        + _why(summary))
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    train = [train[i] for i in order]
    summary.train, summary.val = len(train), len(val)
    summary.split = split_line(val_fraction, sum(s.kept for s in summary.sources.values()), len(val))
    return InstructData(train, val, summary)


def split_hash(group: str, seed: int) -> float:
    """A deterministic hash of (seed, group) in [0, 1): the order in which groups are held out."""
    h = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def in_val(group: str, val_fraction: float, seed: int) -> bool:
    """True when split_hash(group, seed) < val_fraction: the held-out share of an unbounded stream of groups
    (`split_held_out` holds out an exact count from a finite list)."""
    return val_fraction > 0 and split_hash(group, seed) < val_fraction


def held_out_count(n: int, val_fraction: float) -> int:
    """How many of `n` examples are held out: round(val_fraction × n), at least 1 when val_fraction > 0 and n ≥ 2,
    never all of them."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(val_fraction * n)))


def split_held_out(items: list, group_of, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out), each in the order of `items`. Groups (`group_of(item)`: an oasst tree, a stdlib module)
    are taken whole, in the order of split_hash(group, seed), until they hold `held_out_count(len(items))` items
    (one group may overshoot it; the last group always trains). Which examples a source holds out depends only
    on that source's own examples, the fraction and the seed."""
    k = held_out_count(len(items), val_fraction)
    if k == 0:
        return list(items), []
    sizes = Counter(group_of(x) for x in items)
    held, n_held = set(), 0
    for g in sorted(sizes, key=lambda g: (split_hash(g, seed), g))[:-1]:
        if n_held >= k:
            break
        held.add(g)
        n_held += sizes[g]
    return [x for x in items if group_of(x) not in held], [x for x in items if group_of(x) in held]


def split_line(val_fraction: float, n: int, n_val: int) -> str:
    """How the held-out split was made, for the data summary."""
    if val_fraction <= 0:
        return f"split: none held out (data.val_fraction=0); all {n:,} train"
    return (f"split: {n_val:,} of {n:,} held out (data.val_fraction={val_fraction:g}: round(fraction × n) of each "
            f"source, at least 1, whole groups, chosen by hash of the split seed)")


def read_source(spec: SourceSpec | str, summary: DataSummary | None = None, *,
                on_error: str = "skip") -> list[Example]:
    """All valid examples of one source, in file order; bad rows go to `summary` (or raise, see on_error)."""
    spec = spec if isinstance(spec, SourceSpec) else SourceSpec(spec)
    summary = summary if summary is not None else DataSummary()
    summary.stats(spec.path)
    if spec.path == STDLIB_INSTRUCT:
        from .stdlib_instruct import stdlib_instruct_examples

        examples = stdlib_instruct_examples()
        summary.formats[spec.path] = "stdlib-instruct"
        summary.stats(spec.path).read = len(examples)
        return examples
    head, rows = _peek(iter_rows(spec.path))
    if not head:
        raise DataError(f"{spec.path}: no rows; point it at some instruction data")
    where, row = next(((w, r) for w, r in head if isinstance(r, dict)), head[0])
    fmt = spec.format or detect_format(row, where)
    summary.formats[spec.path] = fmt
    if fmt == "oasst":
        return _read_oasst(spec, rows, summary, on_error)
    out = []
    for where, row in rows:
        summary.stats(spec.path).read += 1
        try:
            out.append(Example(row_to_messages(row, fmt), spec.path, where))
        except RowError as e:
            _bad(spec.path, where, str(e), summary, on_error)
    return out


def detect_format(row: dict, where: str = "row") -> str:
    """The format of a row, from its field names; DataError naming the fields when none fits."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise DataError(f"{where}: cannot tell the instruction format from the fields ({', '.join(map(str, row))}); "
                    f"expected one of {', '.join(FORMATS)} (see `lmlab finetune --help`)")


def row_to_messages(row: dict, fmt: str) -> Conversation:
    """One row of a single-row format as a validated conversation; RowError(reason) when it is bad."""
    if isinstance(row, _Unparsable):
        raise RowError(row.reason)
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "alpaca":
        prompt = _join(_text(row, "instruction"), _text(row, "input", optional=True))
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    elif fmt == "dolly":
        prompt = _join(_text(row, "instruction"), _text(row, "context", optional=True))
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "response")}]
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "completion")}]
    elif fmt == "sharegpt":
        msgs = [_sharegpt_turn(t) for t in _list(row, "conversations")]
    elif fmt == "messages":
        msgs = [_openai_turn(t) for t in _list(row, "messages")]
    else:
        raise RowError(f"format {fmt!r} is not a one-row-per-example format")
    return validate(msgs)


def validate(messages: Conversation) -> Conversation:
    """Check and tidy a conversation: contents stripped, trailing non-assistant turns removed, an optional
    system message first, then user/assistant alternating from a user turn. RowError(reason) otherwise."""
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body:
        raise RowError("no assistant reply")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RowError(f"turn {i + 1} is {m['role']}, expected {want} (roles must alternate)")
        if not m["content"]:
            raise RowError("empty prompt" if want == "user" else "empty response")
    if msgs[0]["role"] == "system" and not msgs[0]["content"]:
        msgs = msgs[1:]
    return msgs


# ---------------------------------------------------------------------------------------------------------- rows


def iter_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a .json/.jsonl/.parquet file or `hf:` dataset; DataError when unreadable."""
    if path.startswith("hf:"):
        yield from _iter_hf_rows(path)
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such file (expected .json, .jsonl, .parquet, 'hf:NAME' or 'stdlib-instruct')")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(p)
    elif suffix == ".json":
        yield from _iter_json(p)
    elif suffix == ".parquet":
        yield from _iter_parquet(p)
    else:
        raise DataError(f"{path}: unsupported file type '{p.suffix}'; use .json, .jsonl or .parquet")


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 at byte {e.start} ({e.reason}); re-encode the file as UTF-8") from None


def _iter_jsonl(p: Path, text: str | None = None) -> Iterator[tuple[str, dict]]:
    text = text if text is not None else _read(p)
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is valid inside JSON strings
        if not line.strip():
            continue
        try:
            yield f"{p}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{p}:{lineno}", _Unparsable(f"not valid JSON ({e.msg} at column {e.colno})")


def _iter_json(p: Path) -> Iterator[tuple[str, dict]]:
    text = _read(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSONL saved as .json
            yield from _iter_jsonl(p, text)
            return
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])  # {"data": [...]} or one object
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{p}[{i}]", row


def _iter_parquet(p: Path) -> Iterator[tuple[str, dict]]:
    from .sources import open_parquet

    pf = open_parquet(p)
    row = 0
    for batch in pf.iter_batches():
        for obj in batch.to_pylist():
            row += 1
            yield f"{p}:row {row}", obj


def _iter_hf_rows(part: str) -> Iterator[tuple[str, dict]]:
    from ..hub import unreachable as hub_unreachable
    from .sources import parse_hf

    name, config, split = parse_hf(part)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{part}: Hugging Face datasets need `datasets`; pip install 'lmlab[data]'") from None
    why = hub_unreachable()
    if why:
        raise DataError(f"{part}: the Hugging Face hub is unreachable ({why}); "
                        "export the data to jsonl/parquet and pass the file")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds, 1):
            yield f"{part}:row {i}", dict(row)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, HTTP errors)
        raise DataError(f"{part}: cannot stream the dataset ({error_line(e)})") from None


class _Unparsable:
    """Stands for a line that is not JSON, so the reader reports it with the other bad rows."""

    def __init__(self, reason: str):
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------- oasst


def oasst_trees(rows: list[tuple[str, dict]], lang: str | None = None) -> dict[str, dict]:
    """Message rows → {tree id: {"root": row, "children": {message_id: [child rows]}}}.

    Deleted messages (and so their replies) are left out; with `lang`, only trees whose root has that language.
    """
    trees: dict[str, dict] = {}
    by_parent: dict[str, list[dict]] = {}
    for _, r in rows:
        if r.get("deleted"):
            continue
        if r.get("parent_id") is None:
            if lang is None or r.get("lang") == lang:
                tid = str(r.get("message_tree_id") or r["message_id"])
                trees[tid] = {"root": r, "children": by_parent}
        else:
            by_parent.setdefault(r["parent_id"], []).append(r)
    return trees


def _rank(r: dict) -> tuple[float, str]:
    rank = r.get("rank")
    return (float(rank) if rank is not None else float("inf"), str(r["message_id"]))


def oasst_best_path(tree: dict) -> Conversation:
    """The conversation from the root following the best-ranked reply (rank 0; unranked last) at every step."""
    msgs, node = [], tree["root"]
    while node is not None:
        msgs.append({"role": _oasst_role(node), "content": node["text"] or ""})
        kids = tree["children"].get(node["message_id"], [])
        node = min(kids, key=_rank) if kids else None
    return msgs


def _oasst_role(r: dict) -> str:
    role = {"prompter": "user", "assistant": "assistant"}.get(r.get("role"))
    if role is None:
        raise RowError(f"oasst role {r.get('role')!r}, expected prompter or assistant")
    return role


def oasst_valid_trees(spec: SourceSpec, rows: Iterator, summary: DataSummary, on_error: str) -> dict:
    """oasst message rows → {tree id: tree}; bad rows reported (file:line) and skipped or fatal per `on_error`."""
    good = []
    for where, r in rows:
        reason = _oasst_row_problem(r)
        if reason:
            _bad(spec.path, where, reason, summary, on_error)
        else:
            good.append((where, r))
    trees = oasst_trees(good, spec.lang)
    summary.stats(spec.path).read = len(trees)
    return trees


def _read_oasst(spec: SourceSpec, rows: Iterator, summary: DataSummary, on_error: str) -> list[Example]:
    trees = oasst_valid_trees(spec, rows, summary, on_error)
    out = []
    for tid, tree in trees.items():
        try:
            out.append(Example(validate(oasst_best_path(tree)), spec.path, f"{spec.path}: tree {tid}", group=tid))
        except RowError as e:
            _bad(spec.path, f"{spec.path}: tree {tid}", str(e), summary, on_error)
    return out


def _oasst_row_problem(r) -> str | None:
    if isinstance(r, _Unparsable):
        return r.reason
    if not isinstance(r, dict) or not {"message_id", "parent_id", "role", "text"} <= set(r):
        return "not an oasst message row (needs message_id, parent_id, role, text)"
    if r["role"] not in ("prompter", "assistant"):
        return f"oasst role {r['role']!r}, expected prompter or assistant"
    if not isinstance(r["text"], str):
        return "text is not a string"
    return None


# ---------------------------------------------------------------------------------------------------------- helpers


def _as_list(x) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]


def _peek(rows: Iterator, n: int = 100) -> tuple[list, Iterator]:
    """The first rows up to the first JSON object (at most n), and an iterator over all rows."""
    head = []
    for item in rows:
        head.append(item)
        if isinstance(item[1], dict) or len(head) >= n:
            break

    def again() -> Iterator:
        yield from head
        yield from rows

    return head, again()


def _bad(source: str, where: str, reason: str, summary: DataSummary, on_error: str) -> None:
    if on_error == "fail":
        raise DataError(f"{where}: {reason} (pass finetune.on_error=skip to count and skip bad rows)")
    summary.drop(source, reason, where)


def _why(summary: DataSummary) -> str:
    drops = Counter()
    first = {}
    for s in summary.sources.values():
        drops.update(s.dropped)
        for r, w in s.first_error.items():
            first.setdefault(r, w)
    if not drops:
        return ""
    return "; dropped: " + ", ".join(f"{r} x{n} (e.g. {first[r]})" for r, n in drops.most_common(3))


def _text(row: dict, key: str, optional: bool = False) -> str:
    if isinstance(row, _Unparsable):
        raise RowError(row.reason)
    v = row.get(key)
    if v is None and optional:
        return ""
    if v is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(v, str):
        raise RowError(f"field '{key}' is {type(v).__name__}, expected a string")
    return v.strip()


def _join(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra and instruction else instruction or extra


def _list(row: dict, key: str) -> list:
    if isinstance(row, _Unparsable):
        raise RowError(row.reason)
    v = row.get(key)
    if not isinstance(v, list):
        raise RowError(f"field '{key}' is {type(v).__name__}, expected a list of turns")
    return v


def _sharegpt_turn(t) -> dict[str, str]:
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
        raise RowError("a turn without 'from' and 'value'")
    role = SHAREGPT_ROLES.get(str(t["from"]).lower())
    if role is None:
        raise RowError(f"unknown speaker {t['from']!r} (expected human, gpt or system)")
    if not isinstance(t["value"], str):
        raise RowError(f"turn 'value' is {type(t['value']).__name__}, expected a string")
    return {"role": role, "content": t["value"]}


def _openai_turn(t) -> dict[str, str]:
    if not isinstance(t, dict) or "role" not in t or "content" not in t:
        raise RowError("a message without 'role' and 'content'")
    if t["role"] not in ROLES:
        raise RowError(f"unknown role {t['role']!r} (expected {', '.join(ROLES)})")
    if not isinstance(t["content"], str):
        raise RowError(f"message content is {type(t['content']).__name__}, expected a string")
    return {"role": t["role"], "content": t["content"]}


def _dedup(examples: list[Example], seen: set[str], summary: DataSummary) -> list[Example]:
    out = []
    for e in examples:
        k = e.key()
        if k in seen:
            summary.drop(e.source, "duplicate", e.where)
        else:
            seen.add(k)
            out.append(e)
    return out


def _cap(examples: list[Example], spec: SourceSpec, seed: int, summary: DataSummary) -> list[Example]:
    if spec.max_examples is None or len(examples) <= spec.max_examples:
        return examples
    keep = np.sort(np.random.default_rng([seed, 2]).permutation(len(examples))[: spec.max_examples])
    st = summary.stats(spec.path)
    st.dropped["over max_examples"] += len(examples) - spec.max_examples
    st.first_error.setdefault("over max_examples", f"{spec.path} (cap {spec.max_examples})")
    return [examples[i] for i in keep]


def _weight(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """Repeat each example int(weight) times, plus a seeded random fraction of them once more."""
    if weight == 1.0 or not examples:
        return examples
    whole, frac = int(weight), weight - int(weight)
    out = examples * whole
    if frac > 0:
        n = round(frac * len(examples))
        pick = np.sort(np.random.default_rng([seed, 3]).permutation(len(examples))[:n])
        out += [examples[i] for i in pick]
    return out
