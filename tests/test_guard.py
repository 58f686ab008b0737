"""The step guard: the device-side decision (no host sync per step) against the host reference, verdict for
verdict and weight for weight; a NaN injected into real training for each policy, a spike for `skip` and
`rollback`."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import load_config
from lmlab.train import checkpoint as ckpt
from lmlab.train import loop as train_loop
from lmlab.train import setup as train_setup
from lmlab.train.guard import DeviceGuard, Guard, skips_on_device
from lmlab.train.loop import TrainingDiverged, train
from lmlab.train.objectives import OBJECTIVES, Pretrain, register_objective


# --------------------------------------------------------------------------------------------- the rule
def _sequence(seed: int, n: int = 400) -> list[tuple[float, float]]:
    """Noisy losses and norms with NaN, inf, loss spikes, norm spikes, and a long bad stretch at the end."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        loss, norm = 3.0 - i / n + rng.gauss(0, 0.05), 1.0 + rng.gauss(0, 0.1)
        r = rng.random()
        if r < 0.02:
            loss = float("nan")
        elif r < 0.03:
            norm = float("inf")
        elif r < 0.05:
            loss *= rng.choice([1.5, 4.0, 20.0])
        elif r < 0.07:
            norm *= rng.choice([1.5, 10.0, 100.0])
        out.append((loss, norm))
    return out + [(float("nan"), 1.0)] * 12


@pytest.mark.parametrize("seed,clip", [(0, 0.0), (1, 0.0), (2, 0.0), (0, 1.0), (1, 1.0)])
def test_device_guard_gives_the_host_guards_verdicts_and_reasons(seed, clip):
    kw = dict(window=32, warmup=16, sigma=6.0, max_skips=10, clip=clip)
    host, dev = Guard("skip", **kw), DeviceGuard(Guard("skip", **kw), torch.device("cpu"))
    expected, flags, events, stop_at = [], [], [], None
    for step, (loss, norm) in enumerate(_sequence(seed), start=1):
        flags.append(float(dev.check(step, torch.tensor(loss), torch.tensor(norm))))
        if step % 7 == 0:  # read back now and then, as the loop does at log steps
            events += dev.read()[0]
        if stop_at is None:  # the host guard ends the run at its stop; the device guard halts there
            v = host.check(step, loss, norm)
            if v.action != "apply":
                expected.append((step, v.action, v.reason))
            if v.action == "stop":
                stop_at = step
    more, verdict = dev.read()
    events += more
    assert [(s, a, r) for s, a, r, _, _ in events] == expected
    assert stop_at is not None and verdict.action == "stop" and verdict.step == stop_at
    assert verdict.reason == expected[-1][2] and "bad steps in a row" in verdict.reason
    assert all(flags[stop_at - 1:]), "after the stop nothing is applied"
    assert [s for s, f in enumerate(flags[:stop_at], start=1) if f] == [s for s, _, _ in expected]
    reasons = [r for _, _, r in expected]
    assert any("loss spike" in r for r in reasons) and "loss is nan" in reasons and "gradient norm is inf" in reasons
    assert any("gradient norm spike" in r for r in reasons) == (clip == 0)  # clipped: norm outliers alone pass


def test_with_clipping_a_gradient_norm_spike_counts_only_with_the_loss_up():
    """Gradients clipped: a norm 50× its mean with an ordinary loss is applied (clipping bounds the update); with
    the loss above mean + σ/2·std as well, it is a spike; a loss above mean + σ·std is one by itself. Unclipped,
    the norm alone is enough. The device guard says the same."""
    history = [(3.0 + 0.01 * (i % 5 - 2), 1.0 + 0.02 * (i % 3 - 1)) for i in range(16)]
    std = 0.01 * 3.0  # the floor (1 % of the mean) is above the losses' own spread
    probes = [(3.0, 50.0), (3.0 + 4 * std, 50.0), (3.0 + 7 * std, 1.0), (3.0 + 4 * std, 1.0)]
    for clip, expected in ((1.0, ["apply", "skip", "skip", "apply"]), (0.0, ["skip", "skip", "skip", "apply"])):
        for probe, want in zip(probes, expected, strict=True):
            host = Guard("skip", window=16, warmup=8, clip=clip)
            dev = DeviceGuard(Guard("skip", window=16, warmup=8, clip=clip), torch.device("cpu"))
            for i, (loss, norm) in enumerate(history, start=1):
                assert host.check(i, loss, norm).apply and not float(dev.check(i, torch.tensor(loss),
                                                                              torch.tensor(norm)))
            v = host.check(17, *probe)
            assert v.action == want, (clip, probe, v)
            assert float(dev.check(17, torch.tensor(probe[0]), torch.tensor(probe[1]))) == (want == "skip")


