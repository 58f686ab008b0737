"""LoRA and QLoRA adapters through `peft` (finetune.method lora | qlora).

    model = add_adapters(model, cfg)     # a peft PeftModel: only the adapters train

LoRA: rank `finetune.lora_rank`, scale `lora_alpha / lora_rank`, dropout `lora_dropout`, on the modules whose
names end with `finetune.lora_targets` (default: the family's, `lmlab.models.lora.lora_targets`).
QLoRA: first every Linear layer but the output head becomes a `bitsandbytes` 4-bit NF4 layer (weights
quantised in blocks of 64 with double quantisation, computed in fp32 on CPU, in the autocast dtype on GPU),
frozen; then LoRA on top. The same replacement serves every family: lmlab's own models call their Linear
modules (never read `.weight`), so a 4-bit layer in their place takes part in forward and backward.
bitsandbytes runs NF4 forward/backward on x86 CPUs too, so QLoRA trains (slowly) without a GPU.

The adapter initialisation is drawn from `train.seed`, so a run and its resumption build identical models.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the known noise of loading a model and giving it adapters, at its source, for the duration:
    transformers' "Loading weights" progress bar, bitsandbytes' log line when its CPU kernel cannot be loaded
    from the Hub (a CPU fallback is used), the `kernels` package's note that it skips the publisher check offline
    (transformers 5.25 installs `kernels`), transformers' FutureWarning that peft's call of
    `is_gradient_checkpointing` is deprecated. Errors, and every other warning, pass as before."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


def add_adapters(model: nn.Module, cfg) -> nn.Module:
    with quiet_loading():
        return _add_adapters(model, cfg)


def _add_adapters(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from ..models.lora import lora_targets

    ft = cfg.finetune
    if ft.method not in ("lora", "qlora"):
        raise ConfigError(f"finetune.method: {ft.method!r} takes no adapters")
    targets = list(ft.lora_targets) or lora_targets(model)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        raise ConfigError(f"finetune.lora_targets: {', '.join(missing) or '(none)'} not found in "
                          f"{type(model).__name__}; its Linear layers end with: "
                          f"{', '.join(sorted(_linear_suffixes(model)))}")
    if ft.method == "qlora":
        quantize_4bit(model)
    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    devices = torch.random.fork_rng(devices=[])  # the adapters' init draws from the seed, not the run's stream
    with devices:
        torch.manual_seed(cfg.train.seed + 1)
        return get_peft_model(model, lcfg)


def _linear_suffixes(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace every nn.Linear but the output head with a frozen bitsandbytes NF4 Linear4bit; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("finetune.method=qlora needs bitsandbytes (pip install bitsandbytes)") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = [(name, mod) for name, mod in model.named_modules()
             if type(mod) is nn.Linear and mod is not head and not name.endswith("lm_head")]
    for name, lin in swaps:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(torch.float32).contiguous(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(lin.weight.device if lin.weight.device.type != "meta" else "cpu")  # quantises the weight
        # bitsandbytes repacks a CPU layer's 4-bit weight in place for its AVX512-BF16 kernel on the first eval
        # forward, and unpacks it on the next training one: every validation would pay both, and layers
        # narrower than a block fail to repack ("shape '[128, 0]' is invalid"). Training keeps one layout.
        q.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    if not swaps:
        raise ConfigError(f"finetune.method=qlora: {type(model).__name__} has no Linear layer to quantise")
    return len(swaps)


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(1, total):.2f}%)"


# ------------------------------------------------------------------------------------------- names that moved
