"""Supervised fine-tuning: targets, leak-free packed batches, the resumable stream, a tiny SFT that lowers
held-out loss, and bad input refused before anything is written."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.config import load_config
from lmlab.data.chat import IGNORE, ChatFormat, pack
from lmlab.data.examples import RowStream, to_batch
from lmlab.errors import ConfigError, DataError
from lmlab.train.sft import SFT, packed_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


MAMBA = ["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32"]


def _overrides(tok, out, name, steps=4, extra=()):
    return [*MAMBA, "train.objective=sft", f"data.tokenizer={tok}", "data.seq_len=64", "data.val_fraction=0.1",
            "train.batch_size=4", f"train.max_steps={steps}", "train.eval_every=1000", "train.eval_batches=2",
            "train.log_every=1", "train.threads=1", "train.progress=false", "train.sample_tokens=2",
            "train.warmup_steps=0", "train.lr=3e-3", f"run.out_dir={out}", f"run.name={name}", *extra]


def test_targets_are_the_assistant_reply_and_its_end_of_turn(stdlib_tokenizer_dir):
    from lmlab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(stdlib_tokenizer_dir))
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


def test_token_loss_keeps_float64_and_raises_half_precision():
    from lmlab.train.objectives import token_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 13, dtype=torch.float64) * 30
    targets = torch.randint(0, 13, (3, 5))
    targets[0, 0] = IGNORE
    got = token_loss_sum(logits, targets)
    keep = targets != IGNORE
    want = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].sum()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    for half in (torch.float16, torch.bfloat16):
        assert token_loss_sum(logits.to(half), targets).dtype == torch.float32


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


def test_fewer_rows_than_a_batch_run_on_across_epochs_and_resume_exactly():
    def make(rank=0, world=1, b=8):
        return RowStream(3, b, lambda idx: {"i": torch.as_tensor(idx)}, seed=2, rank=rank, world_size=world)

    a = make()
    assert a.small and "3 training rows for a global batch of 8" in a.note("training rows")[0]
    batches = [a.next()["i"].tolist() for _ in range(3)]
    assert all(len(x) == 8 for x in batches)
    flat = [i for x in batches for i in x]
    for e in range(8):  # the stream is epoch after epoch of (seed, epoch) permutations, cut into batches of 8
        assert sorted(flat[3 * e: 3 * e + 3]) == [0, 1, 2]
    assert flat[:3] == np.random.default_rng([2, 7, 0]).permutation(3).tolist()
    b = make()
    b.next()
    state = b.state_dict()
    c = make()
    c.load_state_dict(state)
    assert [c.next()["i"].tolist() for _ in range(2)] == batches[1:]
    r0, r1, whole = make(0, 2, 4), make(1, 2, 4), make()
    for _ in range(3):  # two ranks of 4 take the halves of the same global batch of 8
        assert r0.next()["i"].tolist() + r1.next()["i"].tolist() == whole.next()["i"].tolist()
    assert not make(b=3).small and make(b=3).note("rows") == []


@pytest.mark.slow
def test_tiny_sft_on_stdlib_instruct_lowers_held_out_loss(stdlib_tokenizer_dir, tmp_path):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.eval.perplexity import validation_loss
    from lmlab.models.hf import load_model
    from lmlab.runtime import setup_runtime
    from lmlab.train.loop import train
    from lmlab.train.setup import build_model

    cfg = load_config(None, _overrides(stdlib_tokenizer_dir, tmp_path, "sft", steps=30, extra=(
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
    assert load_config(run / "config.yaml").finetune.template == "auto"  # config.yaml: what was asked
    assert cfg.finetune.template == "auto"  # the objective never changes the config
    assert json.loads((run / "run.json").read_text())["data"]["template"] == "plain"  # the manifest: what ran
    assert objective.format.name == "plain"  # the run's tokenizer carries lmlab's template: "auto" resolves alike
    # the exported model chats in plain transformers: inference template and the end of turn as eos
    exported = load_tokenizer(str(final))
    text = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "User: hi\nAssistant:"
    gen = json.loads((final / "generation_config.json").read_text())
    assert tok.eos_token_id in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in events if e["kind"] == "eval"][-1]
    # the held-out split rebuilt from the run folder alone gives the trainer's last validation loss
    from lmlab.train.objectives import held_out_batches

    again, batches = held_out_batches(load_config(run / "config.yaml"), load_tokenizer(str(final)), rt)
    assert last["step"] == 30 and again.format.name == "plain"
    assert validation_loss(load_model(str(final)), again, batches, rt)["val_loss"] == pytest.approx(
        last["val_loss"], rel=1e-6)


def _finetune_args(**kw):
    from lmlab.commands import finetune

    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    argv = list(kw.pop("overrides", []))
    for k, v in kw.items():
        argv += [f"--{k}", *([v] if isinstance(v, str) else v)]
    return p.parse_args(argv)


def test_bad_input_is_one_clear_error_and_leaves_nothing(stdlib_tokenizer_dir, tmp_path):
    from lmlab.commands import finetune

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "", "output": ""}\n{"nonsense": 1}\n')
    out = tmp_path / "runs"
    base = _overrides(stdlib_tokenizer_dir, out, "x")
    for data, err in ((str(tmp_path / "missing.jsonl"), DataError), (str(bad), DataError)):
        with pytest.raises(err) as e:
            finetune.run(_finetune_args(data=[data], overrides=base))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="finetune.method"):
        finetune.run(_finetune_args(data=["stdlib-instruct"], overrides=[*base, "finetune.method=adapters"]))
    with pytest.raises(ConfigError, match="finetune.weights"):
        finetune.run(_finetune_args(data=["stdlib-instruct"], overrides=[*base, "finetune.weights=[1, 2]"]))
    assert not out.exists() or not any(Path(out).iterdir())


def test_cli_template_with_new_special_tokens_grows_the_base_and_chats(stdlib_tokenizer_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """`lmlab finetune --template chatml` on an lmlab base whose tokenizer lacks <|im_start|>/<|im_end|>: the
    tokens are added, the embeddings grow (new rows: the mean of the old ones), the run and its export keep both,
    the export chats in that template, and a run tuned from the run folder is named after it."""
    import io

    from lmlab.cli import main
    from lmlab.commands import chat, dpo
    from lmlab.commands.finetune import tuning_config
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models import build_config, build_model
    from lmlab.models.export import export
    from lmlab.models.hf import load_model

    tok = load_tokenizer(str(stdlib_tokenizer_dir))
    torch.manual_seed(0)
    base = build_model(build_config("mamba-swelu-tiny", vocab_size=len(tok), overrides=dict(
        d_model=32, n_layers=2, dense_hidden=32)))
    export(base, tok, tmp_path / "base")
    old = base.get_input_embeddings().weight.detach().clone()
    out = tmp_path / "runs"
    rc = main(["finetune", "--model", str(tmp_path / "base"), "--template", "chatml", "--data", "stdlib-instruct",
               "--steps", "2", "finetune.max_examples=[40]", "data.seq_len=64", "data.val_fraction=0.1",
               "train.batch_size=4", "train.eval_every=1000", "train.eval_batches=1", "train.threads=1",
               "train.progress=false", "train.sample_tokens=2", "train.warmup_steps=0", "train.lr=1e-9",
               f"run.out_dir={out}"])
    said = capsys.readouterr().out
    assert rc == 0, said
    assert "tokenizer +2 special tokens for template chatml (<|im_start|>, <|im_end|>): 512 → 514 tokens" in said
    (run,) = out.iterdir()
    assert run.name.startswith("base-sft-")
    for folder in (run / "tokenizer", run / "final"):
        assert len(load_tokenizer(str(folder))) == len(tok) + 2
    tuned = load_model(str(run / "final"))
    emb = tuned.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tok) + 2
    torch.testing.assert_close(emb[: len(tok)], old, rtol=0, atol=1e-6)  # lr 1e-9: the rows barely move
    torch.testing.assert_close(emb[len(tok):], old.mean(0).expand(2, -1), rtol=0, atol=1e-6)
    assert json.loads((run / "run.json").read_text())["data"]["template"] == "chatml"
    # the export chats in its template: `lmlab chat` reads it from the tokenizer, one line per answer
    exported = load_tokenizer(str(run / "final"))
    assert exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n" \
                                                                      "<|im_start|>assistant\n"
    assert chat.ChatSession(tuned, exported).fmt.name == "chatml"
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(run / "final"), "--max-new-tokens", "3", "--jsonl"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["user"] == "hi"
    # a run tuned from this run folder (or its final/) is named after the run, not "final"
    p = argparse.ArgumentParser()
    dpo.add_arguments(p)
    for spec in (run, run / "final"):
        cfg = tuning_config(p.parse_args(["--model", str(spec), "--data", "x.jsonl"]), "dpo")
        assert cfg.run.name.startswith(f"{run.name}-dpo-"), cfg.run.name
