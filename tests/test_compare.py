"""lmlab compare: prompts files, greedy answers equal to each model's own reply, reference loss by hand, output."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from lmlab.commands import compare as cmp
from lmlab.data.chat import ChatFormat
from lmlab.errors import DataError
from lmlab.generate import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base folder (plain format) and a 'tuned' folder whose tokenizer carries a chat template."""
    from lmlab.data.tokenizer import load_tokenizer, train_bpe
    from lmlab.models import build_config, build_model
    from lmlab.models.export import export

    d = tmp_path_factory.mktemp("compare-models")
    train_bpe("stdlib", 400, d / "tok", max_chars=100_000)
    out = {}
    for name, seed in (("base", 0), ("tuned", 1)):
        tok = load_tokenizer(str(d / "tok"))
        if name == "tuned":
            tok.chat_template = ChatFormat(tok, "plain", system="Answer briefly.").inference_template()
        cfg = build_config("mamba-swelu-tiny", vocab_size=len(tok),
                           overrides=dict(d_model=32, n_layers=1, dense_hidden=32, max_seq_len=128))
        torch.manual_seed(seed)
        out[name] = str(export(build_model(cfg).eval(), tok, d / name))
    return out


def _run(argv, capsys):
    p = argparse.ArgumentParser()
    cmp.add_arguments(p)
    assert cmp.run(p.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_default_prompts_cover_the_usual_checks():
    text = " ".join(cmp.DEFAULT_PROMPTS).lower()
    for needle in ("capital of france", "2+2", "hello", "haiku", "what is machine learning?", "python"):
        assert needle in text
    assert [p["reference"] for p in cmp.read_prompts(None)] == [None] * len(cmp.DEFAULT_PROMPTS)


def test_prompts_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\nWhat is 2+2?\n\nName a colour.\n")
    assert [p["prompt"] for p in cmp.read_prompts(str(txt))] == ["What is 2+2?", "Name a colour."]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "What is 2+2?", "reference": "4"}\n{"prompt": "Hi"}\n')
    assert cmp.read_prompts(str(jl)) == [{"prompt": "What is 2+2?", "reference": "4"},
                                         {"prompt": "Hi", "reference": None}]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "Hi", "reference": "Hello!"}, "Bye"]))
    assert [p["prompt"] for p in cmp.read_prompts(str(js))] == ["Hi", "Bye"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="item 2"):
        cmp.read_prompts(str(bad))
    with pytest.raises(DataError, match="not found"):
        cmp.read_prompts(str(tmp_path / "missing.txt"))


def test_reference_loss_by_hand(models):
    from lmlab.inference import load_for_inference

    model, tok = load_for_inference(models["base"], "cpu")
    fmt = ChatFormat(tok)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = fmt.prompt_ids(msgs)
    full = fmt.encode([*msgs, {"role": "assistant", "content": "Paris."}])
    assert full.input_ids[: len(prompt)] == prompt
    target = full.input_ids[len(prompt):]  # " Paris." and the end of turn
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full.input_ids])).logits[0].double(), -1)
    by_hand = -sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(target)) / len(target)
    assert cmp.reference_loss(model, fmt, msgs, "Paris.") == pytest.approx(by_hand, rel=1e-4)


def test_answers_are_each_models_greedy_reply_and_reproducible(models):
    from lmlab.commands.chat import ChatSession
    from lmlab.inference import load_for_inference

    prompts = [{"prompt": "What is 2+2?", "reference": "4"}, {"prompt": "Hello!", "reference": None}]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    rows = cmp.compare(models["base"], models["tuned"], prompts, sampling, device="cpu")
    again = cmp.compare(models["base"], models["tuned"], prompts, sampling, device="cpu")
    assert rows == again
    for side in ("base", "tuned"):
        model, tok = load_for_inference(models[side], "cpu")
        for r, p in zip(rows, prompts):
            assert r[side] == ChatSession(model, tok, sampling=sampling).ask(p["prompt"])
    assert rows[0]["base_loss"] > 0 and rows[0]["tuned_loss"] > 0 and rows[1]["base_loss"] is None
    same = cmp.compare(models["base"], models["base"], prompts[:1], sampling, device="cpu")[0]
    assert same["base"] == same["tuned"] and same["base_loss"] == same["tuned_loss"]


def test_command_output_plain_and_json(models, tmp_path, capsys):
    out = _run([models["base"], models["tuned"], "-n", "4"], capsys)  # not a terminal: plain text
    for prompt in cmp.DEFAULT_PROMPTS:
        assert f"### {prompt}" in out
    assert out.count("\nbase  : ") + out.startswith("base  : ") == len(cmp.DEFAULT_PROMPTS)
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "What is 2+2?", "reference": "4"}\n')
    out = _run([models["base"], models["tuned"], "-n", "4", "--prompts", str(pf), "--labels", "before", "after"],
               capsys)
    assert "before" in out and "after" in out and "loss per reference token" in out and "reference loss (mean" in out
    rows = json.loads(_run([models["base"], models["tuned"], "-n", "4", "--prompts", str(pf), "--json"], capsys))
    assert rows[0]["prompt"] == "What is 2+2?" and rows[0]["reference"] == "4" and rows[0]["tuned_loss"] > 0


def test_table_renders(models, capsys):
    from rich.console import Console

    rows = [{"prompt": "What is 2+2?", "reference": "4", "base": "The number", "tuned": "4",
             "base_loss": 5.0, "tuned_loss": 1.0}]
    console = Console(width=100, record=True)
    cmp.render_table(rows, ("base", "tuned"), console)
    text = console.export_text()
    assert "What is 2+2?" in text and "5.00 → 1.00" in text and "tuned lower on 1/1" in text
