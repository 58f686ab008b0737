"""The few places where lmlab follows a transformers contract that moved between the releases it supports.

Supported: see `[project] dependencies` in pyproject.toml. Each shim names the release that lets it go.
"""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

TRANSFORMERS = Version(version("transformers"))

# transformers 5.24 renamed the cache argument of every forward, output and `generate` hook from
# `past_key_values` / `cache_params` to `cache` (and 5.40 drops the old names). Before 5.24, `generate`
# looked for the cache in a model's output under `past_key_values` or `cache_params` only.
# Drop with support for transformers < 5.24.
CACHE_RENAMED = TRANSFORMERS >= Version("5.24.0.dev0")
HF_CACHE_KWARG = "cache" if CACHE_RENAMED else "past_key_values"


def enable_activation_checkpointing(model) -> None:
    """Turn on activation checkpointing (non-reentrant) on any transformers model.

    Newer transformers name it `activation_checkpointing_enable`; the old `gradient_checkpointing_enable`
    warns and goes in 6.0. The fallback serves only releases without the new name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
