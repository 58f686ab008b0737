"""What lmlab's own model families share: the output type, the decoding hooks for `generate`, document
positions, the language-model loss, norms and the inverse activations used to initialise raw parameters.

Every family declares its capabilities as class attributes, so callers never inspect code objects:
`supports_packed_documents` (forward takes `seq_idx` and keeps packed documents apart) and
`supports_recurrent_cache` (forward takes `cache` from `new_cache()` and advances it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from .._compat import CACHE_RENAMED


@dataclass
class LMOutput(CausalLMOutput):
    """CausalLMOutput plus the decoding cache under the name transformers' `generate` carries between steps."""

    cache: Any = None


def lm_output(loss: torch.Tensor | None, logits: torch.Tensor, cache: Any = None) -> LMOutput:
    out = LMOutput(loss=loss, logits=logits, cache=cache)
    if cache is not None and not CACHE_RENAMED:
        out["cache_params"] = cache  # generate before transformers 5.24 reads only this name
    return out


class CachedGenerationMixin:
    """`generate` (and everything built on it) decodes with the model's own cache: the first call creates it
    and reads the prompt, every later call feeds only the tokens the cache has not seen."""

    supports_recurrent_cache = True
    supports_packed_documents = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' DynamicCache holds keys/values; ours holds recurrent state

    def prepare_inputs_for_generation(self, input_ids, cache=None, cache_params=None, use_cache=True, **kwargs):
        cache = cache if cache is not None else cache_params  # `cache_params`: transformers < 5.24
        if use_cache is False:
            return {"input_ids": input_ids}
        if cache is None:
            cache = self.new_cache()
        return {"input_ids": input_ids[:, cache.seen:], "cache": cache}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, Hugging Face convention: labels (b, l) are shifted inside, -100 ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def positions_within_documents(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) document ids → (b, l) position of each token inside its document."""
    b, l = seq_idx.shape
    idx = torch.arange(l, device=seq_idx.device).expand(b, l)
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; allowed: layernorm, rmsnorm")


def inv_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


def inv_sigmoid(y: float) -> float:
    """x with sigmoid(x) = y (0 < y < 1)."""
    return math.log(y / (1 - y))
