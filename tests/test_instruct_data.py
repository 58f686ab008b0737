"""Instruction data: every format from its fixture to the one message schema, bad rows with file:line, mixing,
de-duplication, the deterministic split (oasst by tree), the summary, and the stdlib-instruct dataset."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import lmlab.data.stdlib_instruct as sti
from lmlab.data.instruct import load_instruct, read_source
from lmlab.data.mixture import held_out_count, in_val, split_hash, split_held_out
from lmlab.data.normalise import detect_format
from lmlab.data.oasst import oasst_best_path, oasst_trees
from lmlab.data.records import SourceSpec
from lmlab.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


FIX = Path(__file__).parent / "fixtures" / "instruct"


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def test_alpaca_json_list():
    ex = read_source(str(FIX / "alpaca.json"))
    assert [e.messages for e in ex[:2]] == [
        conv(("user", "Name the capital of France."), ("assistant", "Paris.")),
        conv(("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")),
    ]
    assert ex[1].where == f"{FIX / 'alpaca.json'}[1]"


def test_dolly_context_joins_the_prompt():
    ex = read_source(str(FIX / "dolly.jsonl"))
    assert ex[1].messages == conv(("user", "Summarise the text.\n\nThe sky is blue because of Rayleigh scattering."),
                                  ("assistant", "Scattering makes the sky blue."))
    assert ex[0].where.endswith("dolly.jsonl:1")


def test_sharegpt_roles_mapped_and_trailing_question_dropped():
    ex = read_source(str(FIX / "sharegpt.json"))
    assert ex[0].messages == conv(("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."),
                                  ("user", "What is 2+2?"), ("assistant", "4"))
    assert ex[1].messages == conv(("user", "Ping"), ("assistant", "Pong"))


def test_openai_messages_and_prompt_completion():
    ex = read_source(str(FIX / "messages.jsonl"))
    assert ex[1].messages[0] == {"role": "system", "content": "Be kind."} and len(ex[1].messages) == 3
    pc = read_source(str(FIX / "prompt_completion.jsonl"))
    assert pc[0].messages == conv(("user", "The opposite of hot is"), ("assistant", "cold"))


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "dolly.jsonl").read_text().splitlines()]
    path = tmp_path / "dolly.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ex = read_source(str(path))
    assert [e.messages for e in ex] == [e.messages for e in read_source(str(FIX / "dolly.jsonl"))]
    assert ex[0].where == f"{path}:row 1"


def test_oasst_trees_rank0_path_language_filter_and_split_by_tree():
    ex = read_source(str(FIX / "oasst.jsonl"))
    by_tree = {e.group: e.messages for e in ex}
    assert by_tree["t1"] == conv(("user", "What is the capital of France?"), ("assistant", "Paris is the capital."),
                                 ("user", "And of Italy?"), ("assistant", "Rome."))
    assert by_tree["t3"] == conv(("user", "Name a prime number."), ("assistant", "Seven."))
    assert set(by_tree) == {"t1", "t2", "t3"}
    en = read_source(SourceSpec(str(FIX / "oasst.jsonl"), lang="en"))
    assert {e.group for e in en} == {"t1", "t3"}
    # every example of a tree goes to the same split: the split key is the tree id
    data = load_instruct([SourceSpec(str(FIX / "oasst.jsonl"))], val_fraction=0.5, seed=3)
    assert {e.group for e in data.val} == set(sorted(("t1", "t2", "t3"), key=lambda t: split_hash(t, 3))[:2])


def test_oasst_deleted_messages_are_left_out():
    rows = [(str(i), json.loads(line)) for i, line in enumerate((FIX / "oasst.jsonl").read_text().splitlines())]
    tree = oasst_trees(rows)["t1"]
    kids = {r["message_id"] for rs in tree["children"].values() for r in rs}
    assert "a5" not in kids and "a4" in kids
    assert oasst_best_path(tree)[-1]["content"] == "Rome."


def test_detect_format_names_the_fields():
    assert detect_format({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert detect_format({"instruction": "x", "context": "", "response": "y", "category": "c"}) == "dolly"
    with pytest.raises(DataError, match=r"data.jsonl:4: cannot tell .*\(text, meta\)"):
        detect_format({"text": "x", "meta": 1}, "data.jsonl:4")


def test_malformed_rows_are_counted_with_file_and_line():
    path = str(FIX / "malformed.jsonl")
    data = load_instruct([path], val_fraction=0.0)
    assert sorted(e.messages[0]["content"] for e in data.train) == ["Good one.", "Good two."]
    st = data.summary.sources[path]
    assert st.read == 7 and st.kept == 2 and sum(st.dropped.values()) == 5
    assert [w for r, w in st.first_error.items() if r.startswith("not valid JSON")] == [f"{path}:2"]
    assert st.first_error["empty response"] == f"{path}:3"
    assert st.first_error["empty prompt"] == f"{path}:4"
    assert st.first_error["missing field 'output'"] == f"{path}:5"
    assert st.first_error["field 'instruction' is int, expected a string"] == f"{path}:7"
    text = data.summary.format()
    assert "kept 2" in text and f"{path}:3" in text
    with pytest.raises(DataError, match=r"malformed.jsonl:2: not valid JSON"):
        load_instruct([path], on_error="fail")


def test_exact_duplicates_are_dropped_and_said(tmp_path):
    from lmlab.data.examples import summary_lines

    rows = [{"instruction": "Say hi.", "output": "hi"}] * 3 + [{"instruction": "Say no.", "output": "no"}]
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_instruct([str(tmp_path / "dup.jsonl")], val_fraction=0)
    assert len(data.train) == 2
    lines = summary_lines(data.summary)
    assert "          2 exact-duplicate examples dropped (the first of each is kept)" in lines
    assert lines[-1].strip() == "split: none held out (data.val_fraction=0); all 2 train"


def test_held_out_examples_of_a_run_config(tmp_path):
    from lmlab.config import load_config
    from lmlab.data.examples import held_out_examples

    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(12)]
    (tmp_path / "twelve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["train.objective=sft", f"data.source={tmp_path / 'twelve.jsonl'}",
                             "data.val_fraction=0.25", "train.seed=5"])
    want = load_instruct([str(tmp_path / "twelve.jsonl")], val_fraction=0.25, seed=5).val
    assert [e.messages for e in held_out_examples(cfg)] == [e.messages for e in want] and len(want) == 3


def test_the_fail_hint_pastes_as_a_key(tmp_path):
    import re

    from lmlab.config import load_config

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "", "output": "a"}\n')
    with pytest.raises(DataError) as e:
        load_instruct([str(bad)], on_error="fail")
    hint = re.search(r"\(pass (\S+) to", str(e.value)).group(1)
    assert load_config(None, [hint]).finetune.on_error == "skip"  # what the message says works when pasted


def test_zero_valid_examples_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": ""}\n{"instruction": "", "output": "a"}\n')
    with pytest.raises(DataError, match=r"no valid training example .*empty response x1 \(e\.g\. .*bad.jsonl:1\)"):
        load_instruct([str(bad)])
    with pytest.raises(DataError, match="no such file"):
        load_instruct([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="on_error"):
        load_instruct([str(bad)], on_error="ignore")


def test_hf_source_offline_is_one_clear_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:tatsu-lab/alpaca: the Hugging Face hub is unreachable"):
        load_instruct(["hf:tatsu-lab/alpaca"])


def test_mix_dedup_weights_caps_split_and_determinism():
    alpaca, dolly = str(FIX / "alpaca.json"), str(FIX / "dolly.jsonl")
    data = load_instruct([SourceSpec(alpaca, weight=3.0), SourceSpec(dolly, max_examples=1)], val_fraction=0.0)
    s = data.summary
    assert s.sources[alpaca].dropped["duplicate"] == 1 and s.sources[alpaca].kept == 2
    assert s.sources[alpaca].train == 6  # 2 unique examples, each three times
    assert s.sources[dolly].kept == 1 and s.sources[dolly].dropped["over max_examples"] == 1
    assert len(data.train) == 7 and s.train == 7
    # fractional weight: half of the examples, drawn with the seed
    half = load_instruct([SourceSpec(alpaca, weight=0.5)], val_fraction=0.0)
    assert len(half.train) == 1
    # same inputs and seed -> same order and split; the split does not depend on the other sources
    srcs = [alpaca, dolly] + [str(FIX / f) for f in ("messages.jsonl", "sharegpt.json", "prompt_completion.jsonl")]
    a = load_instruct(srcs, val_fraction=0.4, seed=1)
    b = load_instruct(srcs, val_fraction=0.4, seed=1)
    assert [e.messages for e in a.train] == [e.messages for e in b.train] and a.val and a.train
    c = load_instruct(list(reversed(srcs)), val_fraction=0.4, seed=1)
    assert sorted(e.key() for e in c.val) == sorted(e.key() for e in a.val)
    assert a.summary.to_dict()["val"] == len(a.val)


def test_in_val_fraction_is_about_right():
    share = sum(in_val(f"g{i}", 0.1, 0) for i in range(5000)) / 5000
    assert 0.08 < share < 0.12
    assert not any(in_val(f"g{i}", 0.0, 0) for i in range(100))


def test_small_sets_hold_out_the_asked_share(tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(12)]
    (tmp_path / "twelve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fraction, held in ((0.25, 3), (0.1, 1), (0.01, 1), (0.5, 6), (0.0, 0), (0.99, 11)):
        data = load_instruct([str(tmp_path / "twelve.jsonl")], val_fraction=fraction, seed=0)
        assert (len(data.val), len(data.train)) == (held, 12 - held), fraction
        assert f"{held} of 12 held out" in data.summary.split or fraction == 0
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert len(load_instruct([str(tmp_path / "one.jsonl")], val_fraction=0.5).train) == 1  # the only one trains
    # groups stay whole: the held-out groups are the first in hash order until they hold round(f × n) items
    items = [("a", 0), ("a", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5)]
    tr, va = split_held_out(items, lambda x: x[0], 0.34, seed=7)
    order = sorted("abc", key=lambda g: split_hash(g, 7))
    want, n = set(), 0
    for g in order[:-1]:
        if n >= 2:
            break
        want.add(g)
        n += sum(x[0] == g for x in items)
    assert {x[0] for x in va} == want and len(tr) + len(va) == 6 and not want & {x[0] for x in tr}


# ---------------------------------------------------------------------------------------------------------- stdlib


@pytest.fixture
def small_stdlib(monkeypatch):
    """Restrict stdlib-instruct to three stdlib modules, to keep the test fast (colorsys has no docstrings)."""
    root, files = sti.stdlib_files()
    keep = [p for p in files if p.relative_to(root).as_posix() in ("shlex.py", "textwrap.py", "colorsys.py")]
    assert len(keep) == 3
    monkeypatch.setattr(sti, "stdlib_files", lambda: (root, keep))
    return keep


def test_stdlib_instruct_examples(small_stdlib):
    ex = sti.stdlib_instruct_examples()
    names = [e.where for e in ex]
    assert "shlex.quote" in names and "textwrap.dedent" in names and "shlex.shlex.get_token" in names
    quote = ex[names.index("shlex.quote")]
    assert quote.messages[0]["content"] == "Write a Python function `quote(s)` that returns a shell-escaped " \
                                           "version of the string *s*."
    answer = quote.messages[1]["content"]
    assert answer.startswith("def quote(s):") and ast.parse(answer).body[0].name == "quote"
    method = ex[names.index("shlex.shlex.get_token")].messages[1]["content"]
    assert method.startswith("def get_token(self):\n    ")  # dedented out of its class
    assert all(e.group == e.where for e in ex) and len(set(names)) == len(names)
    # cached: the second call reads the JSONL, and gives the same examples
    assert [e.messages for e in sti.stdlib_instruct_examples()] == [e.messages for e in ex]
    data = load_instruct(["stdlib-instruct"], val_fraction=0.2, seed=0)
    k = held_out_count(len(names), 0.2)  # one example per function: exactly round(0.2 × n) held out
    assert {e.where for e in data.val} == set(sorted(names, key=lambda n: split_hash(n, 0))[:k]) and k > 0


def test_instruction_wording():
    assert sti.summary_sentence("Return the sum.\n\nMore text.") == "Return the sum"
    assert sti.summary_sentence("Split the\n   string e.g. here. Then more") == "Split the string e.g. here"
    assert sti.instruction("f", "x", "Fetch the data") == "Write a Python function `f(x)` that fetches the data."
    assert sti.instruction("f", "x", "Copy a file") == "Write a Python function `f(x)` that copies a file."
    assert sti.instruction("f", "", "The helper") == "Write a Python function `f()`: The helper."
    assert sti.instruction("g", "self", "Called on exit", cls="C") == \
        "Write a Python method `g(self)` of a class `C`: Called on exit."
