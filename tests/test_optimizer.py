"""`train.optimizer`: sgd (heavy-ball momentum, coupled L2 weight decay on the decay group only) against a
hand-written update; sgd through the trainer resumes bitwise; what refuses or skips it (deepspeed, the device
guard)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import Config, load_config
from lmlab.errors import ConfigError
from lmlab.models import build_config, build_model
from lmlab.train import checkpoint as ckpt
from lmlab.train.guard import skips_on_device
from lmlab.train.loop import train
from lmlab.train.optim import make_optimizer, make_optimizer_from, param_groups


def _tiny():
    torch.manual_seed(0)
    return build_model(build_config("mamba-swelu-tiny", vocab_size=64,
                                    overrides=dict(d_model=16, n_layers=1, dense_hidden=16)))


def test_sgd_is_the_hand_written_momentum_update_with_l2_on_the_decay_group_only():
    lr, wd, mu = 0.05, 0.1, 0.9
    model, ref = _tiny(), _tiny()
    opt = make_optimizer(model, lr, wd, (0.9, 0.95), 1e-8, torch.device("cpu"), kind="sgd", momentum=mu)
    assert isinstance(opt, torch.optim.SGD) and not skips_on_device(opt)
    decays = {id(p): g["weight_decay"] for g in param_groups(ref, wd) for p in g["params"]}
    assert set(decays.values()) == {wd, 0.0}
    bufs: dict[int, torch.Tensor] = {}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            out = m(ids[:, :-1]).logits
            torch.nn.functional.cross_entropy(out.reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        with torch.no_grad():  # d = g + wd·p; buf = d (first step), then mu·buf + d; p -= lr·buf
            for p in ref.parameters():
                d = p.grad + decays[id(p)] * p
                bufs[id(p)] = d.clone() if id(p) not in bufs else mu * bufs[id(p)] + d
                p -= lr * bufs[id(p)]
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(_tiny().parameters(), model.parameters(), strict=True))


def test_make_optimizer_from_reads_train_optimizer_and_momentum():
    t = Config().train
    t.optimizer, t.momentum = "sgd", 0.5
    opt = make_optimizer_from(_tiny(), t, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5
    t.optimizer = "adamw"
    assert isinstance(make_optimizer_from(_tiny(), t, torch.device("cpu")), torch.optim.AdamW)


def test_deepspeed_refuses_sgd_in_one_line_naming_the_key():
    from lmlab.runtime import Runtime
    from lmlab.train.strategies.deepspeed import check_deepspeed

    cfg = Config()
    cfg.train.strategy, cfg.train.optimizer = "deepspeed", "sgd"
    with pytest.raises(ConfigError, match="train.optimizer: deepspeed drives adamw only, not sgd"):
        check_deepspeed(cfg, Runtime(device=torch.device("cpu"), precision="fp32"))


@pytest.mark.slow
def test_sgd_through_the_trainer_resumes_bitwise(stdlib_tokenizer_dir, tmp_path):
    cfg = load_config(None, [
        "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
        "data.source=stdlib", "data.max_docs=40", f"data.tokenizer={stdlib_tokenizer_dir}", "data.seq_len=32",
        "train.batch_size=4", "train.max_steps=10", "train.save_every=4", "train.eval_every=5",
        "train.eval_batches=2", "train.log_every=2", "train.threads=2", "train.sample_tokens=2",
        "train.progress=false", "train.warmup_steps=1", "train.lr=0.05", "train.optimizer=sgd",
        "train.momentum=0.9", "train.system_every=0", f"run.out_dir={tmp_path}", "run.name=sgd"])
    whole = train(cfg, echo=lambda *a: None)
    state = torch.load(whole / "checkpoints/step-00000008/trainer.pt", weights_only=True)["optimizer"]
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())
    assert state["param_groups"][0]["momentum"] == 0.9
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints/step-00000008")
    (resumed / "checkpoints/best.json").unlink(missing_ok=True)
    train(load_config(resumed / "config.yaml"), resumed, echo=lambda *a: None)
    assert ckpt.latest_checkpoint(resumed / "checkpoints").name == "step-00000010"
    a, b = (load_file(str(r / "final/model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "run.json").read_text())["status"] == "finished"


def _clip_and_step(strategy_step: bool, opt_kind: str, grad_clip: float, scale: float, skip=None, device="cpu"):
    """A tiny model's parameters after one update from fixed gradients × `scale`: through the single-process
    strategy's clip and step (the clip folded into the fused AdamW where it can be), or as torch's
    clip_grad_norm_ followed by the plain step."""
    from lmlab.train.strategies.single import Single

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(device)
    if opt_kind == "fused":
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(device)
    if strategy_step:
        s = Single.__new__(Single)  # the step hooks alone: no config or runtime needed
        norm = s.clip(model, model, grad_clip)
        s.step(opt, None, skip)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if skip is None:
            opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    # with AdamW the first update barely depends on the gradients' scale: its first moment shows the clip
    moments = [opt.state[p]["exp_avg"].cpu() for p in model.parameters() if "exp_avg" in opt.state[p]]
    return norm.cpu(), [p.detach().cpu() for p in model.parameters()] + moments


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)  # bench/gpu_check.sh runs the CUDA ones
@pytest.mark.parametrize("opt_kind", ["fused", "sgd"])
@pytest.mark.parametrize("grad_clip, scale", [(1.0, 10.0), (1.0, 0.01), (0.0, 10.0)],
                         ids=["clipped", "under-the-limit", "no-clipping"])
def test_the_strategys_clip_is_torchs_clip_grad_norm(opt_kind, grad_clip, scale, device):
    """The single-process clip reports clip_grad_norm_'s total norm to the bit and updates the parameters as
    clip_grad_norm_ + step would: the same bits where it scales the gradients itself (SGD), within rounding where
    the fused AdamW divides them in its kernel (its `grad_scale`)."""
    norm, got = _clip_and_step(True, opt_kind, grad_clip, scale, device=device)
    want_norm, want = _clip_and_step(False, opt_kind, grad_clip, scale, device=device)
    assert torch.equal(norm, want_norm)
    for a, b in zip(got, want, strict=True):
        if opt_kind == "sgd":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if grad_clip > 0 and scale > 1:  # the clip did act: without it the update (SGD) or first moment (AdamW) differs
        _, free = _clip_and_step(False, opt_kind, 0.0, scale, device=device)
        assert any(not torch.allclose(a, b) for a, b in zip(got, free, strict=True))


def test_a_skipped_step_with_a_pending_clip_changes_nothing():
    """The device guard's skip flag with the clip folded in: no parameter moves, and the clip does not carry over
    into the next step."""
    from lmlab.train.strategies.single import Single

    _, before = _clip_and_step(False, "fused", 1.0, 10.0, skip=torch.ones(()))
    _, after = _clip_and_step(True, "fused", 1.0, 10.0, skip=torch.ones(()))
    for a, b in zip(after[:4], before[:4], strict=True):  # the 4 parameters (the skipped fused step made moments)
        assert torch.equal(a, b)
    s = Single.__new__(Single)
    s._clip = "left over"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    s.discard(opt)
    assert s._clip is None
