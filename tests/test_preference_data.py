"""Preference pairs: both row forms and oasst sibling replies, bad rows, the split, and tokenization with the
prompt shared and the labels on the reply (and its end-of-turn) only, checked token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmlab.data.chat import IGNORE, ChatFormat
from lmlab.data.mixture import split_hash
from lmlab.data.preference import PreferencePair, collate_pairs, encode_pair, load_preference, read_pairs, row_to_pair
from lmlab.data.records import SourceSpec
from lmlab.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


FIX = Path(__file__).parent / "fixtures" / "instruct"
EOS = "<|endoftext|>"


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = "User: Assistant: System: What is 2+2? 4 5 five Be brief. Say hi. Hi. Hello there".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", EOS, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]")


def test_pairs_file_string_and_chat_forms_and_bad_rows():
    path = str(FIX / "pairs.jsonl")
    data = load_preference([path], val_fraction=0.0)
    got = [(p.prompt, p.chosen, p.rejected) for p in data.train]
    assert got == [
        ([{"role": "user", "content": "What is 2+2?"}], "4", "5"),
        ([{"role": "user", "content": "Capital of France?"}], "Paris.", "Lyon."),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}], "Hi.",
         "Hello there, how are you doing today?"),
    ]
    st = data.summary.sources[path]
    assert st.first_error == {"chosen and rejected are the same": f"{path}:4", "empty chosen response": f"{path}:5",
                              "not valid JSON (Expecting value at column 1)": f"{path}:6"}
    with pytest.raises(DataError, match=r"pairs.jsonl:4: chosen and rejected are the same"):
        load_preference([path], on_error="fail")


def test_row_forms_that_are_refused():
    with pytest.raises(ValueError, match="exactly one assistant turn"):
        row_to_pair({"prompt": "q", "chosen": [{"role": "user", "content": "q2"}], "rejected": "b"})
    with pytest.raises(ValueError, match="empty prompt"):
        row_to_pair({"prompt": " ", "chosen": "a", "rejected": "b"})


def test_oasst_sibling_pairs_best_vs_worst_rank_split_by_tree():
    pairs = read_pairs(str(FIX / "oasst.jsonl"))
    got = {(p.group, p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs}
    assert got == {("t1", "What is the capital of France?", "Paris is the capital.", "I think it is Lyon."),
                   ("t3", "Name a prime number.", "Seven.", "Nine.")}
    assert read_pairs(SourceSpec(str(FIX / "oasst.jsonl"), lang="fr")) == []
    data = load_preference([str(FIX / "oasst.jsonl")], val_fraction=0.5, seed=4)
    assert {p.group for p in data.val} == {min(("t1", "t3"), key=lambda g: split_hash(g, 4))}  # round(0.5 × 2)


def test_not_preference_data_is_named(tmp_path):
    with pytest.raises(DataError, match=r"alpaca.json\[0\]: not preference data"):
        read_pairs(str(FIX / "alpaca.json"))


def test_encode_pair_token_by_token_and_collate():
    tok = word_tokenizer()
    fmt = ChatFormat(tok, "plain")
    pair = PreferencePair([{"role": "user", "content": "What is 2+2?"}], "4", "five 5")
    enc = encode_pair(pair, fmt)
    conv = tok.convert_ids_to_tokens
    assert conv(enc.prompt_ids) == ["User:", "What", "is", "2+2?", "Assistant:"]
    assert conv(enc.chosen_ids) == ["4", EOS] and enc.chosen_labels == enc.chosen_ids
    assert conv(enc.rejected_ids) == ["five", "5", EOS] and enc.rejected_labels == enc.rejected_ids
    assert enc.prompt_ids == fmt.prompt_ids(pair.prompt)  # the same prompt the model sees at generation
    b = collate_pairs([enc, encode_pair(PreferencePair(pair.prompt, "5", "4"), fmt)], pad_id=tok.eos_token_id)
    assert b["chosen_input_ids"].shape == (2, 7) and b["rejected_input_ids"].shape == (2, 8)
    assert b["chosen_labels"][0].tolist() == [IGNORE] * 5 + enc.chosen_ids
    assert b["rejected_labels"][1].tolist() == [IGNORE] * 5 + [tok.convert_tokens_to_ids("4"),
                                                                                   tok.eos_token_id, IGNORE]
    assert b["rejected_attention_mask"][1].tolist() == [1] * 7 + [0]
    # over-long: replies cut to fit, or the pair dropped
    cut = encode_pair(pair, fmt, max_len=7)
    assert conv(cut.rejected_ids) == ["five", "5"] and conv(cut.chosen_ids) == ["4", EOS]
    assert encode_pair(pair, fmt, max_len=7, overlong="drop") is None
    assert encode_pair(pair, fmt, max_len=5) is None


def test_preference_and_unpaired_sources_mix_as_instruction_sources_do(tmp_path):
    """finetune.weights and finetune.max_examples mean the same for every loader (one mixture code): a weight
    repeats a source's training items, a cap keeps the same seeded sample, in file order, of any kind of row."""
    from lmlab.data.instruct import load_instruct
    from lmlab.data.unpaired import load_unpaired

    n = 7
    files = {"instruct": [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(n)],
             "pairs": [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(n)],
             "unpaired": [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(n)]}
    load = {"instruct": load_instruct, "pairs": load_preference, "unpaired": load_unpaired}
    question = {"instruct": lambda x: x.messages[0]["content"], "pairs": lambda x: x.prompt[0]["content"],
                "unpaired": lambda x: x.prompt[0]["content"]}
    kept = {}
    for kind, rows in files.items():
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        weighted = load[kind]([SourceSpec(str(path), weight=2.5)], val_fraction=0.0, seed=3)
        assert len(weighted.train) == 2 * n + round(0.5 * n), kind
        capped = load[kind]([SourceSpec(str(path), max_examples=4)], val_fraction=0.0, seed=3)
        st = capped.summary.sources[str(path)]
        assert st.kept == 4 and st.dropped["over max_examples"] == n - 4, kind
        assert st.first_error["over max_examples"] == f"{path} (cap 4)", kind
        kept[kind] = sorted(question[kind](x) for x in capped.train)
    assert kept["pairs"] == kept["unpaired"] == kept["instruct"] != [f"q{i}" for i in range(4)]
