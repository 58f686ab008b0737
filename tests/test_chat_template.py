"""Chat templates token by token: targets = reply + end-of-turn only, no double BOS, inference template and
generation prompt agree with training, tokenizer templates, and packing that never leaks across examples."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lmlab.data.chat import (
    IGNORE,
    ChatFormat,
    Encoded,
    add_template_tokens,
    block_causal_mask,
    encode_examples,
    pack,
    pad_batch,
)
from lmlab.data.instruct import DataSummary
from lmlab.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


EOS = "<|endoftext|>"
WORDS = ("User: Assistant: System: Name the capital of France. Paris. And Italy? Rome. Be brief. hi ok "
         "user assistant system").split()
CONV = [{"role": "user", "content": "Name the capital of France."}, {"role": "assistant", "content": "Paris."}]
CONV2 = CONV + [{"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]


def word_tokenizer(bos: str | None = None) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word, so expected token lists are readable; with `bos`, the
    tokenizer prepends it when encoding (like Llama's)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", EOS, *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {}
    if bos:
        tok.add_special_tokens([bos])
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
        kw["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]", **kw)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE, like lmlab's stdlib-bpe (eos doubles as bos, nothing added when encoding)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["User: Name the capital of France.\nAssistant: Paris."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def tokens(tok, enc: Encoded) -> list[tuple[str, bool]]:
    return [(tok.convert_ids_to_tokens(i), label != IGNORE) for i, label in zip(enc.input_ids, enc.labels)]


def test_plain_template_token_by_token():
    tok = word_tokenizer()
    fmt = ChatFormat(tok)  # no chat_template -> plain
    assert fmt.name == "plain"
    enc = fmt.encode(CONV2)
    assert tokens(tok, enc) == [
        ("User:", False), ("Name", False), ("the", False), ("capital", False), ("of", False), ("France.", False),
        ("Assistant:", False), ("Paris.", True), (EOS, True),
        ("User:", False), ("And", False), ("Italy?", False),
        ("Assistant:", False), ("Rome.", True), (EOS, True),
    ]
    assert all(label in (IGNORE, i) for i, label in zip(enc.input_ids, enc.labels))
    assert fmt.end_of_turn_id == tok.eos_token_id


def test_train_on_all_and_system_prompt():
    tok = word_tokenizer()
    enc = ChatFormat(tok, "plain", system="Be brief.", train_on="all").encode(CONV)
    assert [t for t, _ in tokens(tok, enc)][:3] == ["System:", "Be", "brief."]
    assert enc.labels == enc.input_ids
    with pytest.raises(ConfigError, match="train_on"):
        ChatFormat(tok, train_on="prompt")


def test_chatml_needs_its_tokens_then_masks_token_by_token():
    tok = word_tokenizer()
    with pytest.raises(DataError, match="add_template_tokens"):
        ChatFormat(tok, "chatml")
    assert add_template_tokens(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert add_template_tokens(tok, "chatml") == []
    fmt = ChatFormat(tok, "chatml")
    got = tokens(tok, fmt.encode(CONV))
    assert got == [
        ("<|im_start|>", False), ("user", False), ("Name", False), ("the", False), ("capital", False),
        ("of", False), ("France.", False), ("<|im_end|>", False),
        ("<|im_start|>", False), ("assistant", False), ("Paris.", True), ("<|im_end|>", True),
    ]
    assert fmt.end_of_turn_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_no_double_bos():
    tok = word_tokenizer(bos="<s>")
    assert tok.encode("hi")[0] == tok.bos_token_id  # this tokenizer adds a BOS itself
    enc = ChatFormat(tok, "plain").encode(CONV)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids.count(tok.bos_token_id) == 1
    assert enc.labels[0] == IGNORE
    # llama3 brings its own BOS text; with a tokenizer whose BOS is that token there is still exactly one
    tok3 = word_tokenizer(bos="<|begin_of_text|>")
    add_template_tokens(tok3, "llama3")
    enc3 = ChatFormat(tok3, "llama3").encode(CONV)
    assert enc3.input_ids.count(tok3.bos_token_id) == 1 and enc3.input_ids[0] == tok3.bos_token_id
    assert [t for t, target in tokens(tok3, enc3) if target] == ["Paris.", "<|eot_id|>"]


@pytest.mark.parametrize("name", ["plain", "chatml", "llama3"])
def test_inference_template_and_prompt_match_training(name):
    tok = bpe_tokenizer()
    add_template_tokens(tok, name)
    fmt = ChatFormat(tok, name, system="Be brief.")
    text, spans = fmt.render(CONV2)
    jinja = fmt.inference_template()
    assert "{% generation" not in jinja and "{%- generation" not in jinja  # no training-only markers
    assert tok.apply_chat_template(CONV2, chat_template=jinja, tokenize=False) == text
    prompt = fmt.prompt_text(CONV2[:3])
    assert tok.apply_chat_template(CONV2[:3], chat_template=jinja, tokenize=False, add_generation_prompt=True) == prompt
    assert text.startswith(prompt)
    # the generation prompt's tokens are exactly the training tokens before the last reply's targets
    enc = fmt.encode(CONV2)
    ids = fmt.prompt_ids(CONV2[:3])
    assert enc.input_ids[: len(ids)] == ids and enc.labels[len(ids)] != IGNORE
    assert all(label == IGNORE for label in enc.labels[len(ids) - 3: len(ids)])
    # targets decode to exactly the replies and their end-of-turn (byte-level BPE: lossless)
    last = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    end = tok.convert_ids_to_tokens(fmt.end_of_turn_id)
    assert tok.decode(last) == fmt.template.prefix + "Paris." + end + fmt.template.prefix + "Rome." + end
    assert [text[a:b] for a, b in spans] == [fmt.template.prefix + r + end for r in ("Paris.", "Rome.")]


ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def test_tokenizer_own_template_masks_by_prefix_rendering():
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = ZEPHYR
    fmt = ChatFormat(tok)  # auto -> the tokenizer's template
    assert fmt.name == "tokenizer" and fmt.inference_template() == ZEPHYR
    assert [t for t, target in tokens(tok, fmt.encode(CONV2)) if target] == ["Paris.", EOS, "Rome.", EOS]
    assert tokens(tok, fmt.encode(CONV))[:2] == [("<|user|>", False), ("Name", False)]
    assert fmt.end_of_turn_id == tok.eos_token_id
    assert fmt.prompt_text(CONV[:1]).endswith("<|assistant|>\n")


def test_tokenizer_template_that_rewrites_history_is_refused():
    tok = word_tokenizer()
    # renders only the last message: earlier assistant turns vanish once more turns follow
    tok.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %} Assistant:{% endif %}"
    with pytest.raises(DataError, match="choose template"):
        ChatFormat(tok, "tokenizer").encode(CONV2)


def test_overlong_truncate_or_drop_and_summary():
    tok = word_tokenizer()
    fmt = ChatFormat(tok)
    full = fmt.encode(CONV2)
    cut = fmt.encode(CONV2, max_len=9)
    assert cut.input_ids == full.input_ids[:9] and cut.labels == full.labels[:9] and cut.n_targets == 2
    assert fmt.encode(CONV2, max_len=9, overlong="drop") is None
    assert fmt.encode(CONV2, max_len=6) is None  # truncation would leave no target
    summary = DataSummary()
    out = encode_examples([CONV, CONV2], fmt, max_len=10, overlong="drop", summary=summary)
    assert [len(e) for e in out] == [9] and summary.tokenized_dropped["over-long"] == 1
    assert summary.token_lengths["max"] == 15 and summary.token_lengths["p50"] == 12
    with pytest.raises(DataError, match="no example left"):
        encode_examples([CONV2], fmt, max_len=5, overlong="drop")


def test_pack_keeps_examples_apart_exactly():
    a = Encoded([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5])
    b = Encoded([6, 7, 8, 9], [6, 7, 8, 9])  # train_on="all": its first label must still be masked when packed
    c = Encoded([10, 11, 12, 13, 14, 15], [-100, -100, -100, 13, 14, 15])
    long = Encoded(list(range(20, 33)), list(range(20, 33)))
    p = pack([a, b, c, long], seq_len=10, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0],
                                    [10, 11, 12, 13, 14, 15, 0, 0, 0, 0],
                                    list(range(20, 30))]
    assert p.labels.tolist() == [[-100, -100, 3, 4, 5, -100, 7, 8, 9, -100],
                                 [-100, -100, -100, 13, 14, 15, -100, -100, -100, -100],
                                 [-100, *range(21, 30)]]
    assert p.seq_idx.tolist() == [[0] * 5 + [1] * 4 + [2], [0] * 6 + [1] * 4, [0] * 10]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
                                       list(range(10))]
    dropped = pack([a, b, c, long], seq_len=10, pad_id=0, overlong="drop")
    assert len(dropped) == 2 and 20 not in dropped.input_ids
    # HF shift: the target of the last token of `a` (position 4) is labels[5], masked: no loss across examples
    shifted = p.labels[0, 1:]
    assert shifted[4] == IGNORE


def test_block_causal_mask_and_pad_batch():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]])
    m = block_causal_mask(seq_idx)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    batch = pad_batch([Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4], [4])], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch.labels.tolist() == [[-100, 2, 3], [-100, -100, -100]]


def _packed_vs_alone(forward, lengths=(5, 7, 3), seq_len=16) -> float:
    g = torch.Generator().manual_seed(0)
    exs = [Encoded(torch.randint(1, 64, (n,), generator=g).tolist(), [IGNORE] * n) for n in lengths]
    p = pack(exs, seq_len=seq_len, pad_id=0)
    assert len(p) == 1
    with torch.no_grad():
        packed = forward(p.input_ids, p)
        worst, at = 0.0, 0
        for e in exs:
            ids = torch.tensor([e.input_ids])
            alone = forward(ids, pack([e], len(e), pad_id=0))
            worst = max(worst, (packed[0, at: at + len(e)] - alone[0]).abs().max().item())
            at += len(e)
    return worst


def test_packed_example_logits_equal_its_logits_alone():
    """MambaSWELU resets its state at `seq_idx` boundaries: a packed example's logits are its logits alone."""
    from lmlab.models.registry import build_config, build_model

    torch.manual_seed(0)
    mamba = build_model(build_config("mamba-swelu-tiny", vocab_size=64, overrides={"d_model": 32})).eval()
    assert _packed_vs_alone(lambda x, p: mamba(x, seq_idx=p.seq_idx).logits) < 1e-5
    # the check can fail: without seq_idx the later examples see the state left by the earlier ones
    assert _packed_vs_alone(lambda x, p: mamba(x).logits) > 1e-4
