"""A new strategy is one class and one registry line: `Counting` below (the one-process strategy, with checkpoint
shards of its own and a count of every call) is registered under its own name; a tiny pretrain run and a resume
from its middle checkpoint go through it. Every hook runs as often as the run has steps, micro-batches and
checkpoints, and the resumed run ends bitwise equal to the straight one (its shards hold the whole state)."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.runs import MANIFEST, list_checkpoints, step_of
from lmlab.runtime import Runtime
from lmlab.train import checkpoint as ckpt
from lmlab.train import strategies
from lmlab.train.loop import train
from lmlab.train.strategies import STRATEGIES, Single, make_strategy, register_strategy

STEPS, ACCUM, SAVE_EVERY = 4, 2, 2


class Counting(Single):
    """One process, its model and optimizer state in a shard file of its own (counted/rank0.pt)."""

    name = "counting"
    shard_dir = "counted"
    made: list["Counting"] = []

    def __init__(self, cfg=None, rt=None):
        super().__init__(cfg, rt)
        self.calls = Counter()
        Counting.made.append(self)

    def _count(self, hook: str) -> None:
        self.calls[hook] += 1

    def prepare(self, model):
        self._count("prepare")
        return super().prepare(model)

    def attach(self, optimizer):
        self._count("attach")
        super().attach(optimizer)
        load = optimizer.load_state_dict

        def counted(state):  # a resume loads the optimizer state once, from the shards
            self._count("optimizer_load")
            load(state)

        optimizer.load_state_dict = counted

    def wrap(self, model, optimizer=None):
        self._count("wrap")
        return super().wrap(model, optimizer)

    def no_sync(self, wrapped, last):
        self._count("no_sync")
        return super().no_sync(wrapped, last)

    def backward(self, wrapped, loss, last):
        self._count("backward")
        self.calls["last"] += last
        super().backward(wrapped, loss, last)

    def clip(self, model, wrapped, grad_clip):
        self._count("clip")
        return super().clip(model, wrapped, grad_clip)

    def step(self, optimizer, scaler=None, skip=None):
        self._count("step")
        super().step(optimizer, scaler, skip)

    def discard(self, optimizer, scaler=None):
        self._count("discard")
        super().discard(optimizer, scaler)

    def save_shards(self, folder: Path) -> None:
        self._count("save_shards")
        folder.mkdir()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, folder / "rank0.pt")

    def load_shards(self, folder: Path) -> None:
        self._count("load_shards")
        state = torch.load(folder / "rank0.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def unsharded_model(self, model):
        self._count("unsharded_model")
        return super().unsharded_model(model)


@pytest.fixture
def counting():
    register_strategy("counting", Counting)  # the one line a new strategy needs
    Counting.made.clear()
    yield Counting
    STRATEGIES.pop("counting", None)


def _cfg(tok, out, name):
    cfg = load_config(None, [
        "model.name=mamba-swelu-tiny", "model.d_model=16", "model.n_layers=1", "model.dense_hidden=16",
        "data.source=stdlib", "data.max_docs=20", f"data.tokenizer={tok}", "data.seq_len=16",
        "train.batch_size=2", f"train.grad_accum={ACCUM}", f"train.max_steps={STEPS}",
        f"train.save_every={SAVE_EVERY}", "train.eval_every=1000", "train.eval_batches=1", "train.log_every=1",
        "train.threads=1", "train.sample_tokens=2", "train.progress=false", "train.warmup_steps=1",
        "train.system_every=0", f"run.out_dir={out}", f"run.name={name}"])
    cfg.train.strategy = "counting"  # a registered name (the config's own check knows the built-in ones)
    return cfg


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.slow
def test_a_registered_strategy_runs_a_pretrain_and_its_resume(stdlib_tokenizer_dir, tmp_path, counting):
    cfg = _cfg(stdlib_tokenizer_dir, tmp_path, "straight")
    run = train(cfg, echo=lambda *a: None)
    (s,) = counting.made
    micro = STEPS * ACCUM
    assert dict(s.calls) == {"prepare": 1, "attach": 1, "wrap": 1, "no_sync": micro, "backward": micro,
                             "last": STEPS, "clip": STEPS, "step": STEPS, "save_shards": STEPS // SAVE_EVERY,
                             "unsharded_model": 1}
    # its checkpoints: its shards, the trainer state without the optimizer (in the shards), one manifest
    saved = list_checkpoints(run / "checkpoints")
    assert [step_of(p) for p in saved] == [2, 4]
    manifest = json.loads((saved[-1] / MANIFEST).read_text())
    assert manifest["strategy"] == "counting" and "counted/rank0.pt" in manifest["files"]
    assert "model.safetensors" not in manifest["files"] and strategies.sharded_format(saved[-1]) == "counting"
    assert "optimizer" not in torch.load(saved[-1] / "trainer.pt", weights_only=True)

    # resumed from its step-2 checkpoint by a new object: its shards are read once, the last 2 steps run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / saved[-1].name)
    shutil.rmtree(resumed / "final")
    train(cfg, resumed, echo=lambda *a: None)
    r = counting.made[-1]
    assert r is not s and r.calls["load_shards"] == 1 and r.calls["optimizer_load"] == 1
    assert r.calls["step"] == STEPS - 2
    assert r.calls["backward"] == (STEPS - 2) * ACCUM and r.calls["save_shards"] == 1
    a, b = _weights(run), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resume through it is not exact"


def test_the_registry_picks_the_class_and_refuses_unknown_names_in_one_line(tmp_path):
    from lmlab.config import Config
    from lmlab.models import build_config, build_model

    cpu = Runtime(device=torch.device("cpu"), precision="fp32")
    cfg = Config()
    assert type(make_strategy(cfg, cpu)) is Single  # ddp on one process: no wrapper
    cfg.train.strategy = "fsdp"
    assert type(make_strategy(cfg, cpu)) is strategies.FSDP
    cfg.train.strategy = "nccl-magic"
    with pytest.raises(ConfigError, match=r"train.strategy: unknown 'nccl-magic'; allowed: ddp, fsdp, deepspeed"):
        make_strategy(cfg, cpu)
    with pytest.raises(TypeError, match="not a lmlab.train.strategies.base.Strategy"):
        register_strategy("x", object)
    # the whole-model format: model.safetensors, the optimizer in trainer.pt; not sharded
    model = build_model(build_config("mamba-swelu-tiny", vocab_size=64, overrides=dict(d_model=16, dense_hidden=16)))
    # the strategy that prepared a model stays with it, not with a copy (a frozen reference is placed by nobody)
    s = make_strategy(Config(), cpu)
    assert s.prepare(model) is model and strategies.of(model) is s
    import copy

    twin = copy.deepcopy(model)
    assert type(strategies.of(twin)) is Single and strategies.of(twin) is not s and s.model is model
    saved = ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, rt=cpu)
    assert strategies.sharded_format(saved) is None and (saved / "model.safetensors").is_file()
    assert "strategy" not in json.loads((saved / MANIFEST).read_text())


def test_a_sharded_checkpoint_is_named_and_its_weights_read_in_one_process(tmp_path):
    """fsdp on one process writes DCP shards (no model.safetensors); a reader learns that from the folder and reads
    the weights back into a plain model without any process group."""
    from lmlab.config import Config
    from lmlab.models import build_config, build_model

    cpu = Runtime(device=torch.device("cpu"), precision="fp32")
    cfg = Config()
    cfg.train.strategy = "fsdp"
    mcfg = build_config("mamba-swelu-tiny", vocab_size=64, overrides=dict(d_model=16, dense_hidden=16))
    s = make_strategy(cfg, cpu)
    model = s.prepare(build_model(mcfg))
    s.attach(torch.optim.AdamW(model.parameters()))
    saved = ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3}, rt=cpu, strategy=s)
    assert strategies.sharded_format(saved) == "fsdp" and not (saved / "model.safetensors").exists()
    torch.manual_seed(1)
    plain = build_model(mcfg)
    into = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    assert any(not torch.equal(into[k], v) for k, v in model.state_dict().items())  # another draw: it can fail
    strategies.load_sharded_weights(saved, into)
    assert all(torch.equal(into[k], v) for k, v in model.state_dict().items())
