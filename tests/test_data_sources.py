"""Data sources: every source form, deterministic order, fingerprints, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from lmlab.data import cache_dir
from lmlab.data.rows import parse_hf
from lmlab.data.sources import iter_documents, source_fingerprint, stdlib_files
from lmlab.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tree(tmp_path):
    """corpus/ with one file of each text type, a subfolder, and files that must be skipped."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("alpha text\nsecond line\n")
    (root / "b.md").write_text("# Beta\n\nmarkdown")
    (root / "d.rst").write_text("Delta\n=====\n")
    (root / "sub" / "c.py").write_text("def gamma():\n    return 'γ'\n")
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "notes.csv").write_text("a,b\n")
    return root


def error(fn, *args, **kwargs) -> str:
    """The DataError message of fn(*args) (consuming generators); it must be a single line."""
    with pytest.raises(DataError) as e:
        out = fn(*args, **kwargs)
        if isinstance(out, types.GeneratorType):
            list(out)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMLAB_CACHE")
    assert cache_dir() == cache_dir().home() / ".cache" / "lmlab"


def test_single_files_are_one_document_each(tree):
    assert list(iter_documents(str(tree / "a.txt"))) == ["alpha text\nsecond line\n"]
    assert list(iter_documents(str(tree / "b.md"))) == ["# Beta\n\nmarkdown"]
    assert list(iter_documents(str(tree / "sub" / "c.py"))) == ["def gamma():\n    return 'γ'\n"]
    assert list(iter_documents(tree / "d.rst")) == ["Delta\n=====\n"]


def test_folder_is_recursive_sorted_and_skips_hidden_and_other_types(tree):
    docs = list(iter_documents(str(tree)))
    assert docs == [  # sorted by relative path
        "alpha text\nsecond line\n",
        "# Beta\n\nmarkdown",
        "Delta\n=====\n",
        "def gamma():\n    return 'γ'\n",
    ]


def test_globs(tree):
    assert list(iter_documents(f"{tree}/*.txt")) == ["alpha text\nsecond line\n"]
    assert list(iter_documents(f"{tree}/**/*.py")) == ["def gamma():\n    return 'γ'\n"]
    assert len(list(iter_documents(f"{tree}/**/*"))) == 4  # the csv matches the glob but is not text


def test_list_concatenates_in_order(tree):
    docs = list(iter_documents([str(tree / "b.md"), str(tree / "a.txt")]))
    assert docs == ["# Beta\n\nmarkdown", "alpha text\nsecond line\n"]


def test_empty_documents_are_skipped(tree):
    (tree / "empty.txt").write_text("")
    assert len(list(iter_documents(str(tree)))) == 4


def test_jsonl(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"text": "one"}, {"text": "two", "id": 2}, {"body": "three", "text": "3"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    assert list(iter_documents(str(p))) == ["one", "two", "3"]
    p.write_text(json.dumps({"body": "b", "text": "t"}) + "\n")
    assert list(iter_documents(str(p), text_field="body")) == ["b"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    msg = error(iter_documents, str(p))
    assert f"{p}:3: not valid JSON" in msg

    p.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    msg = error(iter_documents, str(p))
    assert f"{p}:2:" in msg and "'text'" in msg and "content" in msg and "--text-field" in msg

    p.write_text('["a list"]\n')
    assert f"{p}:1: expected a JSON object" in error(iter_documents, str(p))

    p.write_text('{"text": 5}\n')
    assert f"{p}:1: field 'text' is int" in error(iter_documents, str(p))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["x", "y", "z"], "n": [1, 2, 3]}), p, row_group_size=2)
    assert list(iter_documents(str(p))) == ["x", "y", "z"]
    msg = error(iter_documents, str(p), text_field="body")
    assert str(p) in msg and "'body'" in msg and "text, n" in msg
    assert "expected strings" in error(iter_documents, str(p), text_field="n")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert f"{bad}: not a readable parquet file" in error(iter_documents, str(bad))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = tmp_path / "data.parquet"
    p.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    msg = error(iter_documents, str(p))
    assert str(p) in msg and "pip install 'lmlab[data]'" in msg


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("café".encode("latin-1"))
    msg = error(iter_documents, str(p))
    assert f"{p}: not valid UTF-8 at byte 3" in msg and "re-encode" in msg
    j = tmp_path / "data.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert f"{j}:2: not valid UTF-8 at byte 28" in error(iter_documents, str(j))


def test_utf8_bom_is_dropped(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffhello".encode())
    assert list(iter_documents(str(p))) == ["hello"]


def test_missing_empty_and_unsupported_sources(tmp_path):
    missing = tmp_path / "nope.txt"
    assert f"{missing}: no such file or folder" in error(iter_documents, str(missing))
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'}: folder has no" in error(iter_documents, str(tmp_path / "empty"))
    assert "glob matches no" in error(iter_documents, f"{tmp_path}/*.md")
    (tmp_path / "x.csv").write_text("a,b")
    assert "unsupported file type '.csv'" in error(iter_documents, str(tmp_path / "x.csv"))
    (tmp_path / "blank.txt").write_text("")
    assert "no documents" in error(iter_documents, str(tmp_path / "blank.txt"))
    assert "no data source" in error(iter_documents, [])


def test_stdlib_corpus():
    root, files = stdlib_files()
    rels = [p.relative_to(root).as_posix() for p in files]
    assert len(rels) > 100 and rels == sorted(rels)
    assert "os.py" in rels and "json/decoder.py" in rels
    excluded = {"site-packages", "test", "tests", "idle_test"}
    assert not any(excluded & set(r.split("/")[:-1]) for r in rels)
    first = next(iter_documents("stdlib"))
    assert isinstance(first, str) and first


def test_hf_spec_parsing():
    assert parse_hf("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    expected = ("wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hf("hf:wikitext:wikitext-2-raw-v1@validation") == expected
    assert "expected 'hf:NAME'" in error(parse_hf, "hf:")


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    msg = error(iter_documents, "hf:roneneldan/TinyStories")
    assert msg.startswith("hf:roneneldan/TinyStories:") and "pip install 'lmlab[data]'" in msg


def test_hf_offline_fails_fast(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise AssertionError("must not try the network when offline")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = error(iter_documents, "hf:roneneldan/TinyStories@validation")
    assert "unreachable" in msg and "jsonl" in msg


def test_fingerprints(tree):
    fp = source_fingerprint(str(tree))
    assert fp == source_fingerprint(str(tree)) and len(fp) == 16
    assert source_fingerprint(str(tree), text_field="body") != fp
    (tree / "a.txt").write_text("alpha text, edited\n")
    fp2 = source_fingerprint(str(tree))
    assert fp2 != fp
    os.utime(tree / "b.md", ns=(1, 1))  # same content, new mtime
    assert source_fingerprint(str(tree)) != fp2
    (tree / "new.md").write_text("more")
    assert source_fingerprint(str(tree)) not in (fp, fp2)
    assert source_fingerprint("stdlib") == source_fingerprint("stdlib")
    assert source_fingerprint("hf:a/b") != source_fingerprint("hf:a/c")
    assert "no such file" in error(source_fingerprint, str(tree / "missing"))


def test_cli_missing_path_is_one_line_exit_2(tmp_path, capsys):
    from lmlab.cli import main

    rc = main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "missing.txt: no such file or folder" in err
    assert not (tmp_path / "tok").exists()
