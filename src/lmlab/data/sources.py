"""Where text comes from. `iter_documents(source)` turns any supported source into a deterministic stream of
documents (one `str` each); `source_fingerprint(source)` says cheaply whether that stream may have changed.

Source forms (a list of them is concatenated in order):

    "stdlib"                      the running interpreter's standard library, one document per .py file
    "notes.txt", "a.md", "m.py"   one document per file (.txt .md .py .rst)
    "data.jsonl"                  one JSON object per line, text in `text_field`
    "data.parquet"                column `text_field` (needs pyarrow: pip install 'lmlab[data]')
    "corpus/"                     every supported file below the folder, sorted by relative path
    "data/*.txt", "data/**/*.md"  a glob (`**` crosses folders), sorted
    "hf:NAME[:CONFIG][@SPLIT]"    a Hugging Face dataset, streamed (needs `datasets` and the network)

Every problem with the input is a `DataError` whose one-line message names the file (and line) and the fix.
Empty documents are skipped.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .rows import Unparsable, hf_rows, jsonl_lines, open_parquet, read_text

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
# stdlib folders left out of the "stdlib" corpus: installed packages, and test suites (huge, repetitive)
STDLIB_EXCLUDE = ("site-packages", "test", "tests", "idle_test")

Source = str | os.PathLike | list[str | os.PathLike] | tuple[str | os.PathLike, ...]


def iter_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of `source` (see the module docstring for the forms) in a deterministic order.

    Raises DataError for a missing path, an unreadable file, or a source that yields no document.
    """
    n = 0
    for part in _parts(source):
        for doc in _iter_one(part, text_field):
            if doc:
                n += 1
                yield doc
    if n == 0:
        raise DataError(f"data source {_show(source)}: no documents (all are empty); point it at some text")


def source_fingerprint(source: Source, text_field: str = "text") -> str:
    """A short stable hash that changes when the content of `source` may have changed.

    Files: resolved path + size + mtime_ns of each; stdlib: Python version + stdlib path + file count + total
    size; hf: the name string. Raises the same DataError as `iter_documents` for a missing path.
    """
    h = hashlib.sha256(f"text_field={text_field}\n".encode())
    for part in _parts(source):
        if part == "stdlib":
            root, files = stdlib_files()
            size = sum(p.stat().st_size for p in files)
            h.update(f"stdlib {sys.version} {root} {len(files)} {size}\n".encode())
        elif part.startswith("hf:"):
            h.update(f"{part}\n".encode())
        else:
            for p in _resolve_paths(part):
                st = p.stat()
                h.update(f"{p.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def stdlib_files() -> tuple[Path, list[Path]]:
    """(stdlib root, its .py files sorted by relative path) without site-packages and test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDE]  # prune: site-packages alone can be huge
        rel = Path(folder).relative_to(root)
        files += [((rel / n).as_posix(), Path(folder, n)) for n in names if n.endswith(".py")]
    if not files:
        raise DataError(f"data source 'stdlib': no .py files under {root} (a stripped Python install?)")
    return root, [p for _, p in sorted(files)]


def describe_source(source: Source) -> str | list[str]:
    """`source` as JSON-friendly text: a string, or a list of strings for a list of sources."""
    return os.fspath(source) if isinstance(source, str | os.PathLike) else [os.fspath(s) for s in source]


# ----------------------------------------------------------------------------------------------------------


def _parts(source: Source) -> list[str]:
    parts = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not parts:
        raise DataError("no data source given; pass a path, a glob, 'stdlib' or 'hf:NAME'")
    return [os.fspath(p) for p in parts]


def _show(source: Source) -> str:
    d = describe_source(source)
    return repr(d if isinstance(d, str) else ", ".join(d))


def _iter_one(part: str, text_field: str) -> Iterator[str]:
    if part == "stdlib":
        _, files = stdlib_files()
        for p in files:
            yield read_text(p)
    elif part.startswith("hf:"):
        yield from _iter_hf(part, text_field)
    else:
        for p in _resolve_paths(part):
            yield from _iter_file(p, text_field)


def _resolve_paths(part: str) -> list[Path]:
    """The files a path-like source stands for: a file, a folder (recursive) or a glob."""
    path = Path(part).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(_walk(path), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"{path}: folder has no {'/'.join(SUFFIXES)} files; put some text in it")
        return files
    if glob.has_magic(part):
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(part), recursive=True))]
        files = [p for p in matches if p.is_file() and p.suffix.lower() in SUFFIXES]
        if not files:
            raise DataError(f"{part}: glob matches no {'/'.join(SUFFIXES)} files ({len(matches)} paths)")
        return files
    raise DataError(f"{part}: no such file or folder (expected a path, a glob, 'stdlib' or 'hf:NAME')")


def _walk(root: Path) -> Iterator[Path]:
    """Supported files below `root`, skipping hidden files and folders (.git, .ipynb_checkpoints, ...)."""
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for n in names:
            if not n.startswith(".") and Path(n).suffix.lower() in SUFFIXES:
                yield Path(folder, n)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        yield read_text(path)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, obj in jsonl_lines(path):
        where = f"{path}:{lineno}"
        if isinstance(obj, Unparsable):
            raise DataError(f"{where}: {obj.reason}; each line must be one JSON object")
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if text_field not in obj:
            fields = ", ".join(map(str, obj)) or "none"
            raise DataError(f"{where}: no field '{text_field}' (fields: {fields}); choose the text field with "
                            "--text-field")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{text_field}' is {type(text).__name__}, expected a string")
        yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(
            f"{path}: no column '{text_field}' (columns: {', '.join(names)}); choose it with --text-field"
        )
    col_type = pf.schema_arrow.field(text_field).type
    if str(col_type) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column '{text_field}' is {col_type}, expected strings")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise DataError(f"{path}: row {row}: column '{text_field}' is null; drop or fill empty rows")
            yield text


def _iter_hf(part: str, text_field: str) -> Iterator[str]:
    for i, row in hf_rows(part):
        if text_field not in row:
            raise DataError(f"{part}: no column '{text_field}' (columns: {', '.join(row)}); choose with --text-field")
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{part}: row {i}: column '{text_field}' is {type(text).__name__}, expected a string")
        yield text
