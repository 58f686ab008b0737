"""The planner: counts, budgets, the memory model against measured CPU peaks, and `lmlab estimate`."""

import json
import math
import subprocess
import sys

import pytest

from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.models import registry
from lmlab.plan.estimate import analyse, estimate, lora_trainable, memory_fits
from lmlab.plan.hardware import HARDWARE, cpu_hardware
from lmlab.plan.measure import measure_training_peak


@pytest.mark.parametrize("name", ["mamba-swelu-tiny", "inl-tiny", "llama-tiny"])
def test_parameter_count_is_the_real_models_count(name):
    """Counted on the meta device; checked against a real model's unique tensors."""
    real = registry.build_model(registry.build_config(name))
    unique = {p.data_ptr(): p.numel() for p in real.parameters()}
    assert analyse(name).params_total == sum(unique.values())


def test_inl_flops_count_every_iteration():
    """INL runs its controller n_iterations times per layer: more than 2 FLOPs per weight per token."""
    e1 = estimate("inl-tiny", seq_len=128, micro_batch=1, hardware="h100", overrides={"n_iterations": 1})
    e4 = estimate("inl-tiny", seq_len=128, micro_batch=1, hardware="h100", overrides={"n_iterations": 4})
    assert e1.params_total == e4.params_total  # the same weights ...
    assert e4.flops_per_token_inference > 1.2 * e1.flops_per_token_inference  # ... used more often
    assert e4.flops_per_token == pytest.approx(3 * e4.flops_per_token_inference)
    # a ledger architecture: 2 FLOPs per matmul weight per token, nothing counted twice
    m = estimate("mamba-swelu-tiny", seq_len=128, micro_batch=1, hardware="h100")
    assert m.flops_per_token_inference == pytest.approx(2 * analyse("mamba-swelu-tiny").params_matmul)


def test_run_config_supplies_precision_checkpointing_and_budget(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model: {name: mamba-swelu-tiny}\ndata: {seq_len: 128}\n"
                   "train: {precision: fp32, activation_checkpointing: true, batch_size: 4, max_steps: 50}\n")
    e = estimate(str(run), hardware="h100")
    assert (e.precision, e.checkpointing, e.seq_len, e.micro_batch, e.steps) == ("fp32", True, 128, 4, 50)


def test_cpu_plans_memory_only():
    e = estimate("mamba-swelu-tiny", seq_len=128, micro_batch=2, hardware="cpu", steps=10)
    assert e.precision == "fp32" and e.hours is None and e.cost is None and e.steps == 10


def test_token_ratio_budget_matches_the_hand_computation():
    # --params 124,104,719 (the original's figure) x 100 tokens each at 16 x 1024 tokens per step
    e = estimate("mamba-swelu-124m", params=124_104_719, token_ratio=100, seq_len=1024, micro_batch=16,
                 hardware="h100")
    assert e.tokens_per_step == 16_384
    assert e.steps == math.ceil(124_104_719 * 100 / 16_384) == 757_476
    assert e.tokens == e.steps * 16_384
    assert e.hours == pytest.approx(e.tokens / e.tokens_per_second / 3600)
    assert e.cost == pytest.approx(e.hours * HARDWARE["h100"].price_per_hour)
    with pytest.raises(ConfigError, match="one budget"):
        estimate("mamba-swelu-tiny", tokens=1e6, token_ratio=20)
    with pytest.raises(ConfigError, match="one budget"):
        estimate("mamba-swelu-tiny", tokens=1e6, steps=10)
    six = estimate("mamba-swelu-124m", token_ratio=100, seq_len=1024, micro_batch=16, hardware="rtx4090", gpus=6)
    assert six.tokens_per_step == 6 * 16_384
    assert six.gpu_hours == pytest.approx(6 * six.hours)
    assert six.cost == pytest.approx(six.gpu_hours * HARDWARE["rtx4090"].price_per_hour)


