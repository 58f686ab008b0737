"""Resume with the guard: its state travels in every checkpoint (a run resumed between skipped steps ends bitwise
equal to the uninterrupted one, host and device guard alike; an older checkpoint without it still resumes); a stop
saves the newest state whose next loss was good; a refused `lmlab resume` leaves the run folder as it was."""

import hashlib
import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import load_config
from lmlab.train import checkpoint as ckpt
from lmlab.train import loop as train_loop
from lmlab.train.loop import TrainingDiverged, train
from lmlab.train.objectives import OBJECTIVES, Pretrain, register_objective


class SpikeAt(Pretrain):
    """Pretraining whose loss is 30× at chosen optimizer steps (1-based), counted by the loop's own step (so a
    resumed run spikes where the uninterrupted one did)."""

    name = "spike_at"
    at: set = set()

    def before_step(self, model, step):
        self.step = step + 1

    def loss(self, model, batch):
        total, m = super().loss(model, batch)
        if torch.is_grad_enabled() and self.step in self.at:
            total = total * 30.0
        return total, m


@pytest.fixture
def spiky():
    register_objective(SpikeAt)
    yield SpikeAt
    OBJECTIVES.pop("spike_at", None)


def _cfg(tok, out, name, *extra, steps=16):
    return load_config(None, [
        "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
        "data.source=stdlib", "data.max_docs=40", f"data.tokenizer={tok}", "data.seq_len=32",
        "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=4", "train.eval_every=8",
        "train.eval_batches=2", "train.log_every=2", "train.threads=2", "train.sample_tokens=2",
        "train.progress=false", "train.warmup_steps=1", "train.lr=3e-3", "train.guard_window=8",
        "train.guard_warmup=4", "train.system_every=0", f"run.out_dir={out}", f"run.name={name}", *extra])


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _quiet(*a, **k):
    pass


def _back_to(run: Path, step: int, into: Path) -> Path:
    """A copy of `run` as it was when it had just saved checkpoint `step` (later checkpoints and the export gone)."""
    shutil.copytree(run, into)
    for p in ckpt.list_checkpoints(into / "checkpoints"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(into / "final")
    (into / "run.json").write_text(json.dumps({**json.loads((into / "run.json").read_text()), "status": "stopped"}))
    return into


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["host", "device"])
def test_a_resume_between_skipped_steps_ends_bitwise_equal(stdlib_tokenizer_dir, tmp_path, monkeypatch, spiky, mode):
    """Spikes at steps 10, 11 and 14: the checkpoint of step 12 lies between skipped steps. Without the guard's
    window in it, the resumed run judges nothing for 4 steps and applies step 14's spike."""
    # the trainer's AdamW is fused on the CPU too; the host guard judges it there unless told the CUDA rule
    if mode == "device":
        monkeypatch.setattr(train_loop, "DEVICE_GUARD_ON", ("cuda", "cpu"))
    spiky.at = {10, 11, 14}
    whole = train(_cfg(stdlib_tokenizer_dir, tmp_path, "whole", "train.objective=spike_at"), echo=_quiet)
    skips = [r["step"] for r in _records(whole, "event") if r["event"] == "guard"]
    assert skips == [10, 11, 14]
    saved = torch.load(whole / "checkpoints/step-00000012/trainer.pt", weights_only=True)["state"]["guard"]
    assert len(saved["losses"]) == 8 and saved["bad_in_a_row"] == 0 and ("device" in saved) == (mode == "device")
    resumed = _back_to(whole, 12, tmp_path / "resumed")
    lines = []
    train(load_config(resumed / "config.yaml"), resumed, echo=lines.append)
    assert [r["step"] for r in _records(resumed, "event") if r["event"] == "guard"] == [10, 11, 14, 14]
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "run.json").read_text())["summary"]["skipped_steps"] == 3
    assert not any("no guard state" in line for line in lines)


def _drop_guard_state(path: Path) -> None:
    """Make `path` look like a checkpoint written before the guard's state was saved."""
    state = torch.load(path / "trainer.pt", weights_only=True)
    del state["state"]["guard"]
    torch.save(state, path / "trainer.pt")
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"]["trainer.pt"] = hashlib.sha256((path / "trainer.pt").read_bytes()).hexdigest()
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_without_guard_state_still_resumes_and_says_so(stdlib_tokenizer_dir, tmp_path):
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "old", steps=8), echo=_quiet)
    old = _back_to(run, 4, tmp_path / "old-resumed")
    _drop_guard_state(old / "checkpoints/step-00000004")
    lines = []
    train(load_config(old / "config.yaml"), old, echo=lines.append)
    assert any("holds no guard state" in line and "window starts empty" in line for line in lines)
    assert (old / "final").is_dir()


def test_a_stop_saves_the_newest_state_whose_next_loss_was_good(stdlib_tokenizer_dir, tmp_path):
    """lr=1e6: the first update is judged on the loss before it (fine) and wrecks the weights; the steps after it
    are bad and the run stops. What it saves is the state before that update, so a resume with a sane LR trains
    on without a single bad step."""
    cfg = _cfg(stdlib_tokenizer_dir, tmp_path, "wild", "train.lr=1e6", "train.guard_max_skips=3", steps=12)
    with pytest.raises(TrainingDiverged, match="last good weights") as e:
        train(cfg, echo=_quiet)
    run = tmp_path / "wild"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["resume_command"] in str(e.value)
    guard = [r for r in _records(run, "event") if r["event"] == "guard"]
    assert guard[-1]["action"] == "stop" and manifest["skipped_steps"] == len(guard) == 4
    stop = ckpt.latest_checkpoint(run / "checkpoints")
    assert stop.name == f"step-{guard[-1]['step']:08d}"
    start = torch.load(stop / "trainer.pt", weights_only=True)
    assert start["state"]["guard"]["bad_in_a_row"] == 0  # a resume counts bad steps afresh
    weights = load_file(str(stop / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) and float(w.abs().max()) < 100 for w in weights.values())
    lines = []
    train(load_config(run / "config.yaml", ["train.lr=3e-3"]), run, echo=lines.append)
    after = [r for r in _records(run, "event") if r["event"] == "guard" and r["step"] > guard[-1]["step"]]
    assert after == [] and json.loads((run / "run.json").read_text())["status"] == "finished"
    assert all(math.isfinite(r["loss"]) for r in _records(run, "train") if r["step"] > guard[-1]["step"])


# ------------------------------------------------------------------------------------- refused resumes
def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_refused_resume_leaves_the_run_folder_as_it_was(stdlib_tokenizer_dir, tmp_path, capsys):
    from lmlab.cli import main

    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, "r", steps=4), echo=_quiet)
    shutil.rmtree(run / "final")  # a run to continue
    before = _snapshot(run)
    # the global batch changed: refused by the same-run check
    assert main(["resume", str(run), "train.batch_size=2"]) == 2
    assert "changed: the global batch" in capsys.readouterr().err
    assert _snapshot(run) == before
    # another process holds the run: refused by the lock
    (run / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "now"}))
    held = _snapshot(run)
    assert main(["resume", str(run), "train.lr=1e-5"]) == 2
    assert "is in use by pid" in capsys.readouterr().err
    assert _snapshot(run) == held
    (run / "run.lock").unlink()
    # accepted: the new setting is saved with the run
    assert main(["resume", str(run), "train.lr=1e-3"]) == 0
    assert load_config(run / "config.yaml").train.lr == 1e-3 and (run / "final").is_dir()
