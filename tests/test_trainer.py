"""The trainer's seams, in process on tiny configs: objectives, target-token normalisation, the guard, the
schedule, decay groups, precision, document masking, determinism at 2 threads, locks, safe loading."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import load_config
from lmlab.errors import ConfigError, LmlabError
from lmlab.runtime import Runtime
from lmlab.train import checkpoint as ckpt
from lmlab.train.loop import train
from lmlab.train.objectives import OBJECTIVES, Pretrain, make_objective, register_objective, token_loss_sum
from lmlab.train.optim import lr_at, param_groups
from lmlab.train.run import acquire_lock, release_lock
from lmlab.train.setup import build
from lmlab.train.step import compute_gradients

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


def _cfg(tok, out, name, *extra, steps=12):
    return load_config(None, [
        "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
        "model.swelu_lam_init=5.0",
        "data.source=stdlib", "data.max_docs=40", f"data.tokenizer={tok}", "data.seq_len=32",
        "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=4", "train.eval_every=6",
        "train.eval_batches=2", "train.log_every=1", "train.threads=2", "train.sample_tokens=2",
        "train.progress=false", "train.warmup_steps=2", "train.lr=3e-3", f"run.out_dir={out}",
        f"run.name={name}", *extra])


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _quiet(*a, **k):
    pass


# ------------------------------------------------------------------------------------------- objectives
class LabelSmoothed(Pretrain):
    """A toy objective: next-token loss with label smoothing 0.1 — one class and one registry line."""

    name = "label_smoothed"
    calls = 0

    def loss(self, model, batch):
        LabelSmoothed.calls += torch.is_grad_enabled()
        logits = model(batch["input_ids"]).logits
        return token_loss_sum(logits, batch["targets"], label_smoothing=0.1), {}


def test_a_new_objective_is_one_class_and_one_registry_line(stdlib_tokenizer_dir, tmp_path):
    register_objective(LabelSmoothed)
    try:
        cfg = _cfg(stdlib_tokenizer_dir, tmp_path, "smooth", "train.objective=label_smoothed", steps=3)
        # the loss the trainer logs at step 1 is the objective's, on the first batch, for the fresh model
        parts = build(cfg, CPU, make_objective(cfg))
        batch = parts.data.train.next()
        with torch.no_grad():
            total, _ = LabelSmoothed(cfg).loss(parts.model, batch)
        run = train(cfg, echo=_quiet)
        first = _records(run, "train")[0]
        assert first["step"] == 1
        assert first["loss"] == pytest.approx(float(total) / batch["targets"].numel(), rel=1e-5)
        assert LabelSmoothed.calls == 3  # one micro-batch per step went through the toy objective
        assert json.loads((run / "run.json").read_text())["objective"] == "label_smoothed"
    finally:
        OBJECTIVES.pop("label_smoothed", None)


def test_unknown_objective_is_refused_before_anything(stdlib_tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.objective: unknown objective 'nope'; allowed: pretrain, sft, dpo"):
        train(_cfg(stdlib_tokenizer_dir, tmp_path, "nope", "train.objective=nope"), echo=_quiet)
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------------------------------- the step
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_normalises_over_target_tokens_not_micro_batches():
    from lmlab.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config("mamba-swelu-tiny", vocab_size=50, overrides=dict(
        d_model=16, dense_hidden=16, swelu_lam_init=20.0)))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked predictions: per-token losses differ a lot
    x = torch.randint(0, 50, (4, 9))
    y = torch.randint(0, 50, (4, 9))
    y[2:, 3:] = -100  # the second half has few targets: per-micro-batch means would weigh it wrongly
    whole = {"input_ids": x, "targets": y}
    halves = [{"input_ids": x[:2], "targets": y[:2]}, {"input_ids": x[2:], "targets": y[2:]}]
    obj = Pretrain(None)
    r1 = compute_gradients(model, obj, [whole], CPU)
    g1 = _grads(model)
    model.zero_grad(set_to_none=True)
    r2 = compute_gradients(model, obj, halves, CPU)
    g2 = _grads(model)
    assert int(r1.count) == int(r2.count) == int((y != -100).sum())
    torch.testing.assert_close(r1.loss, r2.loss, rtol=1e-6, atol=1e-6)
    for n in g1:  # fp32 sums grouped differently: equal to a millionth of each gradient's largest entry
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6 * float(g2[n].abs().max()), msg=n)
    # the mean of the two micro-batch means is not the step's loss here
    with torch.no_grad():
        means = [float(obj.loss(model, b)[0] / obj.count(b)) for b in halves]
    assert abs(sum(means) / 2 - float(r2.loss)) > 1e-3


def test_lr_schedule_points():
    kw = dict(lr=1.0, total=110, warmup=10, min_ratio=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(85, schedule="linear", **kw) == pytest.approx(0.325)
    assert lr_at(100, schedule="constant", **kw) == 1.0


def test_decay_groups_and_decay_all_parameters():
    from lmlab.models import build_config, build_model

    model = build_model(build_config("mamba-swelu-tiny", vocab_size=50, overrides=dict(d_model=16,
                                                                                       dense_hidden=16)))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1))
    assert "blocks.0.mixer.in_proj.weight" in decay and "dense.0.fc.weight" in decay
    for n in ("blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.act.k_raw", "blocks.0.act.lam",
              "blocks.0.norm.weight", "dense.0.fc.bias"):
        assert n in no_decay, n
    assert not decay & no_decay and len(decay | no_decay) == len(names)
    model.config.decay_all_parameters = True
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1))
    assert not no_decay and len(decay) == len(names)


# ------------------------------------------------------------------------------------------- whole runs
def test_training_lowers_the_loss_and_two_runs_at_two_threads_are_bitwise_equal(stdlib_tokenizer_dir, tmp_path):
    a = train(_cfg(stdlib_tokenizer_dir, tmp_path, "a", steps=16), echo=_quiet)
    b = train(_cfg(stdlib_tokenizer_dir, tmp_path, "b", steps=16), echo=_quiet)
    losses = [r["loss"] for r in _records(a, "train")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    wa, wb = load_file(str(a / "final/model.safetensors")), load_file(str(b / "final/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.get_num_threads() == 2


def test_a_skipped_step_leaves_parameters_and_optimizer_state_bitwise_unchanged():
    from lmlab.models import build_config, build_model
    from lmlab.train.guard import Guard
    from lmlab.train.step import discard_update

    torch.manual_seed(0)
    model = build_model(build_config("mamba-swelu-tiny", vocab_size=50, overrides=dict(d_model=16,
                                                                                       dense_hidden=16)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = {"input_ids": torch.randint(0, 50, (2, 9)), "targets": torch.randint(0, 50, (2, 9))}
    compute_gradients(model, Pretrain(None), [batch], CPU, optimizer=opt)
    opt.step()
    opt.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)} for k, v in opt.state.items()}
    r = compute_gradients(model, Pretrain(None), [batch], CPU, optimizer=opt)
    verdict = Guard("skip").check(2, float("nan"), r.grad_norm)
    assert verdict.action == "skip"
    discard_update(opt)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(t, state[k][n]) for k, v in opt.state.items() for n, t in v.items() if torch.is_tensor(t))


def test_spike_detection_after_warmup_only():
    from lmlab.train.guard import Guard

    g = Guard("skip", window=20, warmup=10, sigma=6.0)
    for i in range(10):
        assert g.check(i, 3.0 + 0.01 * (i % 3), 1.0).apply
    assert g.check(11, 3.02, 1.0).apply
    v = g.check(12, 9.0, 1.0)
    assert v.action == "skip" and "loss spike" in v.reason
    assert g.check(13, 3.01, 50.0).action == "skip"  # gradient-norm spike
    early = Guard("skip", window=20, warmup=10)
    assert early.check(1, 100.0, 1.0).apply  # nothing to compare with yet


def test_document_masking_reaches_the_model_and_bf16_runs_on_cpu(stdlib_tokenizer_dir, tmp_path):
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "docmask", "data.document_masking=true", "train.precision=bf16",
                     steps=3), echo=_quiet)
    assert all(r["loss"] == r["loss"] for r in _records(run, "train"))
    cfg = _cfg(stdlib_tokenizer_dir, tmp_path, "x", "data.document_masking=true")
    parts = build(cfg, CPU, make_objective(cfg))
    assert "seq_idx" in parts.data.train.next()


def test_document_masking_refused_for_a_model_that_cannot_reset(stdlib_tokenizer_dir, tmp_path):
    cfg = _cfg(stdlib_tokenizer_dir, tmp_path, "llama", "data.document_masking=true")
    cfg.model.name, cfg.model.overrides = "llama-tiny", {}
    with pytest.raises(ConfigError, match="data.document_masking"):
        train(cfg, echo=_quiet)
    assert not (tmp_path / "llama").exists()


# ------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("override,message", [
    ("model.dropout=1.5", "model.dropout: must be in [0, 1), got 1.5"),
    ("model.d_model=-8", "model.d_model: must be >= 1, got -8"),
    ("model.d_model=abc", "model.d_model: expected an integer, got 'abc'"),
    ("train.lr=inf", "train.lr: must be a finite number, got inf"),
    ("train.guard=maybe", "train.guard: invalid value 'maybe'"),
])
@pytest.mark.slow
def test_bad_values_stop_the_cli_with_one_line_and_leave_nothing(tmp_path, override, message):
    out = subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", "model.name=mamba-swelu-tiny", override,
                          f"run.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- run folder safety
def test_the_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                       "since": "now"}))
        with pytest.raises(LmlabError, match=f"in use by pid {holder.pid}"):
            acquire_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    acquire_lock(tmp_path)  # its process is gone: taken over
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    release_lock(tmp_path)
    assert not (tmp_path / "run.lock").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_carrying_code_is_refused_and_a_damaged_one_is_skipped(stdlib_tokenizer_dir, tmp_path):
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "safe", steps=8), echo=_quiet)
    root = run / "checkpoints"
    last, previous = ckpt.list_checkpoints(root)[-1], ckpt.list_checkpoints(root)[-2]
    # a pickle that would run a command, with the manifest rewritten to match
    evil = _Evil()
    evil.path = tmp_path / "pwned"
    with open(last / "trainer.pt", "wb") as f:
        pickle.dump({"state": evil}, f)
    manifest = json.loads((last / "MANIFEST.json").read_text())
    manifest["files"]["trainer.pt"] = ckpt._sha256(last / "trainer.pt")
    (last / "MANIFEST.json").write_text(json.dumps(manifest))
    from lmlab.models import build_config, build_model

    model = build_model(build_config("mamba-swelu-tiny", vocab_size=512, overrides=dict(
        d_model=32, n_layers=2, dense_hidden=32, swelu_lam_init=5.0)))
    with pytest.raises(LmlabError, match="refusing to load it"):
        ckpt.load_checkpoint(last, model)
    assert not evil.path.exists()
    # one flipped byte in the newest checkpoint: resume names it and falls back to the previous one
    data = bytearray((last / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (last / "model.safetensors").write_bytes(bytes(data))
    lines = []
    from lmlab.train.loop import latest_valid_checkpoint

    assert latest_valid_checkpoint(root, lines.append) == previous
    assert "model.safetensors" in lines[0] and last.name in lines[0]


def test_export_loads_in_a_python_that_never_imported_lmlab(stdlib_tokenizer_dir, tmp_path):
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "export", steps=2), echo=_quiet)
    code = ("import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(run / 'final')!r}, trust_remote_code=True)\n"
            "ids = torch.arange(10)[None]\n"
            f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
            "print(type(m).__name__)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["MambaSWELUForCausalLM"]
    from lmlab.inference import load_for_inference

    model, _ = load_for_inference(str(run))
    with torch.no_grad():  # the same function up to float32 rounding (the two processes differ in thread count)
        torch.testing.assert_close(model(torch.arange(10)[None]).logits, torch.load(tmp_path / "logits.pt"))


def test_a_full_disk_stops_the_save_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes every write past a few KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    code = f"""
import json, resource, signal, torch
from pathlib import Path
from lmlab.errors import LmlabError
from lmlab.models import build_config, build_model
from lmlab.runtime import Runtime
from lmlab.train import checkpoint as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
rt = Runtime(device=torch.device("cpu"), precision="fp32")
model = build_model(build_config("mamba-swelu-tiny", vocab_size=64, overrides=dict(d_model=16, dense_hidden=16)))
root = Path({str(tmp_path)!r}) / "checkpoints"
ckpt.save_checkpoint(root, 1, model, {{"step": 1}}, rt=rt)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
try:
    ckpt.save_checkpoint(root, 2, model, {{"step": 2}}, rt=rt)
    print(json.dumps({{"error": None}}))
