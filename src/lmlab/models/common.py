"""What lmlab's own model families share: the config and model base classes, the forward's prologue and
epilogue, the output type, the decoding hooks for `generate`, document positions, the language-model loss,
norms and the inverse activations used to initialise raw parameters.

A family's config (`LMConfig`) lists its keys in its `__init__` signature, checks them and passes them all on;
each becomes an attribute (what `config.json` saves). A family's model (`LMPreTrainedModel`) keeps its token
embedding in `wte` and its head in `lm_head`, which transformers' own accessors (`get_input_embeddings`, ...)
read; `_init_weights` gives Linear, Embedding, LayerNorm and RMSNorm transformers' standard init (weights
N(0, initializer_range), biases 0, norms 1) and each family adds its own modules.

Every family declares its capabilities as class attributes, so callers never inspect code objects:
`supports_packed_documents` (forward takes `seq_idx` and keeps packed documents apart) and
`supports_recurrent_cache` (forward takes `cache` from `new_cache()` and advances it).

Every family's forward takes the arguments of a transformers causal LM (`input_ids` or `inputs_embeds`,
`attention_mask`, `position_ids`, `labels`, `use_cache`, `return_dict`, `output_hidden_states`,
`output_attentions`, `cache_position`, `logits_to_keep`, `**kwargs`): input_ids (b, l) (or inputs_embeds
(b, l, d)); `labels` follow the Hugging Face convention (shifted inside, -100 ignored). With `cache` (or
`cache_params`, its name before transformers 5.24) the call continues from the cached state (first call:
prefill) and advances it; `use_cache=True` without one starts a new cache, returned in the output.
`attention_mask` (b, l) or (b, seen + l), 1 for a token and 0 for padding: a padded position feeds nothing into
what later tokens see and takes no position, so a left-padded row gives the logits of the same prompt alone.
Positions then count the row's real tokens, which the cache keeps per row (`lengths`). `seq_idx` (b, l) marks
packed documents: positions restart at each. `logits_to_keep` > 0 computes the logits of the last that many
positions only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .._compat import CACHE_RENAMED
from . import kernels_cpu


class LMConfig(PretrainedConfig):
    """Base of lmlab's family configs: `d_model` and `n_layers` also answer to the names other tools read."""

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers


def config_arguments(init: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """Every argument a config's `init` was called with, by name, from its `locals()`, `**kwargs` merged in:
    what it passes on to `PretrainedConfig.__init__`, which sets each as an attribute."""
    names = [p for p in inspect.signature(init).parameters if p not in ("self", "kwargs")]
    return {**{name: values[name] for name in names}, **values.get("kwargs", {})}


class LMPreTrainedModel(PreTrainedModel):
    """Base of lmlab's family models (the module docstring says what it gives)."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _input_embed_layer = "wte"  # read by transformers' get/set_input_embeddings; lm_head is their output default

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers' standard init for Linear, Embedding, LayerNorm and RMSNorm; nothing for other modules."""
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            super()._init_weights(module)


@dataclass
class ForwardCall:
    """One forward call's inputs as every family reads them (the module docstring has the arguments).

    cache: what the call continues from and advances (None: no cache); start: tokens it had seen before;
    mask: (b, l) bool, False at padding (None: no padding); lengths: real tokens per row after the call, set
    by `positions` once a row was padded (None: every row has consumed `start` + l)."""

    cache: Any
    b: int
    l: int
    start: int
    mask: torch.Tensor | None
    lengths: torch.Tensor | None = None

    @classmethod
    def begin(cls, model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
              attention_mask: torch.Tensor | None, cache: Any, cache_params: Any, use_cache: bool | None,
              ) -> ForwardCall:
        """`cache` (or `cache_params`, its name before transformers 5.24); `use_cache` without one starts a new
        cache (`model.new_cache()`). Exactly one of input_ids (b, l) and inputs_embeds (b, l, d)."""
        cache = cache if cache is not None else cache_params
        if use_cache and cache is None:
            cache = model.new_cache()
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        b, l = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        start = cache.seen if cache is not None else 0
        return cls(cache, b, l, start, current_mask(attention_mask, l, start))

    def positions(self, seq_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """(b, l) position ids: within each packed document with `seq_idx`, else counting each row's real tokens
        (`mask_positions`)."""
        if seq_idx is not None:
            return positions_within_documents(seq_idx)
        lengths = self.cache.lengths if self.cache is not None else None
        position_ids, self.lengths = mask_positions(self.b, self.l, self.start, lengths, self.mask, device)
        return position_ids

    def finish(self, logits: torch.Tensor, labels: torch.Tensor | None, states: list[torch.Tensor] | None,
               return_dict: bool | None) -> LMOutput | tuple:
        """Advances the cache past this call's tokens; the output, with the loss when `labels` are given."""
        if self.cache is not None:
            self.cache.seen += self.l
            if self.lengths is not None:
                self.cache.lengths = self.lengths
        loss = lm_loss(logits, labels) if labels is not None else None
        return lm_output(loss, logits, self.cache, tuple(states) if states is not None else None, return_dict)


def run_blocks(blocks: Iterable[nn.Module], h: torch.Tensor, output_hidden_states: bool | None, *args,
               **kwargs) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """h through every block, each called as block(h, *args, **kwargs); with `output_hidden_states`, also the
    hidden states (the blocks' input, then each block's output), else None."""
    states = [h] if output_hidden_states else None
    for blk in blocks:
        h = blk(h, *args, **kwargs)
        if states is not None:
            states.append(h)
    return h, states


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


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters, state-dict keys and results) for a norm whose output only feeds matmuls.
    Under CPU bf16 autocast, where nn.LayerNorm writes fp32 that the next Linear then casts to bf16 (and casts its
    gradient back), it normalises into bf16 in one fused pass (`kernels_cpu.layer_norm`, held to nn.LayerNorm and
    the cast by tests/test_kernels_cpu.py). Everywhere else it is nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and len(self.normalized_shape) == 1
                and self.weight is not None
                and self.bias is not None and kernels_cpu.usable(x, self.weight, self.bias)):
            return kernels_cpu.layer_norm(x, self.weight, self.bias, self.eps, torch.bfloat16)
        return super().forward(x)


def make_norm(kind: str, dim: int, eps: float, feeds_matmul: bool = False) -> nn.Module:
    """`layernorm` or `rmsnorm`. `feeds_matmul`: the norm's output is read only by Linear layers, so under CPU bf16
    autocast it may come out in bf16 (`LayerNorm`)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps) if feeds_matmul else nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; allowed: layernorm, rmsnorm")


def inv_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


def inv_sigmoid(y: float) -> float:
    """x with sigmoid(x) = y (0 < y < 1)."""
    return math.log(y / (1 - y))