def test_state_memory_accounting():
    n = registry.parameter_count("mamba-swelu-small")
    e = estimate("mamba-swelu-small", precision="fp32", seq_len=64, micro_batch=1, hardware="a100-80")
    m = e.memory
    assert (m["weights"], m["gradients"], m["optimizer"]) == (4 * n, 4 * n, 8 * n)
    two = estimate("mamba-swelu-small", precision="fp32", seq_len=64, micro_batch=1, hardware="a100-80", gpus=2)
    assert two.memory["gradients"] == 8 * n  # + DDP's bucket copy
    ck = estimate("mamba-swelu-small", seq_len=1024, micro_batch=8, hardware="a100-80", checkpointing=True)
    assert ck.activations_checkpointed < ck.activations_full
    assert ck.memory["activations"] == ck.activations_checkpointed


def test_ref_scan_keeps_the_per_step_states():
    fused = estimate("mamba-swelu-small", seq_len=512, micro_batch=2, scan="triton")
    ref = estimate("mamba-swelu-small", seq_len=512, micro_batch=2, scan="ref")
    cfg = registry.build_config("mamba-swelu-small")
    d, n = cfg.expand * cfg.d_model, cfg.d_state
    extra = cfg.n_layers * 2 * 512 * (2 * d * n + d) * 4  # dA_t, h_t and delta_t*u_t in fp32, per step
    states = cfg.n_layers * 2 * 512 * d * n / 16 * 4
    assert ref.activations_full - fused.activations_full == pytest.approx(extra - states, rel=1e-6)


def test_fits_and_suggestions():
    small = estimate("mamba-swelu-tiny", seq_len=256, micro_batch=8, hardware="rtx3090")
    ok, msg = memory_fits(small)
    assert ok and msg.startswith("fits:")
    big = estimate("inl-3b", seq_len=1024, micro_batch=4, hardware="rtx4090")
    ok, msg = memory_fits(big)
    assert not ok and "does not fit" in msg and big.suggestions
    assert big.memory["total"] > HARDWARE["rtx4090"].memory_bytes
    assert any("finetune.method=" in s or "--hardware" in s for s in big.suggestions)


def test_lora_trainable_count_is_peft_count(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = registry.build_config("llama-tiny")
    model = AutoModelForCausalLM.from_config(cfg)
    arch = analyse(cfg)
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, lora_alpha=8))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora_trainable(arch, 4, targets) == trainable
    e = estimate(cfg, method="lora", lora_rank=4, lora_targets=targets, seq_len=32, micro_batch=1)
    assert e.params_trainable == trainable
    assert e.memory["optimizer"] == 8 * trainable


