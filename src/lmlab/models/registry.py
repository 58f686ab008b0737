"""Named model sizes and how a model name becomes a model.

A model name is one of:
  * a named size of one of lmlab's families (`lmlab models` lists them), e.g. `mamba-swelu-tiny`;
  * a local folder holding a Hugging Face causal LM (config.json + weights), e.g. a run's `final/`;
  * a Hugging Face hub id such as `meta-llama/Llama-3.2-1B` (needs the network, or the local HF cache).

Families register with `register_family`; each brings its config class, model class and sizes
(keyword arguments of the config class). Overrides from the run config (`model.d_model=512`) are
checked against the config class's parameters before anything is built.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from .. import hub
from ..errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    sizes: dict[str, dict[str, Any]]
    description: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # per-size remarks shown by `lmlab models`


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    FAMILIES[family.name] = family


def named_sizes() -> dict[str, Family]:
    return {size: fam for fam in FAMILIES.values() for size in fam.sizes}


def describe_kind(name: str) -> str:
    """'named', 'local' or 'hub' — or raise ConfigError naming the allowed values."""
    if name in named_sizes():
        return "named"
    if os.path.isdir(name):
        return "local"
    close = difflib.get_close_matches(name, named_sizes(), n=1, cutoff=0.8)
    # `org/name`; a bare legacy id (`gpt2`) only where it can be had: cached, or the hub is allowed
    if hub.is_hub_id(name) and not close and ("/" in name or not hub.offline() or hub.cached(name)):
        return "hub"
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"model.name: unknown model {name!r}; {hint}allowed: {', '.join(named_sizes())}, "
                      f"a local model folder, or a Hugging Face hub id (org/name)")


def config_parameters(config_cls: type[PretrainedConfig]) -> list[str]:
    return [p for p in inspect.signature(config_cls.__init__).parameters if p not in ("self", "kwargs")]


def build_config(name: str, vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
                 ) -> PretrainedConfig:
    """Config of a named size with `overrides` applied; vocab_size follows the tokenizer when given."""
    fam = named_sizes().get(name)
    if fam is None:
        describe_kind(name)  # raises for unknown names
        raise ConfigError(f"model.name: {name!r} is not a named size (use load_model for folders and hub ids)")
    kwargs = dict(fam.sizes[name])
    allowed = config_parameters(fam.config_cls)
    for key, value in (overrides or {}).items():
        if key not in allowed:
            raise ConfigError(f"model.{key}: unknown key for {fam.name}; allowed: {', '.join(allowed)}")
        kwargs[key] = value
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    try:
        return fam.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: invalid value for {name}: {e}") from None


def training_refusal(config: PretrainedConfig) -> str | None:
    """Why a model of this config cannot be trained, or None. A config that lets a token see later tokens or the
    rest of the batch (INL's `leaky` options: the original V0 code, the `-v0` sizes) is for evaluation only: its
    forward refuses gradients, and the loss it would minimise is not next-token prediction."""
    leaky = getattr(config, "leaky", "")
    if isinstance(leaky, str) and leaky:
        return f"{leaky} let each token see later tokens or the rest of its batch, so it is for evaluation only"
    return None


def check_trainable(name: str, config: PretrainedConfig) -> None:
    """ConfigError (one line, before any data is prepared) when `config`, the resolved config of model `name`
    for a training run, cannot be trained; evaluation, generation and `lmlab models` never call this."""
    why = training_refusal(config)
    if why is None:
        return
    base = name[:-3] if name.endswith("-v0") else None
    alt = f"train {base} or {base}-v1, or " if base and base in named_sizes() else ""
    raise ConfigError(f"model.name: {name} cannot be trained: {why}; {alt}set model.context_mean=causal "
                      f"model.alpha_form=rms to train this architecture causally")


def build_model(config: PretrainedConfig, device: str | torch.device | None = None) -> PreTrainedModel:
    """A freshly initialised model of an lmlab family (on the meta device if device='meta')."""
    for fam in FAMILIES.values():
        if isinstance(config, fam.config_cls):
            if device is not None and str(device) == "meta":
                with torch.device("meta"):
                    return fam.model_cls(config)
            model = fam.model_cls(config)
            return model.to(device) if device is not None else model
    return _auto_from_config(config)


def _auto_from_config(config: PretrainedConfig) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_count(name: str, vocab_size: int | None = None, overrides: dict[str, Any] | None = None) -> int:
    """Exact parameter count of a named size, built on the meta device (no memory, any size)."""
    return count_parameters(build_model(build_config(name, vocab_size, overrides), device="meta"))
