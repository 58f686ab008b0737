"""The planner's view of a model: built on the meta device (nothing allocated, any size) and read.

    arch = analyse("mamba-swelu-124m", vocab_size=4096)    # a named size, run config, config.json, folder or hub id
    arch.params_total, arch.linears, arch.n_layers
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class Arch:
    """What the planner reads from a model built on the meta device."""

    label: str
    config: Any
    model_type: str
    params_total: int
    params_matmul: int  # parameters used in matmuls (the LM head counted even when tied)
    params_linear_weights: int  # weights of nn.Linear (what autocast copies to bf16)
    params_quantizable: int  # Linear weights except the output head (what QLoRA stores in NF4)
    largest_linear: int  # parameters of the largest Linear (QLoRA dequantises one at a time)
    linears: list[tuple[str, int, int]]  # (qualified name, in_features, out_features)
    n_layers: int
    d_model: int
    vocab: int
    attn_layers: int  # layers with softmax attention over the sequence
    attn_impl: str  # sdpa | eager | flash_attention_2 | none
    meta_model: nn.Module | None = None
    run_defaults: dict[str, Any] = field(default_factory=dict)
    traces: dict[Any, tuple[float, float]] = field(default_factory=dict)  # what -> (per layer, outside the layers)
    shallow: tuple[nn.Module, ...] | None = None  # copies with 1 and 2 layers, () if the config cannot say so


def _first_attr(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def load_model_config(model: Any, vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
                      trust_remote_code: bool = False) -> tuple[Any, str, dict[str, Any]]:
    """(PretrainedConfig, label, run defaults) for a named size, a run config YAML, an HF config.json,
    a local model folder or a hub id (or a PretrainedConfig passed through)."""
    from transformers import PretrainedConfig

    from ..models import registry  # importing lmlab.models registers the families

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "name_or_path", "") or model.model_type, {}
    name = str(model)
    if name in registry.named_sizes():
        return registry.build_config(name, vocab_size, overrides), name, {}
    if os.path.isfile(name):
        if name.endswith((".yaml", ".yml")):
            return _from_run_config(name, vocab_size, overrides)
        if name.endswith(".json"):
            try:
                with open(name) as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{name}: not a readable JSON file ({e})") from None
            if isinstance(d, dict) and "model_type" in d:
                from transformers import AutoConfig

                d = {**d, **(overrides or {})}
                if vocab_size is not None:
                    d["vocab_size"] = vocab_size
                try:
                    return AutoConfig.for_model(**d), name, {}
                except (ValueError, KeyError, TypeError) as e:
                    raise ConfigError(f"{name}: not a valid {d['model_type']!r} config ({e})") from None
            if isinstance(d, dict) and "model" in d:
                return _from_run_config(name, vocab_size, overrides)
            raise ConfigError(f"{name}: expected a Hugging Face config.json (with model_type) or an lmlab run config")
        raise ConfigError(f"{name}: expected a .yaml/.yml run config or a .json model config")
    if name.endswith((".yaml", ".yml", ".json")):
        raise ConfigError(f"{name}: file not found")
    kind = registry.describe_kind(name)  # raises ConfigError for unknown names
    from ..models.hf import load_config

    cfg = load_config(name, trust_remote_code=trust_remote_code)
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    return cfg, name if kind == "local" else name, {}


def _from_run_config(path: str, vocab_size, overrides) -> tuple[Any, str, dict[str, Any]]:
    from ..config import load_config as load_run_config

    cfg = load_run_config(path)
    mcfg, label, _ = load_model_config(cfg.model.name, vocab_size or _run_vocab(cfg),
                                       {**cfg.model.overrides, **(overrides or {})}, cfg.model.trust_remote_code)
    t = cfg.train
    defaults = {"seq_len": cfg.data.seq_len, "micro_batch": t.batch_size, "grad_accum": t.grad_accum,
                "tokens": t.max_tokens, "token_ratio": t.token_ratio, "steps": t.max_steps}
    if t.precision in ("fp32", "bf16", "fp16"):
        defaults["precision"] = t.precision
    defaults["checkpointing"] = t.activation_checkpointing
    return mcfg, f"{label} ({path})", defaults


def default_tokenizer() -> tuple[int, str]:
    """(vocabulary, description) of the tokenizer a named size gets when nothing names one: the run config's
    default (`lmlab pretrain --model NAME` trains with it)."""
    from ..config import DataConfig

    d = DataConfig()
    return d.vocab_size, f"{d.tokenizer}, the default data.tokenizer of lmlab pretrain"


def run_tokenizer(cfg) -> tuple[int | None, str]:
    """(vocabulary, description) a run config's named size gets from its tokenizer: read from the config for
    the embedded stdlib-bpe, from the tokenizer itself for a local folder or a cached hub id. None when it
    cannot be known without the network (then the model config's vocabulary is planned, and said so), or when
    the model is pretrained (its vocabulary is its own)."""
    from ..models import registry

    if cfg.model.name not in registry.named_sizes():
        return None, "the model's own vocabulary"
    tok = cfg.data.tokenizer
    if tok == "stdlib-bpe":
        return cfg.data.vocab_size, "stdlib-bpe, data.vocab_size"
    from .. import hub

    if os.path.exists(tok) or (hub.is_hub_id(tok) and hub.cached(tok)):
        try:
            from ..data.tokenizer import load_tokenizer

            n = len(load_tokenizer(tok))
            return n, tok
        except Exception:  # noqa: BLE001 - an unreadable tokenizer: the trainer will say why; plan the config's
            pass
    return None, f"{tok} (not readable here: the model config's vocabulary is planned)"


def _run_vocab(cfg) -> int | None:
    """The vocabulary a named size gets from the run's tokenizer (`run_tokenizer`), None when unknown."""
    return run_tokenizer(cfg)[0]


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    from ..models import registry

    try:
        for fam in registry.FAMILIES.values():
            if isinstance(config, fam.config_cls):
                return registry.build_model(config, device="meta")
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model: cannot build {config.model_type!r} as a causal LM ({e})") from None


def analyse(model: Any = "mamba-swelu-124m", vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
            trust_remote_code: bool = False) -> Arch:
    """Build the model on the meta device and read what the planner needs (no memory, any size)."""
    from ..models.registry import count_parameters

    cfg, label, defaults = load_model_config(model, vocab_size, overrides, trust_remote_code)
    m = meta_model(cfg, trust_remote_code)
    out_emb = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    linears, mm, lin_w, quant, largest = [], 0, 0, 0, 0
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Embedding):
            continue
        mm += sum(p.numel() for p in mod.parameters(recurse=False))
        shape = _linear_shape(mod)
        if shape is not None:
            linears.append((name, *shape))
            w = shape[0] * shape[1]
            lin_w += w
            if mod is not out_emb:
                quant += w
                largest = max(largest, w)
    mt = getattr(cfg, "model_type", "") or type(cfg).__name__
    n_layers = int(_first_attr(cfg, "num_hidden_layers", "n_layers", "n_layer", default=0))
    if n_layers < 1:
        raise ConfigError(f"model: {label} has {n_layers} layers; it needs at least one")
    d = int(_first_attr(cfg, "hidden_size", "d_model", "n_embd", default=0))
    has_attn = bool(_first_attr(cfg, "num_attention_heads", "n_heads", "n_head", default=0))
    if mt.startswith("inl") and getattr(cfg, "context", "attention") != "attention":
        has_attn = False
    if "mamba" in mt:
        has_attn = False
    impl = getattr(cfg, "_attn_implementation", None) or ("sdpa" if has_attn else "none")
    return Arch(label=label, config=cfg, model_type=mt, params_total=count_parameters(m), params_matmul=mm,
                params_linear_weights=lin_w, params_quantizable=quant, largest_linear=largest, linears=linears,
                n_layers=n_layers, d_model=d, vocab=int(cfg.vocab_size), attn_layers=n_layers if has_attn else 0,
                attn_impl=impl if has_attn else "none", meta_model=m, run_defaults=defaults)


def _linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "weight"):  # GPT-2 style (in, out) weight
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return None




def position_limit(config) -> tuple[str, int] | None:
    """(config key, longest sequence) for models with a hard position limit (learned positions)."""
    for key in ("max_seq_len", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return key, v
    if getattr(config, "model_type", "") in ("gpt2", "gpt_neo", "opt", "bloom") and \
            isinstance(getattr(config, "max_position_embeddings", None), int):
        return "max_position_embeddings", config.max_position_embeddings
    return None

