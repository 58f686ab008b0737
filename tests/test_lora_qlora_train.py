"""LoRA and QLoRA runs: only adapters change, QLoRA trains on CPU for every family, the adapter folder loads
with PEFT, `lmlab export --merge` equals base + adapters, and a killed LoRA run resumes bit for bit."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


FAMILIES = {
    "mamba": ["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32"],
    "inl": ["model.name=inl-tiny"],
    "llama": ["model.name=llama-tiny"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("lora")
    train_bpe("stdlib", 512, root / "tok", max_chars=200_000)
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
            for a in range(9) for b in range(7)]
    (root / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(root, name, method, family="mamba", steps=4, extra=()):
    return [*FAMILIES[family], "train.objective=sft", f"finetune.method={method}", f"data.source={root / 'add.jsonl'}",
            f"data.tokenizer={root / 'tok'}", "data.seq_len=48", "data.val_fraction=0.1", "train.batch_size=4",
            f"train.max_steps={steps}", "train.eval_every=1000", "train.eval_batches=1", "train.log_every=1",
            "train.threads=1", "train.progress=false", "train.sample_tokens=2", "train.warmup_steps=0",
            "train.lr=1e-2", "finetune.lora_rank=4", "finetune.lora_dropout=0.0", f"run.out_dir={root / 'runs'}",
            f"run.name={name}", *extra]


def _train(overrides):
    from lmlab.train.loop import train

    return train(load_config(None, overrides), echo=lambda *a: None)


def test_lora_changes_only_adapters_and_merges_exactly(setup):
    from peft import PeftModel

    from lmlab.commands import export as export_cmd
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.train.setup import build_model

    run = _train(_cfg(setup, "lora", "lora", extra=("train.save_every=4",)))
    cfg = load_config(run / "config.yaml")
    tok = load_tokenizer(str(run / "tokenizer"))
    base = build_model(cfg, tok).eval()
    ckpt = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    base_sd = base.state_dict()
    changed_base = [k for k, v in ckpt.items() if "lora_" not in k
                    and not torch.equal(v, base_sd[k.replace("base_model.model.", "").replace(".base_layer", "")])]
    assert not changed_base  # LoRA moved no base weight
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in ckpt.items())  # and did move the adapters
    final = run / "final"
    assert (final / "adapter_config.json").is_file()
    tuned = PeftModel.from_pretrained(build_model(cfg, tok), str(final)).eval()
    ids = torch.randint(1, len(tok), (2, 13))
    with torch.no_grad():
        expect = tuned(input_ids=ids).logits
        assert (expect - base(ids).logits).abs().max() > 1e-4
    out = setup / "merged"
    p = argparse.ArgumentParser()
    export_cmd.add_arguments(p)
    assert export_cmd.run(p.parse_args([str(run), "--merge", "-o", str(out)])) == 0
    from lmlab.models.hf import load_model

    merged = load_model(str(out)).eval()
    assert not (out / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_qlora_trains_on_cpu(setup, family):
    import bitsandbytes as bnb

    from lmlab.train.adapters import add_adapters
    from lmlab.train.setup import build_model

    overrides = _cfg(setup, f"qlora-{family}", "qlora", family=family, steps=3)
    cfg = load_config(None, overrides)
    from lmlab.data.tokenizer import load_tokenizer

    model = add_adapters(build_model(cfg, load_tokenizer(str(setup / "tok"))), cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    run = _train(overrides)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert len(losses) == 3 and all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


@pytest.mark.slow
def test_killed_lora_run_resumes_bitwise(setup):
    steps = 16
    straight = _train(_cfg(setup, "straight", "lora", family="llama", steps=steps, extra=("train.save_every=4",
                                                                           "finetune.lora_dropout=0.1")))
    killed = setup / "runs" / "killed"
    code = ("import sys; from lmlab.config import load_config; from lmlab.train.loop import train; "
            "train(load_config(None, sys.argv[1:]))")
    args = _cfg(setup, "killed", "lora", family="llama", steps=steps,
                extra=("train.save_every=4", "finetune.lora_dropout=0.1"))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((p / "MANIFEST.json").exists() for p in (killed / "checkpoints").glob("step-*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    from lmlab.train.loop import train

    lines = []
    train(load_config(killed / "config.yaml"), killed, echo=lines.append)
    assert any(line.startswith("resumed   from step-") for line in lines)
    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(killed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
