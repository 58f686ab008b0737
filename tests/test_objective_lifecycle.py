"""The objective lifecycle: `setup` once, after the strategy wrapped the model and before a checkpoint is
restored; `before_step` once per optimizer step (not per micro-batch), before that step's batches, with the
number of steps already taken, on a fresh and a resumed run; DPO's frozen reference built in `setup`; and no
objective changing the config it was given."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmlab.config import load_config
from lmlab.train.objectives import OBJECTIVES, register_objective
from lmlab.train.sft import SFT

MAMBA = ["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def root(tmp_path_factory, stdlib_tokenizer_dir):
    import shutil

    root = tmp_path_factory.mktemp("lifecycle")
    shutil.copytree(stdlib_tokenizer_dir, root / "tok")  # a copy of the session's tokenizer, beside the data
    rows = [{"prompt": f"Is {a} less than {b}?", "chosen": "yes" if a < b else "no",
             "rejected": "no" if a < b else "yes, certainly"} for a in range(6) for b in range(6) if a != b]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"instruction": f"Add {a} and {b}.", "output": f"{a + b}"} for a in range(6) for b in range(6)]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


CALLS: list = []


def _record_wrap(monkeypatch, calls: list) -> None:
    """Append "wrap" to `calls` whenever the trainer's strategy wraps the model."""
    import lmlab.train.setup as setup_mod

    real_make = setup_mod.make_strategy

    def make(*a, **k):
        strategy = real_make(*a, **k)
        real_wrap = strategy.wrap
        strategy.wrap = lambda *a, **k: (calls.append("wrap"), real_wrap(*a, **k))[1]
        return strategy

    monkeypatch.setattr(setup_mod, "make_strategy", make)


class Recording(SFT):
    """SFT that records the trainer's calls into it."""

    name = "recording-sft"

    def data(self, cfg, tokenizer, rt):
        d = super().data(cfg, tokenizer, rt)
        draw = d.train.next

        def next_batch():
            CALLS.append("next")
            return draw()

        d.train.next = next_batch
        return d

    def setup(self, model, wrapped, rt):
        CALLS.append(("setup", wrapped is not None, next(model.parameters()).device == rt.device))

    def before_step(self, model, step):
        assert model.training
        CALLS.append(("before_step", step))


def _cfg(root, out, objective="sft", extra=()):
    return load_config(None, [
        *MAMBA, f"train.objective={objective}", f"data.tokenizer={root / 'tok'}", "data.seq_len=64",
        f"data.source={root / 'sums.jsonl'}", "data.val_fraction=0.1", "train.batch_size=2",
        "train.grad_accum=2", "train.eval_every=1000", "train.eval_batches=1", "train.log_every=1",
        "train.save_every=3", "train.threads=1", "train.progress=false", "train.sample_tokens=2",
        "train.warmup_steps=0", f"run.out_dir={out}", "run.name=rec", *extra])


def test_setup_once_after_wrapping_and_before_step_once_per_step(root, tmp_path, monkeypatch):
    from lmlab.train.loop import train

    register_objective(Recording)
    _record_wrap(monkeypatch, CALLS)
    import lmlab.train.loop as loop_mod

    real_restore = loop_mod.restore
    monkeypatch.setattr(loop_mod, "restore", lambda *a, **k: (CALLS.append("restore"), real_restore(*a, **k))[1])
    try:
        CALLS.clear()
        run = train(_cfg(root, tmp_path, "recording-sft", ["train.max_steps=3"]), echo=lambda *a: None)
        steps = [("before_step", s) for s in range(3)]
        assert CALLS == ["wrap", ("setup", True, True), "restore",
                         *[c for s in steps for c in (s, "next", "next")]]  # two micro-batches per step
        CALLS.clear()  # resumed from step 3 with a larger budget: setup again once, steps 3 and 4
        train(_cfg(root, tmp_path, "recording-sft", ["train.max_steps=5"]), run, echo=lambda *a: None)
        assert CALLS == ["wrap", ("setup", True, True), "restore",
                         *[c for s in (3, 4) for c in (("before_step", s), "next", "next")]]
    finally:
        OBJECTIVES.pop("recording-sft", None)


