"""Exported models as a transformers user meets them: `generate(**tokenizer(texts, padding=True))` with left
padding and `pipeline("text-generation")`, with and without a chat template, in a Python that never imported
lmlab itself (the folder's `auto_map` loads lmlab's classes for the two lmlab architectures; the llama baseline
needs no lmlab at all). The folders come from the real export path (lmlab.models.export.export).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmlab.data.chat import ChatFormat
from lmlab.data.tokenizer import train_bpe
from lmlab.models import build_config, build_model
from lmlab.models.export import export

FAMILIES = ("mamba-swelu-tiny", "inl-tiny", "llama-tiny")

# Run in a fresh interpreter started with -I (no PYTHONPATH, no current folder, no user site): only
# site-packages, where lmlab is installed in editable mode, so it could be imported but nothing here does.
CHILD = textwrap.dedent(r'''
    import json, sys
    assert "lmlab" not in sys.modules
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    assert "lmlab" not in sys.modules
    plain, chat, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    report = {}
    model = AutoModelForCausalLM.from_pretrained(plain, trust_remote_code=remote)
    tok = AutoTokenizer.from_pretrained(plain, trust_remote_code=remote)
    report["lmlab_imported_by_loading"] = "lmlab" in sys.modules
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = ["def parse(", "import os\nclass Reader:\n    def", "x"]
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    batch = tok(texts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    together = model.generate(**batch, **gen)[:, width:].tolist()
    alone = [model.generate(**tok([t], return_tensors="pt"), **gen)[0, -10:].tolist() for t in texts]
    report["left_padded_equals_alone"] = together == alone
    with torch.no_grad():  # the last prompt position's logits: padded and masked, alone, padded and unmasked
        last = lambda **kw: model(**kw).logits[:, -1]
        masked = last(**batch)
        single = torch.cat([last(**tok([t], return_tensors="pt")) for t in texts])
        unmasked = last(input_ids=batch["input_ids"])
    report["masked_logits_equal_alone"] = float((masked - single).abs().max()) < 1e-4
    report["unmasked_logits_differ"] = float((unmasked - single).abs().max()) > 1e-3
    report["forward_kwargs"] = bool(model(**batch, use_cache=False, return_dict=True, output_hidden_states=True,
                                          output_attentions=False, position_ids=None).hidden_states)
    pipe = pipeline("text-generation", model=plain, trust_remote_code=remote)
    out = pipe("def parse(", max_new_tokens=5, do_sample=False)
    report["pipeline_text"] = out[0]["generated_text"].startswith("def parse(")
    pipe.tokenizer.padding_side = "left"
    if pipe.tokenizer.pad_token is None:
        pipe.tokenizer.pad_token = pipe.tokenizer.eos_token
    few = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    batched = pipe(texts, batch_size=3, **few)
    single = [pipe(t, **few) for t in texts]
    report["pipeline_batch_equals_single"] = batched == single
    chat_pipe = pipeline("text-generation", model=chat, trust_remote_code=remote)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    reply = chat_pipe(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    report["pipeline_chat"] = reply[:-1] == messages and reply[-1]["role"] == "assistant"
    print("REPORT " + json.dumps(report))
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_api")
    tok = train_bpe("stdlib", 512, root / "tok", max_chars=200_000)
    folders = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = build_model(build_config(name, vocab_size=len(tok)))
        with torch.no_grad():  # INL's controller heads start at zero: context would not reach a token yet
            for pname, p in model.named_parameters():
                if ".inl.to_" in pname and pname.endswith("weight"):
                    p.normal_(0.0, 0.2)
        plain = export(model, tok, root / name)
        chat_tok = train_bpe("stdlib", 512, root / f"tok-{name}", max_chars=200_000)
        chat_tok.chat_template = ChatFormat(chat_tok, "plain").inference_template()
        chat = export(model, chat_tok, root / f"{name}-chat")
        folders[name] = (plain, chat)
    return folders


def _child(plain, chat, remote: bool) -> dict:
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(plain), str(chat), "1" if remote else "0"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_model_generates_and_pipelines_in_a_python_without_lmlab(exported, name):
    plain, chat = exported[name]
    remote = name != "llama-tiny"
    assert ("auto_map" in json.loads((plain / "config.json").read_text())) == remote
    report = _child(plain, chat, remote)
    assert report == {"lmlab_imported_by_loading": remote, "left_padded_equals_alone": True,
                      "masked_logits_equal_alone": True, "unmasked_logits_differ": True, "forward_kwargs": True,
                      "pipeline_text": True, "pipeline_batch_equals_single": True, "pipeline_chat": True}


# ------------------------------------------------------------------------------------------- in process, fast
from lmlab.models.common import lm_loss  # noqa: E402
from lmlab.models.inl import INLCache  # noqa: E402
from lmlab.models.mamba import MambaCache  # noqa: E402

SMALL = {
    "mamba": ("mamba-swelu-tiny", dict(d_model=32, dense_hidden=32, scan_backend="ref")),
    "mamba-cpu-scan": ("mamba-swelu-tiny", dict(d_model=32, dense_hidden=32, scan_backend="auto")),
    "simplified": ("mamba-swelu-tiny", dict(d_model=32, dense_hidden=32, mixer="simplified")),
    "inl-attention": ("inl-tiny", dict(d_model=32, n_heads=4, ff_dim=32)),
    "inl-projection": ("inl-tiny", dict(d_model=32, ff_dim=32, context="projection")),
    "inl-v1": ("inl-tiny-v1", dict(d_model=32, n_heads=4, ff_dim=32, dropout=0.0)),
}


def _small(kind: str):
    name, overrides = SMALL[kind]
    torch.manual_seed(0)
    # weights ten times larger than the default init, so that logits and their differences are of order 1
    model = build_model(build_config(name, vocab_size=97, overrides=dict(overrides, initializer_range=0.2))).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".inl.to_" in pname and pname.endswith("weight"):
                p.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = 0
    return model


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([(torch.arange(width) >= width - len(p)).long() for p in prompts])
    return ids, mask


def _prompts():
    torch.manual_seed(1)
    return [torch.randint(1, 97, (n,)) for n in (9, 3, 6)]


@pytest.mark.parametrize("kind", list(SMALL))
def test_left_padding_gives_each_prompt_its_own_logits(kind):
    model = _small(kind)
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    width = ids.shape[1]
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
        alone = [model(p[None]).logits[0] for p in prompts]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(padded[i, width - len(p):], alone[i], atol=1e-5, rtol=0)
    assert float((unmasked[1, -1] - alone[1][-1]).abs().max()) > 0.1  # the padding is there to be masked


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SMALL))
def test_left_padding_gives_each_prompt_its_own_tokens(kind):
    model = _small(kind)
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    width = ids.shape[1]
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    batch = model.generate(input_ids=ids, attention_mask=mask, **gen)
    recompute = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **gen)
    for i, p in enumerate(prompts):
        own = model.generate(p[None], **gen)[0, len(p):]
        assert torch.equal(batch[i, width:], own) and torch.equal(recompute[i, width:], own)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba", "simplified", "inl-attention", "inl-projection", "inl-v1"])
def test_per_sequence_caches_stack_decode_together_and_split(kind):
    model = _small(kind)
    torch.manual_seed(2)
    prompts = [torch.randint(1, 97, (n,)) for n in (5, 2, 8)]
    steps = 6

    def decode(cache, first):  # greedy decoding of `steps` tokens from each row's next token `first` (b,)
        toks = [first]
        for _ in range(steps):
            toks.append(model(toks[-1][:, None], cache=cache).logits[:, -1].argmax(-1))
        return torch.stack(toks, 1)

    with torch.no_grad():
        caches, firsts, own = [], [], []
        for p in prompts:
            cache = model.new_cache()
            first = model(p[None], cache=cache).logits[:, -1].argmax(-1)
            caches.append(cache)
            firsts.append(first)
            copy = model.new_cache()
            model(p[None], cache=copy)
            own.append(decode(copy, first)[0])
        batch = type(caches[0]).stack(caches)
        together = decode(batch, torch.cat(firsts))
        for i in range(len(prompts)):
            assert torch.equal(together[i], own[i])
        # split the batch back and go on with one sequence alone: the same as never having been batched
        row = batch.split()[2]
        more = model(together[2, -1:][None], cache=row).logits[0, -1]
        solo = model.new_cache()
        ref = model(torch.cat([prompts[2], together[2]])[None], cache=solo).logits[0, -1]
        torch.testing.assert_close(more, ref, atol=1e-5, rtol=0)


def test_stack_refuses_caches_that_have_read_nothing():
    with pytest.raises(ValueError, match="prompt"):
        MambaCache.stack([MambaCache()])
    with pytest.raises(ValueError, match="prompt"):
        INLCache.stack([INLCache()])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba", "inl-attention"])
def test_forward_takes_the_standard_arguments(kind):
    model = _small(kind)
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_hidden_states=True, output_attentions=False,
                    return_dict=True, cache_position=torch.arange(7), use_cache=False)
        assert len(out.hidden_states) == model.config.n_layers + 1 and out.cache is None
        loss, logits = model(ids, labels=ids, return_dict=False)
        torch.testing.assert_close(logits, out.logits) and torch.testing.assert_close(loss, out.loss)
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, out.logits)
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, out.logits[:, -1:])
        cached = model(ids[:, :4], use_cache=True)
        assert cached.cache is not None and cached.cache.seen == 4
        torch.testing.assert_close(model(ids[:, 4:], cache=cached.cache).logits, out.logits[:, 4:], atol=1e-5, rtol=0)
        position_ids = torch.arange(7)[None].expand(2, 7)
        torch.testing.assert_close(model(ids, position_ids=position_ids).logits, out.logits)
        # a prompt given as embeddings generates as the same prompt given as ids
        by_ids = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, 7:]
        by_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(by_embeds[:, -4:], by_ids)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 3))


def test_lm_loss_keeps_float64_and_raises_half_precision():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 2] = -100
    exact = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                              ignore_index=-100)
    got = lm_loss(logits, labels)
    assert got.dtype == torch.float64 and float((got - exact).abs()) < 1e-15
    half = lm_loss(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32
