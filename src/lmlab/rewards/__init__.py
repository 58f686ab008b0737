"""Reward functions for reinforcement learning with verifiable rewards (train.objective=grpo).

A reward function scores a list of completions:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`prompts[i]` is the prompt's text, `completions[i]` the sampled reply (decoded, special tokens dropped);
`columns` holds the prompt set's other fields, one value per completion (`answer`, `tests`, …), plus
`config` (the run's `rl` section) and `notes` (a list of None, one per completion, where a function may put a
one-line reason, e.g. why the sandbox failed a program; it is written with the sample completions). Accept
`**kwargs` and ignore what you do not need, as for TRL's reward functions.

`rl.reward_funcs` names the functions: a built-in below or `module:function` (imported); the total reward is
their sum weighted by `rl.reward_weights` (default 1 each). Built-ins:

    format   1 when the whole completion matches rl.format_regex, else 0
    answer   1 when the completion's answer equals the reference `answer` column (group 1 of rl.answer_regex's
             first match, or the whole completion; stripped; compared as numbers when both read as numbers)
    code     1 when the completion's Python (its first ```python block, or all of it) passes the `tests`
             column in the sandbox (lmlab.rewards.sandbox), else 0 with the reason in `notes`
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..errors import ConfigError

RewardFn = Callable[..., list[float]]


def format_reward(prompts: list[str], completions: list[str], *, config=None, **kw) -> list[float]:
    pattern = re.compile(config.format_regex if config is not None else r"^\s*-?\d+\s*$", re.DOTALL)
    return [1.0 if pattern.fullmatch(c) else 0.0 for c in completions]


def extract_answer(completion: str, regex: str = "") -> str | None:
    if regex:
        m = re.search(regex, completion, re.DOTALL)
        if m is None:
            return None
        return (m.group(1) if m.groups() else m.group(0)).strip()
    return completion.strip()


def same_answer(got: str | None, want) -> bool:
    if got is None or want is None:
        return False
    want = str(want).strip()
    try:
        return float(got.replace(",", "")) == float(want.replace(",", ""))
    except ValueError:
        return got == want


def answer_reward(prompts: list[str], completions: list[str], *, answer=None, config=None, **kw) -> list[float]:
    if answer is None:
        raise ConfigError("rl.reward_funcs: the answer reward needs prompts with an `answer` field")
    regex = config.answer_regex if config is not None else ""
    return [1.0 if same_answer(extract_answer(c, regex), a) else 0.0 for c, a in zip(completions, answer,
                                                                                        strict=True)]


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def code_reward(prompts: list[str], completions: list[str], *, tests=None, config=None, notes=None,
                **kw) -> list[float]:
    from .sandbox import Limits, run_python

    if tests is None:
        raise ConfigError("rl.reward_funcs: the code reward needs prompts with a `tests` field")
    limits = Limits() if config is None else Limits(timeout=config.sandbox_timeout, cpu=config.sandbox_cpu,
                                                     memory_mb=config.sandbox_memory_mb)
    workers = 1 if config is None else config.sandbox_workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda ct: run_python(extract_code(ct[0]), ct[1], limits),
                                zip(completions, tests, strict=True)))
    if notes is not None:
        for i, r in enumerate(results):
            if not r.passed:
                notes[i] = f"code: {r.reason}"
    return [1.0 if r.passed else 0.0 for r in results]


BUILTIN: dict[str, RewardFn] = {"format": format_reward, "answer": answer_reward, "code": code_reward}


def resolve(name: str) -> RewardFn:
    """A built-in by name, or `module:function` imported; ConfigError naming the key otherwise."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"rl.reward_funcs: unknown reward {name!r}; built-in: {', '.join(BUILTIN)}, "
                          f"or module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward_funcs: cannot import {name!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"rl.reward_funcs: {name!r} is not callable")
    return fn


def reward_name(name: str) -> str:
    """The metric name of a reward function: rewards/<name> (the function's name for module:function)."""
    return name.partition(":")[2] or name if ":" in name else name