@pytest.mark.parametrize("name,seq,batch,ckpt,loss", [
    ("mamba-swelu-tiny", 256, 8, False, "off"),  # the activation ledger of a MambaSWELU block (fused CPU scan)
    ("llama-tiny", 512, 4, False, "off"),  # the ledger of a Llama layer
    ("inl-tiny", 256, 8, False, "off"),  # traced on the meta device
    ("mamba-swelu-tiny", 512, 16, True, "off"),  # activation checkpointing, one checkpoint per layer
    ("mamba-swelu-tiny", 256, 8, False, "on:16"),  # the chunked loss, 1,024 tokens per chunk of 4,096 logits
    ("llama-tiny", 512, 4, False, "on:4"),
    ("mamba-swelu-tiny", 512, 16, True, "auto:16"),  # auto, with checkpointing: 8,192 tokens > 1,024 per chunk
])
@pytest.mark.slow
def test_memory_model_matches_measured_cpu_peak(name, seq, batch, ckpt, loss):
    """The planner's total for a CPU against the peak resident memory of a real training step, with the loss
    plain and chunked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak")
    mode, _, mb = loss.partition(":")
    chunking = dict(chunked_loss=mode, loss_chunk_mb=float(mb or 256))
    measured = measure_training_peak(name, seq_len=seq, micro_batch=batch, threads=2, checkpointing=ckpt,
                                     **chunking)
    est = estimate(name, seq_len=seq, micro_batch=batch, precision="fp32", hardware=cpu_hardware(),
                   checkpointing=ckpt, **chunking)
    assert (est.loss_chunk is None) == (mode == "off")
    assert measured["params"] == est.params_total
    ratio = est.memory["total"] / measured["peak_bytes"]
    assert 0.85 <= ratio <= 1.15, f"{name}: estimate {est.memory['total']:,} vs measured {measured['peak_bytes']:,}"


def test_estimate_for_run_uses_the_run_config(tmp_path):
    from lmlab.config import load_config
    from lmlab.plan.estimate import estimate_for_run
    from lmlab.runtime import setup_runtime

    cfg = load_config(None, ["model.name=mamba-swelu-tiny", "data.seq_len=64", "train.batch_size=4",
                             "train.grad_accum=2", "train.max_steps=10"])
    e = estimate_for_run(cfg, setup_runtime("cpu", "fp32", threads=2))
    assert (e.seq_len, e.micro_batch, e.grad_accum, e.steps, e.hardware) == (64, 4, 2, 10, "cpu")
    assert e.tokens_per_step == 64 * 4 * 2 and not e.checkpointing
    cfg.train.activation_checkpointing = True
    ck = estimate_for_run(cfg, setup_runtime("cpu", "fp32", threads=2))
    assert ck.checkpointing and ck.memory["activations"] < e.memory["activations"]


def test_cli_plan_json_and_hardware_table(capsys):
    assert main(["estimate", "--model", "mamba-swelu-124m", "--token-ratio", "100", "--batch", "16",
                 "--hardware", "h100", "--json", "--vocab-size", "50257"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params_total"] == 100_917_266  # docs/models.md (GPT-2's vocabulary)
    assert d["steps"] == math.ceil(d["params_total"] * 100 / 16_384)
    assert main(["estimate", "--model", "mamba-swelu-small", "--hardware", "all", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in HARDWARE)
    assert main(["estimate", "--model", "inl-tiny", "--set", "n_iterations=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == registry.parameter_count(
        "inl-tiny", overrides={"n_iterations": 2})


@pytest.mark.slow
def test_cli_measure_reports_both(capsys):
    assert main(["estimate", "--model", "mamba-swelu-tiny", "--seq-len", "64", "--batch", "2", "--measure",
                 "--device", "cpu", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["measured"]
    assert m["peak_bytes"] > 0 and m["estimated_peak_bytes"] > 0 and m["device"] == "cpu"


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--hardware", "tpu"], "--hardware"),
    (["--gpus", "0"], "--gpus"),
    (["--batch", "0"], "--batch"),
    (["--method", "full", "--precision", "4bit"], "4bit"),
    (["--set", "n_layers"], "--set"),
    (["--model", "mamba-swelu-tiny", "--set", "no_such_key=1"], "no_such_key"),
    (["--tokens", "1e9", "--token-ratio", "20"], "one budget"),
    (["--steps", "10", "--tokens", "1e9"], "one budget"),
    (["--steps", "-5"], "--steps"),
    (["--tokens", "inf"], "--tokens"),
    (["--params", "nan"], "--params"),
    (["--method", "qlora", "--precision", "fp32"], "4bit"),
    (["--model", "mamba-swelu-tiny", "--set", "d_model=abc"], "model"),
    (["--model", "mamba-swelu-tiny", "--set", "n_layers=0"], "layer"),
    (["--model", "missing.yaml"], "file not found"),
    (["--measure", "--device", "tpu"], "--device"),
    (["--model", "mamba-swelu-tiny", "--seq-len", "4096"], "max_seq_len"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, fragment, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_cli_subprocess_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lmlab.cli", "estimate", "--model", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "missing.yaml" in res.stderr


def test_big_models_are_analysed_on_the_meta_device():
    arch = analyse("inl-3b")
    assert all(p.device.type == "meta" for p in arch.meta_model.parameters())
    assert arch.params_total > 2e9


# ------------------------------------------------------------------- the planner plans what the trainer trains
def _word_tokenizer(n: int):
    """A real tokenizer of exactly `n` tokens (the last one the end of text), for the trainer's build_model."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n - 1)} | {"<eos>": n - 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                  eos_token="<eos>")
    assert len(tok) == n
    return tok


