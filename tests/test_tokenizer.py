"""Tokenizers: train_bpe -> AutoTokenizer round trip, load_tokenizer forms, offline hub, fingerprints, CLI."""

from __future__ import annotations

import os
import sys
import time

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

import lmlab.data.tokenizer as tokmod
from lmlab.data.tokenizer import EOS, load_tokenizer, tokenizer_fingerprint, train_bpe
from lmlab.errors import ConfigError, DataError
from lmlab.hub import unreachable as hub_unreachable

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n',
    "Unicode: café, naïve, Grüße, Ελληνικά, 日本語, emoji 🙂.\n",
    "for i in range(10):\n    print(i * i)\n" * 2,
]
SAMPLES = [
    "hello world, the fox returns a + b",
    "  leading spaces\n\ttabs and\r\nCRLF  ",
    "déjà vu — Ελληνικά 日本語 🙂 ünïcödé never seen before: 龍",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokcorpus")
    for i, t in enumerate(TEXT):
        (root / f"doc{i}.txt").write_text(t)
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    tok = train_bpe(str(corpus), 400, out)
    return out, tok


def test_train_bpe_round_trips_through_autotokenizer(trained):
    out, tok = trained
    assert (out / "tokenizer.json").is_file()
    auto = AutoTokenizer.from_pretrained(out)
    assert auto.eos_token == EOS and auto.eos_token_id == tok.eos_token_id == 0
    assert 257 < len(auto) <= 400
    for s in SAMPLES:
        ids = auto.encode(s, add_special_tokens=False)
        assert ids == tok.encode(s, add_special_tokens=False)
        assert auto.decode(ids) == s  # byte-level: lossless, even for characters never seen in training
    assert tokenizer_fingerprint(auto) == tokenizer_fingerprint(tok)


def test_train_bpe_is_deterministic_and_caps_text(corpus, tmp_path):
    a = train_bpe(str(corpus), 400, tmp_path / "a")
    b = train_bpe(str(corpus), 400, tmp_path / "b")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    small = train_bpe(str(corpus), 400, tmp_path / "c", max_chars=40)
    assert len(small) < len(a)  # 40 characters cannot support as many merges
    stdlib = train_bpe("stdlib", 300, tmp_path / "d", max_chars=20_000)
    assert len(stdlib) == 300


def test_train_bpe_output_folder_rules(corpus, tmp_path):
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe(str(corpus), 100, tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        train_bpe(str(corpus), 300, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    out = tmp_path / "tok"
    first = train_bpe(str(corpus), 300, out)
    second = train_bpe(str(corpus), 350, out)  # an existing tokenizer folder is replaced
    assert len(first) == 300 and len(second) == len(load_tokenizer(str(out))) == 350
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "tok"]  # no temp folders left behind


def test_failed_training_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        train_bpe(str(bad), 300, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


def test_load_folder_and_tokenizer_json(trained):
    out, tok = trained
    by_folder = load_tokenizer(str(out))
    by_file = load_tokenizer(str(out / "tokenizer.json"))
    for t in (by_folder, by_file):
        assert t.eos_token == EOS
        assert tokenizer_fingerprint(t) == tokenizer_fingerprint(tok)


def test_eos_is_added_when_missing(tmp_path):
    bare = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_token == EOS and tok.eos_token_id == 3 and len(tok) == 4
    assert tok.encode("hello world") == [0, 1]


def test_load_errors_are_one_line(tmp_path):
    for spec, expected in [
        (str(tmp_path / "nope"), "no such file or folder"),
        ("./nope/tokenizer.json", "no such file or folder"),
        (str(tmp_path), "no tokenizer files"),
    ]:
        with pytest.raises(DataError) as e:
            load_tokenizer(spec)
        assert expected in str(e.value) and spec in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_tokenizer("lmlab-tests/no-such-tokenizer")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert msg == (
        "tokenizer 'lmlab-tests/no-such-tokenizer': not found locally and the Hugging Face hub is "
        "unreachable (offline?); pass a local folder or train one with `lmlab tokenizer train`"
    )


def test_hub_probe_is_quick_when_nothing_listens(monkeypatch):
    from lmlab.hub import OFFLINE_VARS

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    t0 = time.perf_counter()
    assert "127.0.0.1" in hub_unreachable(timeout=1.0)
    assert time.perf_counter() - t0 < 3


def test_fingerprint_ignores_padding_state_left_by_calls(trained):
    _, tok = trained
    fp = tokenizer_fingerprint(tok)
    tok = load_tokenizer(str(trained[0]))
    tok.pad_token = tok.eos_token
    tok(["a b", "c"], padding="max_length", max_length=8, truncation=True)
    assert tok.backend_tokenizer.padding is not None  # transformers left its state on the backend ...
    assert tokenizer_fingerprint(tok) == fp  # ... which the fingerprint does not see


def test_stdlib_bpe_is_built_once_and_cached(monkeypatch, tmp_path):
    calls = []

    def tiny_corpus(source, text_field="text"):
        calls.append(source)
        yield from TEXT

    monkeypatch.setattr(tokmod, "iter_documents", tiny_corpus)
    a = load_tokenizer("stdlib-bpe", vocab_size=300)
    b = load_tokenizer("stdlib-bpe", vocab_size=300)
    assert calls == ["stdlib"]
    folders = os.listdir(tmp_path / "cache" / "tokenizers")
    assert folders == [f"stdlib-bpe-300-{sys.version_info.major}.{sys.version_info.minor}"]
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) and a.eos_token == EOS


def test_cli_train_and_info(corpus, tmp_path, capsys):
    from lmlab.cli import main

    out = tmp_path / "tok"
    sources = [str(corpus / "doc0.txt"), str(corpus)]
    rc = main(["tokenizer", "train", *sources, "--vocab-size", "300", "--out", str(out)])
    assert rc == 0 and (out / "tokenizer.json").is_file()
    assert "trained byte-level BPE: 300 tokens" in capsys.readouterr().out
    assert main(["tokenizer", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "vocab size   300" in info and EOS in info
    assert tokenizer_fingerprint(load_tokenizer(str(out))) in info
    rc = main(["tokenizer", "train", str(corpus), "--vocab-size", "10", "--out", str(tmp_path / "small")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "vocab_size=10" in err


# Run in a fresh interpreter with stdin closed: transformers' "Do you wish to run the custom code? [y/N]" would
# print (and, at a terminal, wait) there.
_FRESH = r'''
import json, sys
kind, folder = sys.argv[1], sys.argv[2]
if kind == "lmlab":
    from lmlab.data.tokenizer import load_tokenizer
    tok = load_tokenizer(folder)
    models = "lmlab.models" in sys.modules
else:
    from transformers import AutoTokenizer
    kw = {"trust_remote_code": False} if kind == "auto-untrusted" else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    models = "lmlab" in sys.modules
text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print("RESULT " + json.dumps({"ids": tok("def add(a, b):")["input_ids"], "chat": text, "lmlab_models": models}))
'''


def _fresh(kind: str, folder) -> tuple[dict, str]:
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-I", "-c", _FRESH, kind, str(folder)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):]), proc.stdout + proc.stderr


@pytest.mark.slow
def test_exported_tokenizer_needs_no_remote_code_and_never_asks(trained, tmp_path):
    import json

    import torch

    from lmlab.data.chat import ChatFormat
    from lmlab.models import build_config, build_model
    from lmlab.models.export import export

    tok = load_tokenizer(str(trained[0]))
    tok.chat_template = ChatFormat(tok, "plain").inference_template()
    torch.manual_seed(0)
    final = export(build_model(build_config("mamba-swelu-tiny", vocab_size=len(tok),
                                            overrides=dict(d_model=32, dense_hidden=32))), tok, tmp_path / "final")
    config = json.loads((final / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    assert "auto_map" in json.loads((final / "config.json").read_text())  # the model's own code, not the tokenizer's
    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tokenizer_only / name).write_bytes((final / name).read_bytes())
    want = tok("def add(a, b):")["input_ids"]
    for kind, folder in (("lmlab", final), ("auto-untrusted", final), ("auto", tokenizer_only)):
        got, output = _fresh(kind, folder)
        assert "Do you wish" not in output and "custom code" not in output, (kind, output[-1500:])
        assert kind != "lmlab" or "instantiate a model" not in output  # lmlab never reads the model's config
        assert got == {"ids": want, "chat": "User: hi\nAssistant:", "lmlab_models": False}, kind


def test_folders_saved_by_older_lmlab_still_load(trained, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained[0], old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"  # what transformers 5 wrote before
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(old))
    assert tok("def f(x): return x")["input_ids"] == load_tokenizer(str(trained[0]))("def f(x): return x")["input_ids"]
    tok.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
