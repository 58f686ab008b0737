"""`stdlib-instruct`: an offline instruction dataset made from the running Python's standard library.

Every documented top-level function (and method of a top-level class) whose source is short becomes one example:

    user:      Write a Python function `quote(s)` that returns a shell-escaped version of the string *s*.
    assistant: def quote(s):
                   \"\"\"Return a shell-escaped version of the string *s*.\"\"\"
                   ...

The prompt takes the first sentence of the docstring (its leading verb put in the third person when it reads
like an imperative); the answer is the source, decorators included, dedented. The stdlib is read at run time
(`sources.stdlib_files()`, never copied); the examples are cached as JSONL under `cache_dir()/data/`, keyed by
the stdlib's fingerprint, so only the first call parses (a few seconds). Each example's split group is its
qualified name (`module.func`), so `load_instruct` holds out the same functions on every machine and run.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import sys
import textwrap
from pathlib import Path

from ..fsutil import atomic_write_text
from . import cache_dir
from .records import STDLIB_INSTRUCT, Example
from .sources import stdlib_files

VERSION = 1  # bump when the extraction rules change (invalidates the cache)
MAX_LINES = 60
MAX_CHARS = 3000
MAX_SUMMARY = 300
# leading words that are not imperative verbs: keep the sentence as is, after a colon
NOT_VERBS = {"a", "an", "the", "this", "these", "that", "it", "if", "for", "in", "on", "when", "internal", "helper",
             "used", "same", "like", "deprecated", "alias", "private", "utility", "decorator", "wrapper"}


def stdlib_instruct_examples(refresh: bool = False) -> list[Example]:
    """All `stdlib-instruct` examples, in a deterministic order (module path, then source order); cached."""
    root, files = stdlib_files()
    path = cache_dir() / "data" / f"{STDLIB_INSTRUCT}-v{VERSION}-{_fingerprint(root, files)}.jsonl"
    if path.is_file() and not refresh:
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        return [_example(r) for r in rows]
    rows = extract(files, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a concurrent identical build just wins or loses the race
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return [_example(r) for r in rows]


def extract(files: list[Path], root: Path) -> list[dict]:
    """{"name", "prompt", "answer"} for every usable function in `files` (module names relative to `root`)."""
    rows = []
    for p in files:
        module = _module_name(p, root)
        try:
            text = importlib.util.decode_source(p.read_bytes())
            tree = ast.parse(text)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are templates or data, not Python for this interpreter
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows += _row(node, lines, module, None)
            elif isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                        rows += _row(sub, lines, module, node.name)
    return rows


def summary_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line, without its final period."""
    para = docstring.strip().split("\n\n")[0]
    para = " ".join(line.strip() for line in para.splitlines())
    m = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", para)
    return (para[: m.start()] if m else para).strip()


def instruction(name: str, signature: str, summary: str, cls: str | None = None, is_async: bool = False) -> str:
    """The user prompt for one function."""
    kind = "async function" if is_async else "function"
    what = f"method `{name}({signature})` of a class `{cls}`" if cls else f"{kind} `{name}({signature})`"
    clause = _third_person(summary)
    return f"Write a Python {what} that {clause}." if clause else f"Write a Python {what}: {summary}."


# ----------------------------------------------------------------------------------------------------------


def _fingerprint(root: Path, files: list[Path]) -> str:
    """Changes when the interpreter, or any file's path, size or mtime, changes."""
    h = hashlib.sha256(f"{sys.version}\n{root}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _example(r: dict) -> Example:
    msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]
    return Example(msgs, STDLIB_INSTRUCT, r["name"], group=r["name"])


def _module_name(p: Path, root: Path) -> str:
    parts = list(p.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or p.stem


def _row(node, lines: list[str], module: str, cls: str | None) -> list[dict]:
    doc = ast.get_docstring(node)
    if not doc:
        return []
    summary = summary_sentence(doc)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if not summary or len(summary) > MAX_SUMMARY or summary.startswith(f"{node.name}("):
        return []  # no summary, or an old-style "name(args)" signature line instead of one
    if node.end_lineno - start + 1 > MAX_LINES:
        return []
    source = textwrap.dedent("\n".join(lines[start - 1: node.end_lineno]))
    if len(source) > MAX_CHARS:
        return []
    qual = f"{module}.{cls}.{node.name}" if cls else f"{module}.{node.name}"
    prompt = instruction(node.name, ast.unparse(node.args), summary, cls, isinstance(node, ast.AsyncFunctionDef))
    return [{"name": qual, "prompt": prompt, "answer": source}]


def _third_person(summary: str) -> str | None:
    """'Return the sum of a and b' -> 'returns the sum of a and b'; None when it does not start with a verb."""
    word, _, rest = summary.partition(" ")
    if not word.isalpha() or not word[0].isupper() or word[1:] != word[1:].lower() or word.lower() in NOT_VERBS:
        return None
    if word.endswith(("ed", "ing", "ly")):
        return None  # "Called when ...", "Using ...", "Only ...": not an imperative
    verb = word.lower()
    if verb.endswith("s") and not verb.endswith("ss"):
        third = verb  # already "Returns ..."
    elif verb.endswith(("sh", "ch", "x", "z", "o", "ss")):
        third = verb + "es"
    elif verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        third = verb[:-1] + "ies"
    else:
        third = verb + "s"
    return f"{third} {rest}".strip()