def test_a_device_skip_leaves_weights_and_adam_state_bitwise_unchanged_without_reading_the_flag():
    from lmlab.train.step import apply_update

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert skips_on_device(opt) and not skips_on_device(torch.optim.AdamW([p], lr=0.1))
    for _ in range(3):
        p.grad = torch.randn(64)
        apply_update(opt, skip=torch.tensor(0.0))
    before = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((64,), float("nan"))
    apply_update(opt, skip=torch.tensor(1.0))
    assert torch.equal(p, before) and all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    assert not hasattr(opt, "found_inf")  # the flag does not outlive the step
    p.grad = torch.randn(64)
    apply_update(opt, skip=torch.tensor(0.0))
    assert not torch.equal(p, before) and float(opt.state[p]["step"]) == 4.0


# ------------------------------------------------------------------------------------------ in training
class Faulty(Pretrain):
    """Pretraining whose loss is NaN (`nan`) or 30× (`spike`) at chosen optimizer steps."""

    name = "faulty"
    at: dict = {}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def loss(self, model, batch):
        total, m = super().loss(model, batch)
        if torch.is_grad_enabled():
            self.calls += 1
            kind = self.at.get(self.calls)
            if kind == "nan":
                total = total * float("nan")
            elif kind == "spike":
                total = total * 30.0
        return total, m


@pytest.fixture
def faulty():
    register_objective(Faulty)
    yield Faulty
    OBJECTIVES.pop("faulty", None)


def _cfg(tok, out, name, *extra, steps=14):
    return load_config(None, [
        "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
        "data.source=stdlib", "data.max_docs=40", f"data.tokenizer={tok}", "data.seq_len=32",
        "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=4", "train.eval_every=7",
        "train.eval_batches=2", "train.log_every=3", "train.threads=2", "train.sample_tokens=2",
        "train.progress=false", "train.warmup_steps=2", "train.lr=3e-3", "train.objective=faulty",
        "train.guard_window=8", "train.guard_warmup=4", f"run.out_dir={out}", f"run.name={name}", *extra])


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _quiet(*a, **k):
    pass


def test_the_device_guard_trains_like_the_host_guard(stdlib_tokenizer_dir, tmp_path, monkeypatch, faulty):
    """Both runs use fused AdamW (on CPU here); one decides each step on the host, one on the device."""
    from lmlab.train import optim

    def fused(model, lr, wd, betas, eps, device, **kw):
        return torch.optim.AdamW(optim.param_groups(model, wd), lr=lr, betas=betas, eps=eps, fused=True)

    monkeypatch.setattr(train_setup, "make_optimizer", fused)
    monkeypatch.setattr(train_loop, "DEVICE_GUARD_ON", ("cuda", "cpu"))  # the CUDA decision, taken on the CPU
    seen = []
    real = DeviceGuard.check
    monkeypatch.setattr(DeviceGuard, "check", lambda self, *a: seen.append(a[0]) or real(self, *a))
    runs = {}
    for mode in ("device", "host"):
        faulty.at = {6: "nan", 10: "spike"}
        if mode == "host":
            monkeypatch.setattr(train_loop, "skips_on_device", lambda opt: False)
        runs[mode] = train(_cfg(stdlib_tokenizer_dir, tmp_path, mode), echo=_quiet)
        if mode == "device":
            assert seen == list(range(1, 15)), "the device guard did not decide the steps"
    dev, host = runs["device"], runs["host"]
    guard = {m: [(r["step"], r["reason"]) for r in _records(runs[m], "event") if r["event"] == "guard"]
             for m in runs}
    assert guard["device"] == guard["host"] and [s for s, _ in guard["host"]] == [6, 10]
    assert guard["host"][0][1] == "loss is nan" and guard["host"][1][1].startswith("loss spike")
    for kind in ("train", "eval"):
        a, b = _records(dev, kind), _records(host, kind)
        assert [(r["step"], r.get("loss", r.get("val_loss")), r.get("skipped")) for r in a] == \
            [(r["step"], r.get("loss", r.get("val_loss")), r.get("skipped")) for r in b]
    wa, wb = (load_file(str(r / "final/model.safetensors")) for r in (dev, host))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((dev / "run.json").read_text())["summary"]
    assert summary["skipped_steps"] == 2 and all(math.isfinite(r["loss"]) for r in _records(dev, "train"))


