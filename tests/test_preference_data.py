"""Preference pairs: both row forms and oasst sibling replies, bad rows, the split, and tokenization with the
prompt shared and the labels on the reply (and its end-of-turn) only, checked token by token."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmlab.data.chat import IGNORE, ChatFormat
from lmlab.data.instruct import SourceSpec, split_hash
from lmlab.data.preference import PreferencePair, collate_pairs, encode_pair, load_preference, read_pairs, row_to_pair
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
