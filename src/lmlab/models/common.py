"""What lmlab's own model families share: the output type, the decoding hooks for `generate`, document
positions, the language-model loss, norms and the inverse activations used to initialise raw parameters.

Every family declares its capabilities as class attributes, so callers never inspect code objects:
`supports_packed_documents` (forward takes `seq_idx` and keeps packed documents apart) and
`supports_recurrent_cache` (forward takes `cache` from `new_cache()` and advances it).

Every family's forward takes the arguments of a transformers causal LM (`input_ids` or `inputs_embeds`,
`attention_mask`, `position_ids`, `labels`, `use_cache`, `return_dict`, `output_hidden_states`,
`output_attentions`, `cache_position`, `logits_to_keep`, `**kwargs`). `attention_mask` (b, l) or
(b, seen + l), 1 for a token and 0 for padding: a padded position feeds nothing into what later tokens see
and takes no position, so a left-padded row gives the logits of the same prompt alone. Positions then count
the row's real tokens, which the cache keeps per row (`lengths`).
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


def lm_output(loss: torch.Tensor | None, logits: torch.Tensor, cache: Any = None,
              hidden_states: tuple[torch.Tensor, ...] | None = None, return_dict: bool | None = True):
    """The forward's result; `return_dict=False` gives the tuple (loss, logits, cache, hidden_states) without
    the entries that are None, as transformers' models do."""
    out = LMOutput(loss=loss, logits=logits, cache=cache, hidden_states=hidden_states)
    if cache is not None and not CACHE_RENAMED:
        out["cache_params"] = cache  # generate before transformers 5.24 reads only this name
    return out if return_dict is not False else out.to_tuple()


def current_mask(attention_mask: torch.Tensor | None, length: int, seen: int) -> torch.Tensor | None:
    """The (b, length) bool mask of the tokens fed now, from an attention_mask of (b, length) or (b, seen +
    length) (transformers' `generate` passes the whole history); None when every token is real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] not in (length, seen + length):
        raise ValueError(f"attention_mask must be (batch, {length}) or (batch, {seen + length}) of 0/1, "
                         f"got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, attention_mask.shape[1] - length:].bool()
    return None if bool(mask.all()) else mask


def mask_positions(b: int, length: int, start: int, lengths: torch.Tensor | None, mask: torch.Tensor | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position_ids (b, length), lengths after) for `length` new tokens. `lengths` (b,): real tokens each row
    has consumed (None: every row has consumed `start`); a masked token takes no position (it gets its row's
    next one, clamped at 0, and is never read). lengths after is None while no row was ever masked."""
    if lengths is None and mask is None:
        return torch.arange(start, start + length, device=device)[None, :].expand(b, length), None
    base = lengths if lengths is not None else torch.full((b,), start, dtype=torch.long, device=device)
    real = mask.long() if mask is not None else torch.ones(b, length, dtype=torch.long, device=device)
    return (base[:, None] + real.cumsum(1) - 1).clamp_min(0), base + real.sum(1)


class CachedGenerationMixin:
    """`generate` (and everything built on it) decodes with the model's own cache: the first call creates it
    and reads the prompt, every later call feeds only the tokens the cache has not seen."""

    supports_recurrent_cache = True
    supports_packed_documents = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' DynamicCache holds keys/values; ours holds recurrent state

    def prepare_inputs_for_generation(self, input_ids, cache=None, cache_params=None, use_cache=True,
                                      attention_mask=None, inputs_embeds=None, **kwargs):
        """The tokens the cache has not seen, with the whole attention mask (its last columns are theirs).
        A prompt given as `inputs_embeds` is fed once; `input_ids` then holds only the generated tokens."""
        cache = cache if cache is not None else cache_params  # `cache_params`: transformers < 5.24
        if use_cache is False:
            if inputs_embeds is not None:
                raise ValueError("generate with inputs_embeds needs use_cache=True for this model")
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if cache is None:
            cache = self.new_cache()
        if inputs_embeds is not None and cache.seen == 0:
            cache.embedded = inputs_embeds.shape[1]
            return {"inputs_embeds": inputs_embeds, "cache": cache, "attention_mask": attention_mask}
        return {"input_ids": input_ids[:, cache.seen - cache.embedded:], "cache": cache,
                "attention_mask": attention_mask}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, Hugging Face convention: labels (b, l) are shifted inside, -100 ignored.
    Half-precision logits are raised to float32; float32 and float64 keep their precision."""
    flat = logits[:, :-1].reshape(-1, logits.size(-1))
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100)


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
