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


MAMBA = ("model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32")


def _args(tok, out, name, steps=40, dropout=0.1, batch=4, extra=(), model=MAMBA):
    return [
        *model, *([f"model.dropout={dropout}"] if dropout is not None else []), "data.source=stdlib",
        "data.max_docs=60", f"data.tokenizer={tok}",
        "data.seq_len=32", f"train.batch_size={batch}", f"train.max_steps={steps}", "train.save_every=4",
        "train.eval_every=8", "train.eval_batches=2", "train.log_every=2", "train.threads=2",
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


def _kill_after_checkpoint(args: list[str], run: Path, min_step: int, sig=signal.SIGKILL) -> None:
    """Start a pretraining run and send `sig` as soon as a complete checkpoint at `min_step` or later exists.
    SIGKILL: it dies without a word; SIGTERM: it saves at the end of the step and stops cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "pretrain", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("step-*") if (p / "MANIFEST.json").exists()] if ckpts.exists() else []
        if any(int(p.name.split("-")[1]) >= min_step for p in done):
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    os.kill(proc.pid, sig)
    out, err = proc.communicate()
    assert not (run / "final").exists(), "the run finished before it could be stopped"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert json.loads((run / "run.json").read_text())["status"] == "running"  # died without a word
    else:
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"stopped at step" in out


def _assert_resume_is_exact(straight: Path, killed: Path, total: int) -> None:
    resumed = _cli("resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    resume_events = [e for e in _events(killed) if e.get("event") == "resume"]
    assert len(resume_events) == 1 and 0 < resume_events[0]["step"] < total
    assert "resumed   from step-" in resumed.stdout

    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the loss curves agree too, step for step, after the resume point
    def curve(run):
        return {e["step"]: e["loss"] for e in _events(run) if e["kind"] == "train"}
    ca, cb = curve(straight), curve(killed)
    # a SIGTERM checkpoint can fall between two log steps: the first window after it is shorter, so the curves
    # are compared from the second log step on
    after = [s for s in cb if s > resume_events[0]["step"] + 2]
    assert after and all(ca[s] == cb[s] for s in after)


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(stdlib_tokenizer_dir, tmp_path):
    straight = _cli("pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr
    _kill_after_checkpoint(_args(stdlib_tokenizer_dir, tmp_path, "killed"), tmp_path / "killed", 12)
    _assert_resume_is_exact(tmp_path / "straight", tmp_path / "killed", 40)
    # SIGTERM: a checkpoint at the end of the current step, status "stopped", exit 0, then the same exact resume
    _kill_after_checkpoint(_args(stdlib_tokenizer_dir, tmp_path, "termed"), tmp_path / "termed", 8, sig=signal.SIGTERM)
    assert json.loads((tmp_path / "termed" / "run.json").read_text())["status"] == "stopped"
    _assert_resume_is_exact(tmp_path / "straight", tmp_path / "termed", 40)
    # the finished run extended on another global batch is refused, naming what changed
    refused = _cli("resume", str(tmp_path / "termed"), "train.batch_size=2", "train.max_steps=60")
    assert refused.returncode == 2 and "global batch (tokens per step) (128 → 64)" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    ("model.name=inl-tiny", "model.d_model=32", "model.n_heads=2", "model.n_iterations=2", "model.ff_dim=64",
     "model.dropout=0.1"),
    ("model.name=llama-tiny", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
     "model.num_key_value_heads=2", "model.attention_dropout=0.1"),
], ids=["inl", "llama"])
def test_other_families_resume_exactly(stdlib_tokenizer_dir, tmp_path, model):
    """INL-LLM and the Llama baseline go through the same trainer: SIGKILL + resume is bitwise exact."""
    steps = 16
    kw = dict(steps=steps, dropout=None, model=model)
    straight = _cli("pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "straight", **kw))
    assert straight.returncode == 0, straight.stderr
    _kill_after_checkpoint(_args(stdlib_tokenizer_dir, tmp_path, "killed", **kw), tmp_path / "killed", 4)
    _assert_resume_is_exact(tmp_path / "straight", tmp_path / "killed", steps)


@pytest.mark.slow
def test_swelu_values_are_logged_and_inspect_shows_them(stdlib_tokenizer_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = _cli("pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "sw", steps=8))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "sw"
    recs = [e for e in _events(run) if e["kind"] == "swelu"]
    layers = ["block.0", "block.1", "dense.0", "dense.1", "dense.2"]
    assert len(recs) == 4 and all(f"{n}.{p}" in recs[0] for n in layers for p in ("k", "lam"))
    assert recs[-1]["dense.2.lam"] != recs[0]["dense.2.lam"]  # learnable: it moves
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "swelu/block.0.k" in acc.Tags()["scalars"]
    out = _cli("inspect", str(run), "--plot", str(tmp_path / "sw.png"))
    assert out.returncode == 0, out.stderr
    for name in layers:
        assert name in out.stdout
    assert "k first" in out.stdout and "λ now" in out.stdout
    assert (tmp_path / "sw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_swelu = _cli("pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "silu", steps=2,
                                       extra=("model.activation=silu",)))
    assert no_swelu.returncode == 0, no_swelu.stderr
    bad = _cli("inspect", str(tmp_path / "silu"))
    assert bad.returncode == 2 and "no SWELU records" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_ddp_two_processes_match_one(stdlib_tokenizer_dir, tmp_path):
    one = _cli("pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "one", steps=12, dropout=0.0, batch=4))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "lmlab.cli", "pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "two", steps=12, dropout=0.0, batch=2)],
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
def test_export_loads_with_auto_classes_and_generates(stdlib_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import lmlab.models  # noqa: F401  (registers the Auto classes)
    from lmlab.inference import load_for_inference

    res = _cli("pretrain", *_args(stdlib_tokenizer_dir, tmp_path, "exp", steps=6))
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
