"""Data path: sources -> tokenizer -> memory-mapped token shards (see sources.py, tokenizer.py, shards.py)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """lmlab's cache root: `$LMLAB_CACHE`, default `~/.cache/lmlab` (tokenizers/, data/ live under it)."""
    return Path(os.environ.get("LMLAB_CACHE", "~/.cache/lmlab")).expanduser()
