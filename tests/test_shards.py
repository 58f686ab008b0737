"""Token shards: deterministic document split, manifest, EOS packing, reuse, rebuilds, unigram baseline."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import lmlab.data.shards as shards
from lmlab.data.shards import prepare_corpus, unigram_entropy
from lmlab.data.tokenizer import EOS
from lmlab.errors import ConfigError, DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_docs(n: int) -> list[str]:
    """n distinct documents of varying length."""
    return [f"doc {i}: " + " ".join(WORDS[(i * 7 + k) % 12] for k in range(3 + i % 11)) for i in range(n)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def jsonl(tmp_path):
    def write(docs: list[str], name: str = "data.jsonl"):
        p = tmp_path / name
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return str(p)

    return write


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


def decoded(corpus, tok, split: str) -> list[str]:
    return [tok.decode(ids) for ids in split_docs(getattr(corpus, split), corpus.eos_id)]


def test_manifest_and_files(stdlib_tokenizer, jsonl, tmp_path):
    docs = make_docs(50)
    c = prepare_corpus(jsonl(docs), stdlib_tokenizer, val_fraction=0.2, seed=3)
    assert c.dir.parent == tmp_path / "cache" / "data" and c.dir.name == c.fingerprint
    m = json.loads((c.dir / "manifest.json").read_text())
    assert m == c.manifest
    assert m["format"] == 1 and m["source"].endswith("data.jsonl") and m["dtype"] == "uint16"
    assert m["vocab_size"] == len(stdlib_tokenizer) == c.vocab_size
    assert m["eos_id"] == stdlib_tokenizer.eos_token_id == c.eos_id
    assert m["seed"] == 3 and m["val_fraction"] == 0.2 and m["max_docs"] is None
    assert len(m["source_fingerprint"]) == len(m["tokenizer_fingerprint"]) == 16 and m["created"]
    assert m["train_docs"] + m["val_docs"] == 50
    assert (m["train_docs"], m["val_docs"]) == (c.train_docs, c.val_docs)
    assert 3 <= c.val_docs <= 20  # ~10 expected
    for split in ("train", "val"):
        arr = getattr(c, split)
        assert isinstance(arr, np.memmap) and arr.dtype == np.dtype("<u2")
        assert len(arr) == m[f"{split}_tokens"]
        assert (c.dir / f"{split}.bin").stat().st_size == 2 * len(arr)
    assert sorted(p.name for p in c.dir.iterdir()) == ["manifest.json", "train.bin", "val.bin"]
    assert [p.name for p in c.dir.parent.iterdir()] == [c.dir.name]  # no temp folders left


def test_documents_are_packed_with_eos_and_split_whole(stdlib_tokenizer, jsonl):
    docs = make_docs(50)
    c = prepare_corpus(jsonl(docs), stdlib_tokenizer, val_fraction=0.2)
    for split, n in (("train", c.train_docs), ("val", c.val_docs)):
        arr = getattr(c, split)
        assert int((arr == c.eos_id).sum()) == n and arr[-1] == c.eos_id
    train, val = decoded(c, stdlib_tokenizer, "train"), decoded(c, stdlib_tokenizer, "val")
    assert train + val != docs and sorted(train + val) == sorted(docs)  # every document whole, in one split
    assert train == [d for d in docs if d in set(train)]  # source order kept within a split
    for d, ids in zip(train, split_docs(c.train, c.eos_id)):
        assert ids == stdlib_tokenizer.encode(d, add_special_tokens=False)


def test_literal_eos_text_is_not_a_document_boundary(stdlib_tokenizer, jsonl):
    c = prepare_corpus(jsonl([f"before {EOS} after", "second", "third"]), stdlib_tokenizer, val_fraction=0.0)
    assert int((c.train == c.eos_id).sum()) == 3 and len(c.val) == 0
    assert decoded(c, stdlib_tokenizer, "train")[0] == f"before {EOS} after"


def test_split_is_deterministic_per_seed(stdlib_tokenizer, jsonl, tmp_path):
    src = jsonl(make_docs(60))
    a = prepare_corpus(src, stdlib_tokenizer, val_fraction=0.25, seed=1, cache_root=tmp_path / "a")
    b = prepare_corpus(src, stdlib_tokenizer, val_fraction=0.25, seed=1, cache_root=tmp_path / "b")
    other = prepare_corpus(src, stdlib_tokenizer, val_fraction=0.25, seed=2, cache_root=tmp_path / "a")
    assert a.dir != b.dir and a.fingerprint == b.fingerprint
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert other.fingerprint != a.fingerprint
    assert set(decoded(other, stdlib_tokenizer, "val")) != set(decoded(a, stdlib_tokenizer, "val"))


def test_small_corpora_get_one_val_document_and_keep_train(stdlib_tokenizer, jsonl):
    c = prepare_corpus(jsonl(make_docs(3), "three.jsonl"), stdlib_tokenizer, val_fraction=1e-9)
    assert (c.train_docs, c.val_docs) == (2, 1)
    assert int((c.train == c.eos_id).sum()) == 2 and int((c.val == c.eos_id).sum()) == 1
    d = make_docs(3)  # under seed 0 the middle document is the most val-like: it is cut out of train
    assert decoded(c, stdlib_tokenizer, "train") == [d[0], d[2]] and decoded(c, stdlib_tokenizer, "val") == [d[1]]
    c = prepare_corpus(jsonl(make_docs(2), "two.jsonl"), stdlib_tokenizer, val_fraction=0.999999)
    assert (c.train_docs, c.val_docs) == (1, 1)
    c = prepare_corpus(jsonl(make_docs(1), "one.jsonl"), stdlib_tokenizer, val_fraction=0.999999)
    assert (c.train_docs, c.val_docs) == (1, 0) and len(c.val) == 0
    c = prepare_corpus(jsonl(make_docs(5), "five.jsonl"), stdlib_tokenizer, val_fraction=0.0)
    assert (c.train_docs, c.val_docs) == (5, 0)


def test_second_call_reuses_without_tokenizing(stdlib_tokenizer, jsonl, monkeypatch):
    src = jsonl(make_docs(20))
    first = prepare_corpus(src, stdlib_tokenizer)
    created = first.manifest["created"]

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(shards, "iter_documents", boom)
    again = prepare_corpus(src, stdlib_tokenizer)
    assert again.dir == first.dir and again.manifest["created"] == created
    assert np.array_equal(again.train, first.train)


def test_changed_source_or_params_make_new_shards(stdlib_tokenizer, jsonl, tmp_path):
    src = jsonl(make_docs(20))
    first = prepare_corpus(src, stdlib_tokenizer)
    with open(src, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = prepare_corpus(src, stdlib_tokenizer)
    assert changed.dir != first.dir and changed.train_docs + changed.val_docs == 21
    assert prepare_corpus(src, stdlib_tokenizer, max_docs=5).fingerprint not in (first.fingerprint, changed.fingerprint)
    assert prepare_corpus(src, stdlib_tokenizer, val_fraction=0.5).fingerprint != changed.fingerprint
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 4


def test_path_and_list_sources(stdlib_tokenizer, jsonl, tmp_path):
    src = jsonl(make_docs(4))
    c = prepare_corpus(tmp_path / "data.jsonl", stdlib_tokenizer, val_fraction=0.0)
    assert c.manifest["source"] == src and c.train_docs == 4
    c = prepare_corpus([src, src], stdlib_tokenizer, val_fraction=0.0)
    assert c.manifest["source"] == [src, src] and c.train_docs == 8


def test_max_docs_and_stdlib(stdlib_tokenizer):
    c = prepare_corpus("stdlib", stdlib_tokenizer, max_docs=4, val_fraction=0.3)
    assert c.train_docs + c.val_docs == 4 and c.val_docs >= 1
    assert c.manifest["source"] == "stdlib" and c.manifest["max_docs"] == 4


def test_incomplete_folder_is_rebuilt(stdlib_tokenizer, jsonl):
    src = jsonl(make_docs(10))
    c = prepare_corpus(src, stdlib_tokenizer)
    (c.dir / "train.bin").write_bytes(b"\0\0")  # truncated / tampered
    again = prepare_corpus(src, stdlib_tokenizer)
    assert again.dir == c.dir and len(again.train) == c.manifest["train_tokens"]


def test_bad_input_leaves_no_folder(stdlib_tokenizer, jsonl, tmp_path):
    src = jsonl(make_docs(10) + ["x"])
    with open(src, "a") as f:
        f.write("{broken\n")
    with pytest.raises(DataError, match=r"data.jsonl:12: not valid JSON"):
        prepare_corpus(src, stdlib_tokenizer)
    assert list((tmp_path / "cache" / "data").iterdir()) == []
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_corpus(src, stdlib_tokenizer, val_fraction=1.0)
    with pytest.raises(ConfigError, match="max_docs"):
        prepare_corpus(src, stdlib_tokenizer, max_docs=0)


def test_unigram_entropy_by_hand():
    tokens = np.array([0, 0, 1, 2], dtype=np.uint16)
    # add-one counts over V=4: [3, 2, 2, 1] / 8
    expected = -(2 * math.log(3 / 8) + math.log(2 / 8) + math.log(2 / 8)) / 4
    assert unigram_entropy(tokens, 4) == pytest.approx(expected)
    # fit on ref=[3, 3]: add-one counts [1, 1, 1, 3] / 6, evaluated on [0, 3]
    ref = np.array([3, 3])
    expected = -(math.log(1 / 6) + math.log(3 / 6)) / 2
    assert unigram_entropy(np.array([0, 3]), 4, ref=ref) == pytest.approx(expected)
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_entropy(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="no tokens"):
        unigram_entropy(np.array([], dtype=np.int64), 4)


def test_unigram_entropy_matches_direct_formula_on_memmap(stdlib_tokenizer, jsonl):
    c = prepare_corpus(jsonl(make_docs(40)), stdlib_tokenizer, val_fraction=0.25)
    counts = np.bincount(np.asarray(c.train, dtype=np.int64), minlength=c.vocab_size) + 1
    logp = np.log(counts / counts.sum())
    direct = -logp[np.asarray(c.val, dtype=np.int64)].mean()
    assert unigram_entropy(c.val, c.vocab_size, ref=c.train) == pytest.approx(direct)
    assert 0 < unigram_entropy(c.train, c.vocab_size) < math.log(c.vocab_size)


def test_killed_build_leftovers_are_cleaned(stdlib_tokenizer, jsonl, tmp_path):
    import socket

    root = tmp_path / "cache" / "data"
    src = jsonl(make_docs(5))
    c = prepare_corpus(src, stdlib_tokenizer, cache_root=root)
    dead = root / f".{c.dir.name}.tmp-{socket.gethostname()}-999999999-abcd1234"  # no such pid
    other_host = root / f".{c.dir.name}.tmp-elsewhere-1-abcd1234"
    dead.mkdir()
    other_host.mkdir()
    shutil.rmtree(c.dir)
    assert prepare_corpus(src, stdlib_tokenizer, cache_root=root).dir == c.dir
    assert sorted(p.name for p in root.iterdir()) == sorted([c.dir.name, other_host.name])
