"""Tiny end-to-end runs on CPU: train, SIGKILL + resume (bitwise), DDP vs one process, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok")
    train_bpe("stdlib", 512, out, max_chars=400_000)
    return out


def _args(tok, out, name, steps=40, dropout=0.1, batch=4, extra=()):
    return [
        "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
        f"model.dropout={dropout}", "data.source=stdlib", "data.max_docs=60", f"data.tokenizer={tok}",
        "data.seq_len=32", f"train.batch_size={batch}", f"train.max_steps={steps}", "train.save_every=4",
        "train.eval_every=8", "train.eval_batches=2", "train.log_every=2", "train.threads=1",
        "train.sample_tokens=4", "train.progress=false", "train.warmup_steps=4", "train.lr=3e-3",
        f"run.out_dir={out}", f"run.name={name}", *extra,
    ]


def _cli(*args, env=ENV, timeout=600):
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tokenizer_dir, tmp_path):
    straight = _cli("pretrain", *_args(tokenizer_dir, tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr

    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "pretrain",
                             *_args(tokenizer_dir, tmp_path, "killed")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("step-*") if (p / "MANIFEST.json").exists()] if ckpts.exists() else []
        if any(int(p.name.split("-")[1]) >= 12 for p in done):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = tmp_path / "killed"
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    assert json.loads((killed / "run.json").read_text())["status"] == "running"  # died without a word

    resumed = _cli("resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    resume_events = [e for e in _events(killed) if e.get("event") == "resume"]
    assert len(resume_events) == 1 and 12 <= resume_events[0]["step"] < 40
    assert "resumed   from step-" in resumed.stdout

    a, b = _weights(tmp_path / "straight"), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the loss curves agree too, step for step, after the resume point
    def curve(run):
        return {e["step"]: e["loss"] for e in _events(run) if e["kind"] == "train"}
    ca, cb = curve(tmp_path / "straight"), curve(killed)
    assert all(ca[s] == cb[s] for s in cb if s > resume_events[0]["step"])


@pytest.mark.slow
def test_ddp_two_processes_match_one(tokenizer_dir, tmp_path):
    one = _cli("pretrain", *_args(tokenizer_dir, tmp_path, "one", steps=12, dropout=0.0, batch=4))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "lmlab.cli", "pretrain", *_args(tokenizer_dir, tmp_path, "two", steps=12, dropout=0.0, batch=2)],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def curve(run, kind, key):
        return [(e["step"], e[key]) for e in _events(run) if e["kind"] == kind]

    l1, l2 = curve(tmp_path / "one", "train", "loss"), curve(tmp_path / "two", "train", "loss")
    assert [s for s, _ in l1] == [s for s, _ in l2] and len(l1) == 6
    for (_, a), (_, b) in zip(l1, l2):
        assert abs(a - b) <= 1e-4 * abs(a), (l1, l2)
    v1, v2 = curve(tmp_path / "one", "eval", "val_loss"), curve(tmp_path / "two", "eval", "val_loss")
    assert len(v1) == len(v2) > 0
    for (_, a), (_, b) in zip(v1, v2):
        assert abs(a - b) <= 1e-4 * abs(a)
    # one writer: a single metrics file with one start event
    assert sum(e.get("event") == "start" for e in _events(tmp_path / "two")) == 1


@pytest.mark.slow
def test_export_loads_with_auto_classes_and_generates(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import lmlab  # noqa: F401  (registers the Auto classes)
    from lmlab.commands.generate import load_for_inference

    res = _cli("pretrain", *_args(tokenizer_dir, tmp_path, "exp", steps=6))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "exp"
    for f in ("config.yaml", "run.json", "metrics.jsonl", "train.log", "samples.jsonl", "final/config.json",
              "final/model.safetensors", "final/tokenizer.json"):
        assert (run / f).exists(), f
    assert list((run / "tb").iterdir())
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["val_ppl"] > 1
    auto = AutoModelForCausalLM.from_pretrained(str(run / "final")).eval()
    ours, tok = load_for_inference(str(run))
    ids = torch.tensor([tok.encode("def main():\n    return")])
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, ours(ids).logits, rtol=0, atol=0)
    gen = _cli("generate", str(run), "-p", "def ", "-n", "8", "--greedy")
    assert gen.returncode == 0 and gen.stdout.startswith("def ")
    # checkpoints: keep_last=3 plus the best one
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert "step-00000006" in kept and len(kept) <= 4
