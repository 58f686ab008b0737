"""Prompt sets for reinforcement learning with verifiable rewards (train.objective=grpo): prompts with what a
reward function checks their completions against. data.source names one or more of:

    arithmetic          generated problems "a+b" → answer "c" (rl.arithmetic_digits, rl.arithmetic_ops,
                        rl.arithmetic_prompts distinct problems, drawn with a fixed seed)
    stdlib-functions    functions of the running Python's standard library whose docstrings hold doctest examples
                        (from `stdlib-instruct`): the prompt asks for the function, `tests` runs its doctests
    FILE.jsonl / .json  rows {"prompt" | "question": str | messages, "answer": …, "tests": str}; `answer` for the
                        answer reward, `tests` (Python asserts run after the completion) for the code reward

    prompts = load_prompts(cfg)       # PromptData(train, val, lines); split by data.val_fraction like every set
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .mixture import split_held_out
from .records import Conversation, RowError, content_key
from .rows import iter_rows

ARITHMETIC, STDLIB_FUNCTIONS = "arithmetic", "stdlib-functions"
ARITHMETIC_SEED = 20240101  # the problems do not depend on train.seed: every run draws the same set


@dataclass
class Prompt:
    messages: Conversation  # ending with a user turn
    answer: str | None = None
    tests: str | None = None
    source: str = ""
    group: str = ""  # split key

    def key(self) -> str:
        return content_key([self.messages, self.answer, self.tests])

    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PromptData:
    train: list[Prompt]
    val: list[Prompt]
    lines: list[str] = field(default_factory=list)


def arithmetic_problems(digits: int = 2, ops: str = "+", count: int = 5000,
                        seed: int = ARITHMETIC_SEED) -> list[tuple[str, str]]:
    """`count` distinct (question "a+b", answer) pairs with `digits`-digit operands, in a fixed order."""
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
    n = hi - lo
    total = n * n * len(ops)
    rng = np.random.default_rng([seed, digits, *map(ord, ops)])
    picks = rng.choice(total, size=min(count, total), replace=False)
    out = []
    for k in picks.tolist():
        op, rest = ops[k // (n * n)], k % (n * n)
        a, b = lo + rest // n, lo + rest % n
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append((f"{a}{op}{b}", str(value)))
    return out


def _user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


def _arithmetic(rl) -> list[Prompt]:
    return [Prompt(_user(q), answer=a, source=ARITHMETIC, group=q)
            for q, a in arithmetic_problems(rl.arithmetic_digits, rl.arithmetic_ops, rl.arithmetic_prompts)]


def doctest_source(answer: str) -> tuple[str, str] | None:
    """(function name, its docstring) when `answer` defines one function whose docstring has doctest examples
    that call it; else None."""
    try:
        tree = ast.parse(answer)
    except SyntaxError:
        return None
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if len(fns) != 1:
        return None
    doc = ast.get_docstring(fns[0], clean=True) or ""
    name = fns[0].name
    if f">>> {name}(" not in doc:
        return None
    return name, doc


def doctest_tests(doc: str) -> str:
    """Python that runs the doctest examples of `doc` against the names the completion defined; an assertion
    fails unless every example ran and passed."""
    return ("import doctest as _doctest\n"
            f"_t = _doctest.DocTestParser().get_doctest({doc!r}, dict(globals()), 'tests', None, 0)\n"
            "_r = _doctest.DocTestRunner(verbose=False, optionflags=_doctest.ELLIPSIS)\n"
            "_r.run(_t, out=lambda s: None)\n"
            "assert _r.tries > 0 and _r.failures == 0, f'{_r.failures} of {_r.tries} examples failed'\n")


def _stdlib_functions() -> list[Prompt]:
    from .stdlib_instruct import stdlib_instruct_examples

    out = []
    for ex in stdlib_instruct_examples():
        answer = ex.messages[-1]["content"]
        found = doctest_source(answer)
        if found is None:
            continue
        out.append(Prompt(ex.messages[:-1], answer=answer, tests=doctest_tests(found[1]), source=STDLIB_FUNCTIONS,
                          group=ex.group or ex.where))
    if not out:
        raise DataError(f"{STDLIB_FUNCTIONS}: no standard-library function with doctest examples found")
    return out


def _messages(v) -> Conversation:
    if isinstance(v, str) and v.strip():
        return _user(v.strip())
    if isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                         and m.get("role") in ("system", "user", "assistant") for m in v):
        msgs = [{"role": m["role"], "content": m["content"]} for m in v]
        if msgs[-1]["role"] != "user":
            raise RowError("the prompt's messages must end with a user turn")
        return msgs
    raise RowError("'prompt' must be a non-empty string or a list of {role, content} messages")


def _file(path: str) -> list[Prompt]:
    out = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with prompt (or question), answer and/or tests")
        try:
            if "prompt" not in row and "question" not in row:
                raise RowError("needs 'prompt' or 'question'")
            msgs = _messages(row.get("prompt", row.get("question")))
            answer = row.get("answer")
            tests = row.get("tests")
            if answer is None and tests is None:
                raise RowError("needs 'answer' (answer reward) or 'tests' (code reward)")
            if tests is not None and not isinstance(tests, str):
                raise RowError("'tests' must be a string of Python (asserts)")
        except RowError as e:
            raise DataError(f"{where}: {e}") from None
        p = Prompt(msgs, answer=None if answer is None else str(answer), tests=tests, source=path)
        p.group = p.key()
        out.append(p)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def load_prompts(cfg) -> PromptData:
    """The run's prompt sets, each split by data.val_fraction (whole groups, seeded like every split)."""
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    seed = cfg.data.split_seed_for(cfg.train.seed)
    train, val, lines = [], [], []
    for s in map(str, sources):
        if s == ARITHMETIC:
            prompts = _arithmetic(cfg.rl)
            what = f"{ARITHMETIC} ({cfg.rl.arithmetic_digits}-digit, {cfg.rl.arithmetic_ops})"
        elif s == STDLIB_FUNCTIONS:
            prompts, what = _stdlib_functions(), STDLIB_FUNCTIONS
        elif s.endswith((".jsonl", ".json", ".parquet")) or s.startswith("hf:"):
            prompts, what = _file(s), s
        else:
            raise DataError(f"data.source: {s!r} is not a prompt set; use {ARITHMETIC}, {STDLIB_FUNCTIONS} or a "
                            f".jsonl of prompt/answer/tests rows")
        tr, va = split_held_out(prompts, lambda p: p.group or p.key(), cfg.data.val_fraction, seed)
        train += tr
        val += va
        lines.append(f"          {what}: {len(tr):,} train / {len(va):,} held-out prompts")
    return PromptData(train, val, lines)