@pytest.mark.parametrize("objective,extra", [
    ("sft", ["finetune.template=chatml"]),  # adds the template's special tokens: to the tokenizer, not the config
    ("sft", []),  # "auto" resolves to plain: recorded in the manifest, not written back
    ("dpo", ["data.seq_len=32"]),
])
def test_no_objective_changes_the_config(root, tmp_path, objective, extra):
    from lmlab.runtime import setup_runtime
    from lmlab.train.objectives import make_objective
    from lmlab.train.setup import build

    if objective == "dpo":
        extra = [*extra, f"data.source={root / 'pairs.jsonl'}"]
    cfg = _cfg(root, tmp_path, objective, ["train.max_steps=2", *extra])
    before = dataclasses.asdict(cfg)
    rt = setup_runtime("cpu", "fp32", 1)
    obj = make_objective(cfg)
    parts = build(cfg, rt, obj)
    assert dataclasses.asdict(cfg) == before
    assert parts.data.manifest["data"]["template"] == (cfg.finetune.template if cfg.finetune.template != "auto"
                                                      else "plain")


def test_dpo_reference_is_built_in_setup_after_wrapping(root, tmp_path, monkeypatch):
    import lmlab.train.setup as setup_mod
    from lmlab.runtime import setup_runtime
    from lmlab.train.dpo import DPO

    cfg = _cfg(root, tmp_path, "dpo", ["data.seq_len=32", "train.max_steps=2",
                                       f"data.source={root / 'pairs.jsonl'}"])
    order = []
    _record_wrap(monkeypatch, order)
    obj = DPO(cfg)
    real_setup = obj.setup
    obj.setup = lambda *a: (order.append("setup"), real_setup(*a))[1]
    obj.check_model(torch.nn.Linear(2, 2))  # refuses or accepts; builds nothing
    assert obj.reference is None
    parts = setup_mod.build(cfg, setup_runtime("cpu", "fp32", 1), obj)
    assert order == ["wrap", "setup"]
    ref = obj.reference
    assert ref is not None and not ref.training and not any(p.requires_grad for p in ref.parameters())
    for (n, a), (m, b) in zip(parts.model.named_parameters(), ref.named_parameters(), strict=True):
        assert n == m and a is not b and torch.equal(a, b)


@pytest.mark.parametrize("name", ["llama-tiny", "mamba-swelu-tiny"])
def test_frozen_copy_of_an_fsdp_sharded_policy(name, one_rank_group):
    """FSDP2 refuses deepcopy: the reference is the same architecture sharded the same way, with the policy's
    shards copied in; it computes what the policy computed and stays put when the policy steps."""
    from lmlab.models import build_config, build_model
    from lmlab.runtime import setup_runtime
    from lmlab.train.dpo import frozen_copy
    from lmlab.train.strategies.fsdp import shard

    rt = setup_runtime("cpu", "fp32", 1)
    torch.manual_seed(0)
    over = dict(d_model=32, n_layers=2, dense_hidden=32) if name.startswith("mamba") else {}
    model = build_model(build_config(name, vocab_size=64, overrides=over))
    shard(model, rt)
    with pytest.raises(AssertionError, match="deepcopy"):
        import copy

        copy.deepcopy(model)
    ref = frozen_copy(model, rt)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    x = torch.randint(0, 64, (2, 9))
    model.eval()
    with torch.no_grad():
        before = model(x).logits
        torch.testing.assert_close(ref(x).logits, before, rtol=0, atol=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.equal(model.eval()(x).logits, before)
        torch.testing.assert_close(ref(x).logits, before, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [("sft", []), ("dpo", ["data.seq_len=32"])])
def test_a_run_with_the_chunked_loss_trains_as_the_plain_one(root, tmp_path, objective, extra, monkeypatch):
    """The trainer end to end (micro-batches, accumulation, validation, export): train.chunked_loss=on (chunks
    of 16 tokens) and off give the same losses and the same final weights to fp32 rounding."""
    from safetensors.torch import load_file

    from lmlab.train.loop import train
    from lmlab.train.losses import LossChunking

    monkeypatch.setattr(LossChunking, "chunk_tokens", lambda self, vocab: 16)  # several chunks per micro-batch
    if objective == "dpo":
        extra = [*extra, f"data.source={root / 'pairs.jsonl'}", "finetune.method=full"]
    out = {}
    for mode in ("off", "on"):
        cfg = _cfg(root, tmp_path, objective, ["train.max_steps=3", "train.eval_every=3", f"train.chunked_loss={mode}",
                                               *extra, f"run.name=loss-{mode}"])
        run = train(cfg, echo=lambda *a: None)
        events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [e[k] for e in events for k in ("loss", "val_loss") if k in e and e["kind"] in ("train", "eval")]
        out[mode] = losses, load_file(str(run / "final" / "model.safetensors"))
    assert len(out["on"][0]) == 4  # three steps and one validation
    assert out["on"][0] == pytest.approx(out["off"][0], rel=1e-5)
    for k, w in out["off"][1].items():
        torch.testing.assert_close(out["on"][1][k], w, rtol=1e-4, atol=1e-5)
