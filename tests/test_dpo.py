"""DPO: the loss and rewards against the formula on hand-made numbers, sequence log-probabilities, and tiny
LoRA and full runs (the first step starts at log 2, rewards are logged on held-out pairs)."""

import json
import math

import pytest
import torch

from lmlab.config import load_config
from lmlab.train.dpo import dpo_terms, sequence_logps

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


def test_loss_and_rewards_match_the_formula():
    pw, pl = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rw, rl = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    beta = 0.5
    loss, m = dpo_terms(pw, pl, rw, rl, beta)
    # pair 1: r_w = 0.5·(−3+3.5) = 0.25, r_l = 0.5·(−4+3) = −0.5; pair 2: r_w = −0.5, r_l = 0.25
    expect = -math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.75)))
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-0.25)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25)
    assert m["rewards/margins"].item() == pytest.approx(0.0)
    assert m["rewards/accuracies"].item() == 1.0


def test_sequence_logps_sum_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 6, -100]])
    lp = torch.log_softmax(logits, -1)
    assert sequence_logps(logits, labels).item() == pytest.approx((lp[0, 1, 3] + lp[0, 2, 6]).item(), rel=1e-6)


def test_sequence_logps_keep_float64_and_raise_half_precision():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64) * 30
    labels = torch.tensor([[-100, 4, 7, 1, 0, -100], [-100, -100, 10, 3, 3, 2]])
    lp = torch.log_softmax(logits, -1)  # the float64 reference, by hand
    want = torch.stack([sum(lp[b, i - 1, labels[b, i]] for i in range(1, 6) if labels[b, i] != -100)
                        for b in range(2)])
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-12)
    half = sequence_logps(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stdlib_tokenizer_dir):
    import shutil

    root = tmp_path_factory.mktemp("dpo")
    shutil.copytree(stdlib_tokenizer_dir, root / "tok")  # a copy of the session's tokenizer, beside the data
    rows = [{"prompt": f"Is {a} less than {b}?", "chosen": "yes" if a < b else "no", "rejected": "no" if a < b
             else "yes, certainly"} for a in range(8) for b in range(8) if a != b]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("method", ["lora", "full"])
def test_tiny_dpo_run_logs_rewards_on_held_out_pairs(setup, method):
    from lmlab.train.loop import train

    cfg = load_config(None, [
        "model.name=llama-tiny", "train.objective=dpo", f"finetune.method={method}", "finetune.lora_dropout=0",
        f"data.source={setup / 'pairs.jsonl'}", f"data.tokenizer={setup / 'tok'}", "data.seq_len=32",
        "data.val_fraction=0.2", "train.batch_size=4", "train.max_steps=6", "train.eval_every=6",
        "train.eval_batches=2", "train.log_every=1", "train.threads=1", "train.progress=false",
        "train.sample_tokens=2", "train.warmup_steps=0", f"train.lr={1e-2 if method == 'lora' else 1e-3}",
        "finetune.dpo_beta=0.5", f"run.out_dir={setup / 'runs'}", f"run.name={method}"])
    run = train(cfg, echo=lambda *a: None)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "train"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert steps[-1]["loss"] < math.log(2)
    ev = [e for e in events if e["kind"] == "eval"][-1]
    for k in ("val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins", "val_rewards/accuracies"):
        assert k in ev
    assert 0 <= ev["val_rewards/accuracies"] <= 1
