"""Sampling: greedy, temperature, top-k, top-p, stop on EOS, streaming.

Models with a recurrent cache (`model.new_cache()`: MambaSWELU's conv + SSM state, INL's KV cache)
pay the same per new token whatever the context length. Other Hugging Face models use their
own key/value cache. `use_cache=False` recomputes the whole context at every token (the slow
reference the tests compare against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .models.hf import forward_cached, new_cache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    eos_id: int | None = None


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (b, V) with everything outside top-k / the top-p nucleus set to −inf."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (b, V) → (b,) token ids."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class _Stepper:
    """Feeds tokens to a model and returns the last position's logits, with the best cache available."""

    def __init__(self, model, use_cache: bool):
        self.model = model
        self.cache = new_cache(model) if use_cache else None
        self.context: torch.Tensor | None = None

    def __call__(self, new_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return forward_cached(self.model, new_ids, self.cache)[:, -1]
        self.context = new_ids if self.context is None else torch.cat([self.context, new_ids], dim=1)
        return self.model(self.context).logits[:, -1]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, cfg: SamplingConfig, *, generator: torch.Generator | None = None,
             use_cache: bool = True, on_token: Callable[[int], None] | None = None) -> torch.Tensor:
    """input_ids (b, l) → (b, l + new). Stops at max_new_tokens or when every row has produced EOS.

    `on_token(id)` is called for each new token of row 0 (streaming to a terminal).
    """
    was_training = model.training
    model.eval()
    step = _Stepper(model, use_cache)
    out = input_ids
    done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    logits = step(input_ids)
    for _ in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, generator)
        if cfg.eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, cfg.eos_id), tok)
        out = torch.cat([out, tok[:, None]], dim=1)
        if on_token is not None:
            on_token(int(tok[0]))
        if cfg.eos_id is not None:
            done |= tok == cfg.eos_id
            if bool(done.all()):
                break
        if _at_position_limit(model, out.size(1)):
            break
        logits = step(tok[:, None])
    model.train(was_training)
    return out


def _at_position_limit(model, length: int) -> bool:
    limit = getattr(model.config, "max_seq_len", None) or getattr(model.config, "max_position_embeddings", None)
    return limit is not None and length >= limit


class TextStreamer:
    """Decodes token ids incrementally and prints only the new text (handles multi-byte pieces)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tok, self.write = tokenizer, write
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.write(text[self.printed:])
        self.printed = len(text)
