"""Supervised fine-tuning: targets, leak-free packed batches, the resumable stream, a tiny SFT that lowers
held-out loss, and bad input refused before anything is written."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from lmlab.config import load_config
from lmlab.data.chat import IGNORE, ChatFormat, pack
from lmlab.errors import ConfigError, DataError
from lmlab.train.sft import SFT, RowStream, packed_logits, to_batch

torch.set_num_threads(1)
MAMBA = ["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok")
    train_bpe("stdlib", 512, out, max_chars=200_000)
    return out


def _overrides(tok, out, name, steps=4, extra=()):
    return [*MAMBA, "train.objective=sft", f"data.tokenizer={tok}", "data.seq_len=64", "data.val_fraction=0.1",
            "train.batch_size=4", f"train.max_steps={steps}", "train.eval_every=1000", "train.eval_batches=2",
            "train.log_every=1", "train.threads=1", "train.progress=false", "train.sample_tokens=2",
            "train.warmup_steps=0", "train.lr=3e-3", f"run.out_dir={out}", f"run.name={name}", *extra]


def test_targets_are_the_assistant_reply_and_its_end_of_turn(tok_dir):
    from lmlab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    fmt = ChatFormat(tok, "plain")
    a = fmt.encode([{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}])
    b = fmt.encode([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "blue"}])
    p = pack([a, b], 64, tok.eos_token_id)
    batch = to_batch(p)
    t = batch["targets"][0]
    # targets[i] is the token at i + 1 when that token is a label; nothing crosses into the second example
    reply_a = [i for i, lab in zip(a.input_ids, a.labels) if lab != IGNORE]
    assert reply_a[-1] == fmt.end_of_turn_id == tok.eos_token_id
    assert t[: len(a) - 1][t[: len(a) - 1] != IGNORE].tolist() == reply_a
    assert t[len(a) - 1] == IGNORE  # the last token of example a predicts nothing of example b
    reply_b = [i for i, lab in zip(b.input_ids, b.labels) if lab != IGNORE]
    assert t[len(a): len(a) + len(b)][t[len(a): len(a) + len(b)] != IGNORE].tolist() == reply_b
    assert int((t != IGNORE).sum()) == len(reply_a) + len(reply_b)
    assert batch["seq_idx"][0, : len(a)].eq(0).all() and batch["seq_idx"][0, len(a): len(a) + len(b)].eq(1).all()
    assert batch["position_ids"][0, len(a)] == 0


@pytest.mark.parametrize("name", ["mamba-swelu-tiny", "llama-tiny"])
def test_packed_logits_equal_each_example_alone(name):
    from lmlab.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config(name, vocab_size=64, overrides=dict(
        d_model=32, n_layers=2, dense_hidden=32) if name.startswith("mamba") else {})).eval()
    from lmlab.data.chat import Encoded

    exs = [Encoded(torch.randint(1, 64, (n,)).tolist(), [IGNORE] * n) for n in (7, 11, 5)]
    p = to_batch(pack(exs, 29, 0))
    with torch.no_grad():
        packed = packed_logits(model, p)
        at = 0
        for e in exs:
            alone = model(torch.tensor([e.input_ids])).logits
            torch.testing.assert_close(packed[0, at: at + len(e)], alone[0], atol=2e-5, rtol=1e-4)
            at += len(e)


def test_stream_is_deterministic_resumable_and_rank_sliced():
    def make(rank=0, world=1):
        return RowStream(23, 3, lambda idx: {"i": torch.as_tensor(idx)}, seed=5, rank=rank, world_size=world)

    a = make()
    first = [a.next()["i"].tolist() for _ in range(5)]
    state = a.state_dict()
    rest = [a.next()["i"].tolist() for _ in range(12)]  # crosses two epoch boundaries
    b = make()
    b.load_state_dict(state)
    assert [b.next()["i"].tolist() for _ in range(12)] == rest
    assert first == [make().next()["i"].tolist()] + first[1:] and len({x for f in first for x in f}) == 15
    r0, r1, whole = make(0, 2), make(1, 2), RowStream(23, 6, lambda idx: {"i": torch.as_tensor(idx)}, seed=5)
    for _ in range(6):  # rank r takes its slice of the same global batch
        assert r0.next()["i"].tolist() + r1.next()["i"].tolist() == whole.next()["i"].tolist()


def test_tiny_sft_on_stdlib_instruct_lowers_held_out_loss(tok_dir, tmp_path):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.eval.perplexity import validation_loss
    from lmlab.models.hf import load_model
    from lmlab.runtime import setup_runtime
    from lmlab.train.loop import train
    from lmlab.train.setup import build_model

    cfg = load_config(None, _overrides(tok_dir, tmp_path, "sft", steps=30, extra=(
        "data.source=stdlib-instruct", "finetune.max_examples=[400]", "train.eval_every=30")))
    run = train(cfg, echo=lambda *a: None)
    rt = setup_runtime("cpu", "fp32", 1)
    tok = load_tokenizer(str(run / "tokenizer"))
    objective = SFT(cfg)
    data = objective.data(cfg, tok, rt)
    before = validation_loss(build_model(cfg, tok), objective, data.val(), rt)["val_loss"]
    final = run / "final"
    after = validation_loss(load_model(str(final)), objective, data.val(), rt)["val_loss"]
    assert after < before - 0.5, (before, after)
    saved = load_config(run / "config.yaml")
    assert saved.finetune.template == "plain"  # "auto" resolved once, for an identical resume
    # the exported model chats in plain transformers: inference template and the end of turn as eos
    exported = load_tokenizer(str(final))
    text = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "User: hi\nAssistant:"
    gen = json.loads((final / "generation_config.json").read_text())
    assert tok.eos_token_id in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "eval" for e in events)


def _finetune_args(**kw):
    from lmlab.commands import finetune

    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    argv = list(kw.pop("overrides", []))
    for k, v in kw.items():
        argv += [f"--{k}", *([v] if isinstance(v, str) else v)]
    return p.parse_args(argv)


def test_bad_input_is_one_clear_error_and_leaves_nothing(tok_dir, tmp_path):
    from lmlab.commands import finetune

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "", "output": ""}\n{"nonsense": 1}\n')
    out = tmp_path / "runs"
    base = _overrides(tok_dir, out, "x")
    for data, err in ((str(tmp_path / "missing.jsonl"), DataError), (str(bad), DataError)):
        with pytest.raises(err) as e:
            finetune.run(_finetune_args(data=[data], overrides=base))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="finetune.method"):
        finetune.run(_finetune_args(data=["stdlib-instruct"], overrides=[*base, "finetune.method=adapters"]))
    with pytest.raises(ConfigError, match="finetune.weights"):
        finetune.run(_finetune_args(data=["stdlib-instruct"], overrides=[*base, "finetune.weights=[1, 2]"]))
    assert not out.exists() or not any(Path(out).iterdir())
