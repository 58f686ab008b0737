"""Instruction data: read many formats, normalise to one message schema, mix, de-duplicate, split, summarise.

One conversation is a list of messages, `{"role": "system" | "user" | "assistant", "content": str}`: an
optional system message first, then user and assistant turns alternating, ending with an assistant turn.

    data = load_instruct(["alpaca.json", SourceSpec("hf:OpenAssistant/oasst1", lang="en", weight=2.0),
                          "stdlib-instruct"], val_fraction=0.02, seed=0)
    data.train, data.val        # lists of Example (messages + where they came from)
    print(data.summary.format())

Formats, detected from the fields of the first row (or forced with `SourceSpec(format=...)`; normalise.py):

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

The parts: records.py (the types, the summary, the bad-row policy), rows.py (reading files and the hub),
normalise.py (formats → conversations), oasst.py (message trees), mixture.py (de-duplicate, cap, split, weight).
"""

from __future__ import annotations

import numpy as np

from .mixture import load_sources
from .normalise import detect_format, row_to_messages
from .oasst import read_oasst
from .records import STDLIB_INSTRUCT, DataSummary, Example, SourceSpec, SplitData, convert_rows
from .rows import first_row

InstructData = SplitData[Example]


def load_instruct(sources: str | SourceSpec | list[str | SourceSpec], *, val_fraction: float = 0.02, seed: int = 0,
                  on_error: str = "skip", dedup: bool = True) -> InstructData:
    """Read every source, drop bad rows and exact duplicates, cap, split and weight (mixture.load_sources: each
    source holds out round(val_fraction × its examples), whole groups by hash(seed, group); oasst trees and
    stdlib modules' functions are grouped so they never straddle the split), then shuffle the training list with
    the seed. Raises DataError when no valid example is left."""
    train, val, summary = load_sources(sources, read_source, what="instruction data", unit="example",
                                       val_fraction=val_fraction, seed=seed, on_error=on_error, dedup=dedup,
                                       kinds="a file, 'hf:NAME' or 'stdlib-instruct'")
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    return InstructData([train[i] for i in order], val, summary)


def read_source(spec: SourceSpec | str, summary: DataSummary | None = None, on_error: str = "skip") -> list[Example]:
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
    where, row, rows = first_row(spec.path, "instruction data")
    fmt = spec.format or detect_format(row, where)
    summary.formats[spec.path] = fmt
    if fmt == "oasst":
        return read_oasst(spec, rows, summary, on_error)
    return convert_rows(spec, rows, lambda row, where: Example(row_to_messages(row, fmt), spec.path, where),
                        summary, on_error)