except LmlabError as e:
    print(json.dumps({{"error": str(e)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    error = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert error is not None and "disk full while saving step-00000002" in error
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no temporary folder left
    ckpt.verify(root / "step-00000001")


def test_early_stopping_on_validation_loss(stdlib_tokenizer_dir, tmp_path):
    # a learning rate of ~0 never improves by 0.5: stop after two evaluations without a new best, then export
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "early", "train.lr=1e-9", "train.eval_every=2",
                     "train.early_stop_patience=2", "train.early_stop_min_delta=0.5", steps=12), echo=_quiet)
    stop = [r for r in _records(run, "event") if r["event"] == "early_stop"]
    assert len(stop) == 1 and stop[0]["step"] == 6  # evals at 2 (first), 4 and 6 (no gain)
    assert (run / "final" / "config.json").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_a_full_disk_while_writing_the_model_file_is_the_same_one_line(tmp_path):
    """A file-size limit above the RNG files but below model.safetensors: safetensors' own error (SafetensorError
    'File too large') becomes the disk-full line, as torch's and the OS's do."""
    code = f"""
import json, resource, torch
from pathlib import Path
from lmlab.errors import LmlabError
from lmlab.models import build_config, build_model
from lmlab.runtime import Runtime
from lmlab.train import checkpoint as ckpt
rt = Runtime(device=torch.device("cpu"), precision="fp32")
model = build_model(build_config("mamba-swelu-tiny", vocab_size=4096, overrides=dict(d_model=64, dense_hidden=64)))
root = Path({str(tmp_path)!r}) / "checkpoints"
first = ckpt.save_checkpoint(root, 1, model, {{"step": 1}}, rt=rt)
sizes = {{p.name: p.stat().st_size for p in first.iterdir()}}
limit = 4 * max(v for k, v in sizes.items() if k != "model.safetensors")
assert limit < sizes["model.safetensors"], sizes
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    ckpt.save_checkpoint(root, 2, model, {{"step": 2}}, rt=rt)
    print(json.dumps({{"error": None}}))
except LmlabError as e:
    print(json.dumps({{"error": str(e)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    error = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert error is not None and error.startswith("disk full while saving step-00000002") and "File too large" in error
    assert "the previous checkpoint is intact" in error
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no temporary folder left
    ckpt.verify(root / "step-00000001")


def test_warmup_is_capped_at_a_tenth_of_a_short_run_with_a_line(stdlib_tokenizer_dir, tmp_path):
    from lmlab.train.optim import warmup_steps

    assert (warmup_steps(100, 50), warmup_steps(100, 5000), warmup_steps(0, 50), warmup_steps(100, 3)) == (5, 100, 0, 1)
    kw = dict(lr=1.0, total=50, warmup=100, schedule="cosine", min_ratio=0.1)
    assert [lr_at(i, **kw) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_at(5, **kw) == pytest.approx(1.0)
    lines = []
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "warm", "train.warmup_steps=100", "train.log_every=1", steps=10),
                echo=lines.append)
    assert any("train.warmup_steps=100 is more than a tenth of the run's 10 steps: warming up over 1" in line
               for line in lines)
    assert _records(run, "train")[0]["lr"] == pytest.approx(3e-3)  # a full LR from the first step


def test_the_objectives_metrics_are_on_the_console_line():
    from lmlab.monitor.events import EventSink

    lines = []
    sink = EventSink(Path(os.devnull).parent / "nonexistent", enabled=False)  # writes nothing
    sink.enabled, sink._echo = True, lines.append
    with sink.progress(10, 0):
        sink.update(2, loss=0.5, lr=1e-3, tok_s=100.0, metrics={"rewards/margin": 0.4125, "rewards/accuracy": 0.75})
        sink.update(3)
        sink.update(4, loss=0.4, lr=1e-3, tok_s=100.0)
    assert len(lines) == 2 and "rewards/margin 0.4125  rewards/accuracy 0.75" in lines[0]
    assert lines[0].startswith("step      2/10  loss 0.5000") and "rewards" not in lines[1]


class NoHeldOut(Pretrain):
    """Pretraining whose validation batches hold no target (every label masked): nothing to measure."""

    name = "no_held_out"

    def data(self, cfg, tokenizer, rt):
        import dataclasses

        d = super().data(cfg, tokenizer, rt)
        return dataclasses.replace(d, val=lambda: ({**b, "targets": torch.full_like(b["targets"], -100)}
                                                    for b in d.val()))


def test_no_held_out_data_gives_no_value_no_best_and_no_early_stop(stdlib_tokenizer_dir, tmp_path):
    register_objective(NoHeldOut)
    try:
        lines = []
        run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "noval", "train.objective=no_held_out",
                         "train.early_stop_patience=1", steps=8), echo=lines.append)
    finally:
        OBJECTIVES.pop("no_held_out", None)
    assert [r for r in _records(run, "eval") if "val_loss" in r] == []
    assert not (run / "checkpoints" / "best.json").exists()
    assert sum("validation loss is not measured" in line for line in lines) == 1
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["val_loss"] is None and summary["val_ppl"] is None and summary["step"] == 8