@pytest.mark.parametrize("name", ["mamba-swelu-tiny", "inl-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_planned_trainable_parameters_are_what_the_trainer_trains(name, method):
    """The trainer's own model and adapters (build_model + add_adapters), counted by requires_grad, against
    the plan the trainer prints before the first step (estimate_for_run)."""
    if method != "full":
        pytest.importorskip("peft")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from lmlab.config import load_config
    from lmlab.models.lora import lora_targets
    from lmlab.plan.estimate import estimate_for_run
    from lmlab.runtime import setup_runtime
    from lmlab.train.setup import build_model

    cfg = load_config(None, [f"model.name={name}", "data.vocab_size=300", "data.seq_len=32", "train.batch_size=2",
                             "train.max_steps=4", "train.objective=sft", f"finetune.method={method}",
                             "finetune.lora_rank=4"])
    model = build_model(cfg, _word_tokenizer(300))
    total = sum(p.numel() for p in model.parameters())
    targets = lora_targets(model)
    if method != "full":
        from lmlab.train.adapters import add_adapters

        model = add_adapters(model, cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = estimate_for_run(cfg, setup_runtime("cpu", "fp32", threads=2))
    assert plan.params_total == total and plan.vocab_size == 300
    assert plan.method == method and plan.params_trainable == trained
    assert plan.memory["optimizer"] == 8 * trained and plan.memory["gradients"] == 4 * trained
    if method != "full":
        assert plan.lora_targets == targets and trained < total
        assert f"{trained:,} trainable of {total:,}" in memory_fits(plan)[1]


def test_plan_counts_the_optimizer_the_objective_and_the_strategy():
    """SGD keeps one state (none without momentum); full DPO keeps a frozen reference copy and runs chosen and
    rejected together; with adapters the reference is the base (no copy); ZeRO-2 splits gradients and state."""
    kw = dict(seq_len=64, micro_batch=2, hardware="cpu", precision="fp32")
    adam = estimate("llama-tiny", **kw)
    n = adam.params_total
    assert adam.memory["optimizer"] == 8 * n and "reference" not in adam.memory
    assert estimate("llama-tiny", optimizer="sgd", **kw).memory["optimizer"] == 4 * n
    assert estimate("llama-tiny", optimizer="sgd", momentum=0.0, **kw).memory["optimizer"] == 0
    dpo = estimate("llama-tiny", objective="dpo", **kw)
    assert dpo.memory["reference"] == 4 * n
    assert dpo.activations_full == estimate("llama-tiny", **{**kw, "micro_batch": 4}).activations_full
    lora_dpo = estimate("llama-tiny", objective="dpo", method="lora", **kw)
    assert "reference" not in lora_dpo.memory
    assert estimate("llama-tiny", objective="simpo", **kw).memory.get("reference") is None  # reference-free
    with pytest.raises(ConfigError, match="train.optimizer"):
        estimate("llama-tiny", optimizer="lion", **kw)
    gpu = dict(seq_len=512, micro_batch=1, hardware="rtx4090", gpus=6, precision="bf16")
    assert estimate("llama-tiny", strategy="zero2", **gpu).memory["optimizer"] == 8 * n // 6


def test_memory_line_plans_the_runs_method(tmp_path):
    """The line before a LoRA run's first step plans LoRA (adapter states), not full fine-tuning."""
    from lmlab.config import load_config
    from lmlab.plan.estimate import estimate_for_run, memory_line
    from lmlab.runtime import setup_runtime

    rt = setup_runtime("cpu", "fp32", threads=2)
    over = ["model.name=llama-tiny", "data.seq_len=64", "train.max_steps=4", "train.objective=sft"]
    full = estimate_for_run(load_config(None, over), rt)
    lora = estimate_for_run(load_config(None, [*over, "finetune.method=lora"]), rt)
    assert lora.method == "lora" and lora.memory["optimizer"] < full.memory["optimizer"] / 10
    line = memory_line(load_config(None, [*over, "finetune.method=lora"]), rt)
    assert line.startswith("memory    fits:") and "trainable of" in line and "lora r=16" in line
    sgd = estimate_for_run(load_config(None, [*over, "train.optimizer=sgd", "train.momentum=0"]), rt)
    assert sgd.memory["optimizer"] == 0


def test_cli_estimate_says_the_vocabulary_and_plans_pretraining_fixes(capsys):
    """A named size is planned with the tokenizer `lmlab pretrain` uses by default, and the plan says so;
    a plan for pretraining from scratch never suggests LoRA; several GPUs: DeepSpeed ZeRO-2 is named."""
    from lmlab.config import DataConfig

    assert main(["estimate", "--model", "mamba-swelu-124m", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    default = DataConfig()
    assert d["vocab_size"] == default.vocab_size and default.tokenizer in d["tokenizer"]
    built = registry.build_model(registry.build_config("mamba-swelu-124m", vocab_size=default.vocab_size),
                                 device="meta")
    assert d["params_total"] == registry.count_parameters(built) == 53_648_402
    assert main(["estimate", "--model", "mamba-swelu-124m"]) == 0
    assert "vocabulary" in capsys.readouterr().out
    assert main(["estimate", "--model", "inl-3b", "--hardware", "rtx4090", "--gpus", "6", "--batch", "1",
                 "--seq-len", "512", "--grad-accum", "8", "--checkpointing", "--precision", "bf16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert not d["fits"] and d["suggestions"]
    assert not any("finetune.method" in s for s in d["suggestions"])
    assert any("train.strategy=deepspeed train.zero_stage=2" in s for s in d["suggestions"])
    assert main(["estimate", "--model", "mamba-swelu-124m", "--tokenizer", "stdlib-bpe", "--vocab-size", "8192",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 8192


def test_the_loss_term_follows_the_chunked_loss():
    """Plain: b·s·V·12 bytes. Chunked (train.chunked_loss on, or auto once a micro batch's fp32 logits exceed
    train.loss_chunk_mb): one chunk's logits turned into their softmax, c·V·(4, + 2 in 16-bit), and the head
    weight's fp32 gradient, V·d·4."""
    from lmlab.config import load_config
    from lmlab.plan.estimate import estimate_for_run
    from lmlab.runtime import setup_runtime

    kw = dict(seq_len=1024, hardware="h100", precision="bf16", vocab_size=50257, overrides={"max_seq_len": 1024})
    V, arch = 50257, analyse("mamba-swelu-tiny", 50257, {"max_seq_len": 1024})
    d = arch.d_model
    plain = estimate("mamba-swelu-tiny", micro_batch=8, chunked_loss="off", **kw)
    assert plain.loss_chunk is None and plain.activation_items["logits and loss"] == 8 * 1024 * V * 12
    chunk = 256 * 2 ** 20 // (4 * V)  # 1,335 tokens
    for mode in ("on", "auto"):
        e = estimate("mamba-swelu-tiny", micro_batch=8, chunked_loss=mode, **kw)
        assert e.loss_chunk == chunk
        assert e.activation_items[f"loss, chunked ({chunk:,} tokens at a time)"] == chunk * V * 6 + V * d * 4  # bf16
        saved = 8 * 1024 * V * 12 - (chunk * V * 6 + V * d * 4)
        assert plain.memory["activations"] - e.memory["activations"] == saved
        assert plain.memory["total"] - e.memory["total"] == saved
    small = estimate("mamba-swelu-tiny", micro_batch=1, chunked_loss="auto", **kw)  # 1,024 tokens: one chunk
    assert small.loss_chunk is None and "logits and loss" in small.activation_items
    assert estimate("mamba-swelu-tiny", micro_batch=1, chunked_loss="on", **kw).loss_chunk == chunk
    assert estimate("mamba-swelu-tiny", micro_batch=8, chunked_loss="auto", loss_chunk_mb=4096, **kw).loss_chunk \
        is None  # 8,192 tokens × V × 4 B < 4 GiB
    dpo = estimate("mamba-swelu-tiny", micro_batch=1, objective="dpo", **kw)  # chosen + rejected: 2,048 tokens
    assert dpo.loss_chunk == chunk
    head = estimate("llama-tiny", seq_len=512, micro_batch=16, method="lora", lora_targets=["q_proj", "lm_head"],
                    chunked_loss="on", hardware="h100")
    assert head.loss_chunk is None  # an adapted head: the plain path
    with pytest.raises(ConfigError, match="train.chunked_loss"):
        estimate("llama-tiny", chunked_loss="maybe")
    rt = setup_runtime("cpu", "fp32", threads=2)
    over = ["model.name=mamba-swelu-tiny", "data.seq_len=512", "train.batch_size=16", "train.max_steps=4"]
    assert estimate_for_run(load_config(None, over), rt).loss_chunk is None  # 8,192 tokens: 128 MiB of logits
    big = estimate_for_run(load_config(None, [*over, "train.batch_size=64"]), rt)
    assert big.loss_chunk == 256 * 2 ** 20 // (4 * 4096)
    assert estimate_for_run(load_config(None, [*over, "train.batch_size=64", "train.chunked_loss=off"]),
                            rt).loss_chunk is None
    assert estimate_for_run(load_config(None, [*over, "train.loss_chunk_mb=8"]), rt).loss_chunk == 512


def test_cpu_plan_suggests_bf16_only_where_the_cpus_bf16_matmuls_are_faster(monkeypatch):
    """bf16 instructions alone are not enough: oneDNN's AVX512-BF16 kernels without AMX ran 0.6x fp32's matmuls."""
    from lmlab import runtime

    def notes(precision="fp32"):
        return estimate("mamba-swelu-tiny", seq_len=64, micro_batch=2, hardware="cpu", precision=precision).notes

    monkeypatch.setattr(runtime, "cpu_bf16", lambda: "AVX512-BF16")
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 2.4)
    assert any("train.precision=bf16 is faster on this CPU (AVX512-BF16; bf16 matmuls measured 2.4x fp32's)" in n
               for n in notes())
    assert not any("bf16 is faster" in n for n in notes("bf16"))
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 0.6)
    assert not any("bf16" in n for n in notes())
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: None)
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 2.4)
    assert not any("bf16" in n for n in notes())


def test_the_trainers_memory_line_times_no_matmuls(monkeypatch):
    """The precision note is for `lmlab estimate`; the memory line at a run's start neither shows it nor pays for
    the bf16 probe."""
    from lmlab import runtime
    from lmlab.config import load_config
    from lmlab.plan.estimate import estimate_for_run

    probed = []
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: "AMX")
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: probed.append(1) or 4.0)
    cfg = load_config(None, ["model.name=mamba-swelu-tiny", "data.seq_len=64", "train.max_steps=10"])
    e = estimate_for_run(cfg, runtime.setup_runtime("cpu", "fp32", threads=2))
    assert e.precision == "fp32" and not probed and not any("bf16" in n for n in e.notes)
    assert any("bf16 is faster" in n for n in estimate("mamba-swelu-tiny", seq_len=64, hardware="cpu").notes)
    assert probed == [1]


def test_the_bf16_matmul_probe_measures_once_per_thread_count(monkeypatch):
    import torch

    from lmlab import runtime

    runtime._matmul_speedup.cache_clear()
    dtypes, real = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: dtypes.append(a.dtype) or real(a, b))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = runtime.cpu_bf16_matmul_speedup()
        assert first > 0 and dtypes.count(torch.float32) == 4 and dtypes.count(torch.bfloat16) == 4
        assert runtime.cpu_bf16_matmul_speedup() == first and len(dtypes) == 8
        torch.set_num_threads(2)
        runtime.cpu_bf16_matmul_speedup()
        assert len(dtypes) == 16
    finally:
        torch.set_num_threads(before)
        runtime._matmul_speedup.cache_clear()


def test_fp16_on_cpu_is_refused_with_the_precision_that_is_fast_here(monkeypatch):
    import torch

    from lmlab import runtime

    monkeypatch.setattr(runtime, "cpu_bf16", lambda: "AMX")
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 4.0)
    with pytest.raises(ConfigError, match=r"bf16 is faster than fp32 on this CPU \(AMX; bf16 matmuls measured 4.0x"):
        runtime.pick_precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 0.6)
    with pytest.raises(ConfigError, match="fp32 is the fast choice on this CPU"):
        runtime.pick_precision("fp16", torch.device("cpu"))