@pytest.mark.parametrize("policy", ["skip", "stop", "rollback"])
def test_an_injected_nan(stdlib_tokenizer_dir, tmp_path, faulty, policy):
    faulty.at = {6: "nan"}
    cfg = _cfg(stdlib_tokenizer_dir, tmp_path, policy, f"train.guard={policy}", steps=9)
    if policy == "stop":
        with pytest.raises(TrainingDiverged, match="loss is nan at step 6"):
            train(cfg, echo=_quiet)
        run = tmp_path / policy
        assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-00000006"
        manifest = json.loads((run / "run.json").read_text())
        assert manifest["status"] == "stopped" and manifest["skipped_steps"] == 1
        assert "loss is nan" in manifest["stop_reason"] and manifest["resume_command"].startswith("lmlab resume")
        assert _records(run, "train")[-1]["step"] == 6 and _records(run, "train")[-1]["skipped"] == 1
        return
    run = train(cfg, echo=_quiet)
    events = [r for r in _records(run, "event") if r["event"] in ("guard", "rollback")]
    assert events[0]["event"] == "guard" and events[0]["step"] == 6 and events[0]["action"] == policy
    assert all(math.isfinite(r["loss"]) for r in _records(run, "train"))  # never in the weights or the log mean
    if policy == "rollback":  # step 6's loss judged the state after step 5 bad: back to the one after step 4
        assert events[1]["event"] == "rollback" and events[1]["to_step"] == 4 and events[1]["lr_scale"] == 0.5
    else:
        assert json.loads((run / "run.json").read_text())["summary"]["skipped_steps"] == 1


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_an_injected_spike(stdlib_tokenizer_dir, tmp_path, faulty, policy):
    faulty.at = {10: "spike"}
    run = train(_cfg(stdlib_tokenizer_dir, tmp_path, policy, f"train.guard={policy}"), echo=_quiet)
    events = [r for r in _records(run, "event") if r["event"] in ("guard", "rollback")]
    assert events[0]["event"] == "guard" and events[0]["step"] == 10 and events[0]["action"] == policy
    assert events[0]["reason"].startswith("loss spike") and events[0]["loss"] > 20
    losses = [r["loss"] for r in _records(run, "train")]
    assert max(losses) < 10  # the spike never entered the logged mean (the plain losses are about 6)
    if policy == "rollback":
        assert events[1]["event"] == "rollback" and events[1]["to_step"] == 8 and events[1]["lr_scale"] == 0.5
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_the_device_guard_stops_with_the_host_guards_last_good_state(stdlib_tokenizer_dir, tmp_path, monkeypatch,
                                                                     faulty):
    """NaN at steps 9-11, at most 2 skips in a row: the host guard stops at step 11; the device guard learns it
    at the next log step (12), applies nothing in between and saves the same weights and optimizer state."""
    from lmlab.train import optim

    monkeypatch.setattr(train_setup, "make_optimizer", lambda model, lr, wd, betas, eps, device, **kw:
                        torch.optim.AdamW(optim.param_groups(model, wd), lr=lr, betas=betas, eps=eps, fused=True))
    monkeypatch.setattr(train_loop, "DEVICE_GUARD_ON", ("cuda", "cpu"))
    saved = {}
    for mode in ("device", "host"):
        faulty.at = {9: "nan", 10: "nan", 11: "nan"}  # step 12 is fine: it must not be applied either
        if mode == "host":
            monkeypatch.setattr(train_loop, "skips_on_device", lambda opt: False)
        with pytest.raises(TrainingDiverged, match="loss is nan, 3 bad steps in a row at step 11") as e:
            train(_cfg(stdlib_tokenizer_dir, tmp_path, mode, "train.guard_max_skips=2"), echo=_quiet)
        run = tmp_path / mode
        events = [(r["step"], r["action"], r["reason"]) for r in _records(run, "event") if r["event"] == "guard"]
        assert events == [(9, "skip", "loss is nan"), (10, "skip", "loss is nan"),
                          (11, "stop", "loss is nan, 3 bad steps in a row")]
        saved[mode] = ckpt.latest_checkpoint(run / "checkpoints")
        assert ("read back at step 12" in str(e.value)) == (mode == "device")
    assert (saved["host"].name, saved["device"].name) == ("step-00000011", "step-00000012")
    a, b = (load_file(str(saved[m] / "model.safetensors")) for m in ("host", "device"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = (torch.load(saved[m] / "trainer.pt", weights_only=True)["optimizer"]["state"] for m in ("host", "device"))
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


def test_a_nan_run_without_the_guard_ends_diverged_not_finished(stdlib_tokenizer_dir, tmp_path, faulty):
    """train.guard=off applies step 6's NaN: no samples drawn from NaN probabilities, no export, status
    `diverged` with its reason (so a study's re-run does not take it for finished)."""
    faulty.at = {6: "nan"}
    lines = []
    with pytest.raises(TrainingDiverged, match="the weights are not finite at step 9"):
        train(_cfg(stdlib_tokenizer_dir, tmp_path, "noguard", "train.guard=off", steps=9), echo=lines.append)
    run = tmp_path / "noguard"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "diverged" and "not finite" in manifest["stop_reason"]
    assert not (run / "final").exists() and not (run / "samples.jsonl").exists()
    assert any(line.startswith("samples   none: the weights are not finite") for line in lines)
    assert not train_loop._finished(run, train_loop.setup_runtime("cpu", "fp32", 1))
