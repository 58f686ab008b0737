"""Any Hugging Face causal LM, by local folder or hub id, and one cached-decoding interface for all models.

    load_model("runs/x/final")              a folder with config.json + weights (lmlab's own models included)
    load_model("meta-llama/Llama-3.2-1B")   a hub id: the local HF cache first, then the hub if reachable

Offline first: a hub id that is not in the local cache fails at once with a ConfigError when
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or when the hub's model API does not answer over
verified HTTPS within `lmlab.hub.PROBE_TIMEOUT_S` seconds — instead of transformers' own retries (about
25 s with no network). An id the hub does not know fails just as fast.
Code shipped inside a model folder (`auto_map` in config.json) runs only with trust_remote_code=True.

Decoding: `new_cache(model)` and `forward_cached(model, ids, cache)` hide the difference between lmlab's
models (`model.new_cache()`, `model(ids, cache=...)`) and transformers' own (`DynamicCache`,
the cache keyword of the installed transformers): prefill with the prompt, then feed one token at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .. import hub
from .._compat import HF_CACHE_KWARG
from ..errors import ConfigError
from ..fsutil import first_line


# ------------------------------------------------------------------------------------------- loading
def load_model(name_or_path: str, *, trust_remote_code: bool = False, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> PreTrainedModel:
    """A causal LM from a local folder or a hub id.

    dtype: None (transformers' default), 'auto' (as saved), 'float32', 'bfloat16', 'float16' or a torch dtype.
    """
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    model = _load(AutoModelForCausalLM.from_pretrained, name_or_path, trust_remote_code, kwargs)
    return model.to(device) if device is not None else model


def load_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a local folder or hub id, with the same offline behaviour as `load_model`."""
    return _load(AutoConfig.from_pretrained, name_or_path, trust_remote_code, {})


def is_lmlab_model(model: torch.nn.Module) -> bool:
    """True for lmlab's own architectures (MambaSWELU, INL-LLM), whose decoding uses `model.new_cache()`.

    The llama baselines are plain transformers models and answer False. Read from the capability the
    model class declares, so a model wrapped by PEFT or loaded through `auto_map` answers the same.
    """
    return bool(getattr(model, "supports_recurrent_cache", False))


def _load(loader, name: str, trust_remote_code: bool, kwargs: dict):
    name = os.fspath(name)  # lmlab's configs are registered: this module lives in lmlab.models
    if os.path.isdir(name):
        _check_remote_code(Path(name), trust_remote_code)
        return _call(loader, name, trust_remote_code, kwargs, local_files_only=True)
    if not hub.is_hub_id(name):
        raise ConfigError(f"model.name: folder {name!r} does not exist")
    try:  # a hub id: the local Hugging Face cache first, without touching the network
        return _call(loader, name, trust_remote_code, kwargs, local_files_only=True)
    except _NotCached:
        pass
    status = None if hub.offline() else hub.status(name)
    if status is None or status >= 500:
        raise ConfigError(f"model.name: {name!r} not found locally and the Hugging Face hub is unreachable "
                          f"(offline?); pass a local folder")
    if status in (401, 403, 404):
        raise ConfigError(f"model.name: {name!r} is neither a local folder nor a model on the Hugging Face "
                          f"hub (or it is private: log in with `hf auth login` or set HF_TOKEN)")
    return _call(loader, name, trust_remote_code, kwargs, local_files_only=False)


class _NotCached(Exception):
    pass


def _call(loader, name: str, trust_remote_code: bool, kwargs: dict, local_files_only: bool):
    import contextlib

    from ..hub import cache_only

    try:  # cache only: no request (and no retries) for the optional files transformers still asks the hub about
        with cache_only() if local_files_only else contextlib.nullcontext():
            return loader(name, trust_remote_code=trust_remote_code, local_files_only=local_files_only, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(_remote_code_message(name)) from None
        raise ConfigError(f"model.name: {name!r}: {first_line(e)}") from None
    except OSError as e:
        if local_files_only and not os.path.isdir(name):
            raise _NotCached() from e
        raise ConfigError(f"model.name: {name!r}: {first_line(e)}") from None


def _check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """A folder whose config names its own code (auto_map) for an architecture transformers lacks."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers reports a missing or broken config.json itself
    if trust_remote_code or "auto_map" not in cfg:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if cfg.get("model_type") not in CONFIG_MAPPING:
        raise ConfigError(_remote_code_message(str(folder)))


def _remote_code_message(name: str) -> str:
    return (f"model.trust_remote_code: {name!r} ships its own model code, which lmlab does not run "
            f"unless asked; pass model.trust_remote_code=true if you trust it")


def _dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"model.dtype: unknown dtype {dtype!r}; allowed: auto, {', '.join(names)}")
    return names[dtype]


# ------------------------------------------------------------------------------------------- decoding
def new_cache(model: PreTrainedModel):
    """An empty decoding cache for any causal LM: lmlab's own, or transformers' DynamicCache."""
    if is_lmlab_model(model):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def forward_cached(model: PreTrainedModel, input_ids: torch.LongTensor, cache) -> torch.Tensor:
    """Logits (b, l, V) for `input_ids` (b, l) continuing from `cache`, which advances by l tokens."""
    if is_lmlab_model(model):
        return model(input_ids, cache=cache).logits
    return model(input_ids=input_ids, use_cache=True, **{HF_CACHE_KWARG: cache}).logits
