"""Llama-style baselines: plain `transformers` LlamaForCausalLM (RoPE, RMSNorm, SwiGLU MLP, SDPA attention).

Each size is shaped to match the parameter count of the MambaSWELU size of the same name at the same
vocabulary (tied embeddings, no biases), so comparisons are at equal parameters:

    name          vocab   d     layers heads  intermediate   params        MambaSWELU    Δ
    llama-tiny     4096   128   2      4      384            950,912       955,274       −0.46 %
    llama-small    8192   256   4      4      480            4,622,592     4,638,478     −0.34 %
    llama-124m    50257   768   9      12     1984           100,985,856   100,917,266   +0.07 %
    llama-350m    50257   1024  24     16     2688           350,357,504   348,395,558   +0.56 %

params = V·d + L·(4d² + 3d·i + 2d) + d. `bench/model_table.py` prints the exact counts of every size;
tests/test_llama_hf.py holds them within 3 %. These are ordinary Hugging Face models: nothing here
subclasses them, and `lmlab.models.hf` handles their loading and cached decoding.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from .registry import Family


def _size(vocab: int, d: int, layers: int, heads: int, intermediate: int, max_len: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_len,
                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


LLAMA_FAMILY = Family(
    name="llama",
    config_cls=LlamaConfig,
    model_cls=LlamaForCausalLM,
    description="Llama-style transformers (transformers' LlamaForCausalLM), parameter-matched to MambaSWELU",
    sizes={
        "llama-tiny": _size(4096, 128, 2, 4, 384, 512),
        "llama-small": _size(8192, 256, 4, 4, 480, 1024),
        "llama-124m": _size(50257, 768, 9, 12, 1984, 1024),
        "llama-350m": _size(50257, 1024, 24, 16, 2688, 2048),
    },
    notes={
        "llama-tiny": "matches mamba-swelu-tiny's parameter count",
        "llama-small": "matches mamba-swelu-small's parameter count",
        "llama-124m": "matches mamba-swelu-124m's parameter count",
        "llama-350m": "matches mamba-swelu-350m's parameter count",
    },
)
