"""LoRA and QLoRA reach every default target of every family: each adapter gets a gradient and moves the output."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lmlab.models import build_config, build_model
from lmlab.models.lora import DEFAULT_LORA_TARGETS, lora_targets

V = 64
FAMILIES = {
    "mamba-swelu-tiny": {},
    "mamba-swelu-tiny/simplified": dict(mixer="simplified", swelu_k_param="abs", swelu_lambda=False),
    "inl-tiny": {},
    "inl-tiny/projection": dict(context="projection"),
    "inl-tiny-v1": {},
    "llama-tiny": {},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


def _model(key: str):
    name = key.split("/")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = build_config(name, vocab_size=V, overrides=dict(FAMILIES[key]))
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("key", list(FAMILIES))
def test_every_default_target_gets_gradients_and_changes_the_output(key):
    model = _model(key)
    targets = lora_targets(model)
    mt = model.config.model_type
    expected = [t for t in DEFAULT_LORA_TARGETS[mt] if any(n.endswith("." + t) for n, _ in model.named_modules())]
    if FAMILIES[key].get("mixer") == "simplified":
        expected = [t for t in expected if t not in ("x_proj", "dt_proj")]
    assert targets == expected and targets
    ids = torch.randint(0, V, (2, 11))
    base = model(input_ids=ids).logits.detach()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    b_weights = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b_weights.values():
            p.normal_(0.0, 0.1)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    adapters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    no_grad = [n for n, p in adapters.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"adapters without gradient: {no_grad}"
    with torch.no_grad():
        full = peft_model(input_ids=ids).logits
        assert (full - base).abs().max() > 1e-6
        # in float64, so a small but real effect (dt_proj's, through softplus, in a tiny model: ~1e-7) stands
        # far above rounding on every CPU
        peft_model.double()
        full = peft_model(input_ids=ids).logits
        inert = []
        for name, p in b_weights.items():  # switching one adapter off moves the output
            saved = p.clone()
            p.zero_()
            if (peft_model(input_ids=ids).logits - full).abs().max() <= 1e-12:
                inert.append(name)
            p.copy_(saved)
    assert not inert, f"adapters that do not change the output: {inert}"


def test_fallback_targets_every_linear_but_the_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    assert "lm_head" not in lora_targets(model)
    tiny = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert lora_targets(tiny) == ["0", "2"]


def _bnb_cpu_4bit() -> str | None:
    """None if bitsandbytes runs NF4 forward and backward on CPU here, else why not."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(8, 4, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        x = torch.randn(2, 8, requires_grad=True)
        layer(x).sum().backward()
        if not getattr(layer.weight, "bnb_quantized", False):
            return "bitsandbytes did not quantise the weight on CPU"
    except Exception as e:  # noqa: BLE001 (any failure means: no CPU 4-bit here)
        return f"bitsandbytes cannot run NF4 on this CPU: {type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("key", ["mamba-swelu-tiny", "inl-tiny", "llama-tiny"])
def test_qlora_trains_on_cpu(key, tmp_path):
    why = _bnb_cpu_4bit()
    if why:
        pytest.skip(why)
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _model(key).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised
    targets = lora_targets(model)
    assert all(any(n.endswith("." + t) for n in quantised) for t in targets)  # adapters sit on 4-bit layers
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()  # as the trainer does (in eval, bitsandbytes may repack CPU 4-bit weights in place)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 12))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


QUIET = """
import logging, sys, warnings
import torch
from lmlab.config import load_config
from lmlab.data.tokenizer import load_tokenizer
from lmlab.models import build_config, build_model
from lmlab.models.export import export
from lmlab.train.adapters import add_adapters, quiet_loading
from lmlab.train.setup import build_model as build_base
torch.set_num_threads(1)
tok = load_tokenizer(sys.argv[1])
out = sys.argv[2]
model = build_model(build_config("llama-tiny", vocab_size=len(tok)))
export(model, tok, out)
cfg = load_config(None, [f"model.name={out}", f"data.tokenizer={out}", "finetune.method=qlora"])
print("=== from here", file=sys.stderr, flush=True)
add_adapters(build_base(cfg, tok), cfg)
with quiet_loading():  # errors still reach the user
    logging.getLogger("bitsandbytes.backends.cpu.ops").error("a real bitsandbytes error")
    logging.getLogger("kernels._internals.hf_hub").error("a real kernels error")
    warnings.warn("another warning", UserWarning)
"""


@pytest.mark.slow
def test_loading_and_adapters_leave_out_the_known_noise(tmp_path):
    """In a fresh process (bitsandbytes speaks once, on import): loading a base and giving it QLoRA adapters prints
    neither transformers' progress bar, bitsandbytes' line about its Hub kernel, the `kernels` package's offline
    publisher note (with transformers >= 5.25) nor the is_gradient_checkpointing FutureWarning; errors and other
    warnings still print."""
    import subprocess
    import sys

    from lmlab.data.tokenizer import train_bpe

    train_bpe("stdlib", 300, tmp_path / "tok", max_chars=50_000)
    r = subprocess.run([sys.executable, "-c", QUIET, str(tmp_path / "tok"), str(tmp_path / "base")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    said = (r.stdout + r.stderr).split("=== from here", 1)[1]
    for noise in ("Loading weights", "kernels-community", "is_gradient_checkpointing"):
        assert noise not in said, said
    assert "a real bitsandbytes error" in said and "a real kernels error" in said and "another warning" in said
