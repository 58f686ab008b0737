"""Session-scoped tokenizer fixtures (a tokenizer trained once on the Python standard library).

Every test that needs "a real tokenizer for the stdlib corpus" uses `stdlib_tokenizer_dir` (the folder, what
`data.tokenizer=` takes) or `stdlib_tokenizer` (that folder loaded afresh for each test, so added tokens, a chat
template or padding state set by one test never reach another). The folder is trained once per session and must
come out of the session byte for byte as it went in: a test that writes into it fails at teardown, naming it.
Tests of tokenizer training itself (tests/test_tokenizer.py) train their own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

STDLIB_VOCAB = 512
STDLIB_MAX_CHARS = 400_000  # the first 400k characters of the stdlib corpus: ~0.1 s to train on one core


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def stdlib_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE of `STDLIB_VOCAB` tokens trained on the first `STDLIB_MAX_CHARS` characters of the
    stdlib corpus, saved once per session; read-only by contract (checked at teardown)."""
    from lmlab.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("stdlib-tokenizer")
    train_bpe("stdlib", STDLIB_VOCAB, out, max_chars=STDLIB_MAX_CHARS)
    before = _digest(out)
    yield out
    assert _digest(out) == before, f"{out}: a test changed the session's shared stdlib tokenizer folder"


@pytest.fixture
def stdlib_tokenizer(stdlib_tokenizer_dir):
    """The session's stdlib tokenizer, loaded afresh for this test (a `PreTrainedTokenizerFast`)."""
    from lmlab.data.tokenizer import load_tokenizer

    return load_tokenizer(str(stdlib_tokenizer_dir))
