"""Reading rows and text from files and the Hugging Face hub: what the document reader (sources.py) and the
example readers (instruct, preference, unpaired, prompts) share.

    for where, row in iter_rows("data.jsonl"): ...     # where: "file:line", "file[i]", "file:row i", "hf:NAME:row i"
    where, row, rows = first_row(path, "preference data")   # a row to detect the format from, then all rows

Files are UTF-8 (a leading BOM is dropped); an unreadable file or invalid UTF-8 is a DataError naming the file
(and line). A JSONL line that is not JSON does not stop the reading: it comes as an `Unparsable` row, reported
by the reader with the other bad rows (or raised, for documents).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from ..fsutil import error_line, first_line


class Unparsable:
    """Stands for a line that is not JSON, so the reader reports it with the other bad rows."""

    def __init__(self, reason: str):
        self.reason = reason


def decode_utf8(data: bytes, path: Path, offset: int = 0, where: str = "") -> str:
    """`data`, read from `path` at byte `offset` (0: the file's start, where a BOM is dropped), as text; DataError
    naming the file (`where`: e.g. ":12" for line 12) and the byte otherwise."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}{where}: not valid UTF-8 at byte {offset + e.start} ({e.reason}); "
            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}`"
        ) from None


def read_text(path: Path) -> str:
    """A whole UTF-8 file; DataError when it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return decode_utf8(data, path)


def jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value or Unparsable) for each non-blank line, read as it goes. Lines end at
    '\\n' only (U+2028 is valid inside JSON strings)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, offset, f":{lineno}")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, Unparsable(f"not valid JSON ({e.msg} at column {e.colno})")


def open_parquet(path: Path):
    """A pyarrow ParquetFile, or one DataError line (pyarrow missing, or not a parquet file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install 'lmlab[data]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with long messages
        raise DataError(f"{path}: not a readable parquet file ({first_line(e)})") from None


def parse_hf(part: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (name, config, split); split defaults to 'train'."""
    spec = part[3:]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"{part}: expected 'hf:NAME', 'hf:NAME:CONFIG' or 'hf:NAME@SPLIT'")
    return name, config or None, split or "train"


def hf_rows(part: str) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) of a Hugging Face dataset `hf:NAME[:CONFIG][@SPLIT]`, streamed; DataError when
    `datasets` is missing, the hub is unreachable or the dataset cannot be streamed."""
    from ..hub import unreachable as hub_unreachable

    name, config, split = parse_hf(part)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{part}: Hugging Face datasets need `datasets`; pip install 'lmlab[data]'") from None
    why = hub_unreachable()
    if why:
        raise DataError(f"{part}: the Hugging Face hub is unreachable ({why}); "
                        "streaming needs the network — export the data to jsonl/parquet and pass the file")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds, 1):
            yield i, dict(row)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, HTTP errors)
        raise DataError(f"{part}: cannot stream the dataset ({error_line(e)})") from None


def iter_rows(path: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a .json/.jsonl/.parquet file or `hf:` dataset; DataError when unreadable.
    A row is what the file holds (a dict when well-formed; an Unparsable for a JSONL line that is not JSON)."""
    if path.startswith("hf:"):
        for i, row in hf_rows(path):
            yield f"{path}:row {i}", row
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such file (expected .json, .jsonl, .parquet, 'hf:NAME' or 'stdlib-instruct')")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(p)
    elif suffix == ".json":
        yield from _json_rows(p)
    elif suffix == ".parquet":
        yield from _parquet_rows(p)
    else:
        raise DataError(f"{path}: unsupported file type '{p.suffix}'; use .json, .jsonl or .parquet")


def first_row(path: str, what: str, n: int = 100) -> tuple[str, object, Iterator[tuple[str, object]]]:
    """(where, row) of the first JSON object among the first `n` rows of `path` (else its first row), and an
    iterator over all its rows, that one included; DataError when it has none ('point it at some `what`')."""
    rows = iter_rows(path)
    head = []
    for item in rows:
        head.append(item)
        if isinstance(item[1], dict) or len(head) >= n:
            break
    if not head:
        raise DataError(f"{path}: no rows; point it at some {what}")

    def again() -> Iterator:
        yield from head
        yield from rows

    where, row = next(((w, r) for w, r in head if isinstance(r, dict)), head[0])
    return where, row, again()


def _jsonl_rows(p: Path) -> Iterator[tuple[str, object]]:
    for lineno, row in jsonl_lines(p):
        yield f"{p}:{lineno}", row


def _json_rows(p: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(read_text(p))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSONL saved as .json
            yield from _jsonl_rows(p)
            return
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])  # {"data": [...]} or one object
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{p}[{i}]", row


def _parquet_rows(p: Path) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in open_parquet(p).iter_batches():
        for obj in batch.to_pylist():
            row += 1
            yield f"{p}:row {row}", obj
