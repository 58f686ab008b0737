"""Model families. Importing this package registers lmlab's models with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .inl import INLConfig, INLForCausalLM
from .llama import LLAMA_FAMILY
from .mamba_swelu import MambaSWELUConfig, MambaSWELUForCausalLM
from .registry import FAMILIES, Family, build_config, build_model, count_parameters, register_family

_MAMBA_124M = dict(vocab_size=50257, d_model=1024, n_layers=6, dense_hidden=2048, max_seq_len=1024)
# what the original MambaSWELU code did besides its mixer and λ (docs/models.md, fidelity table)
MAMBA_SWELU_ORIGINAL = dict(swelu_k_param="abs", dropout=0.1, dense_dropout=True, init_scheme="normal",
                            decay_all_parameters=True)

register_family(Family(
    name="mamba-swelu",
    config_cls=MambaSWELUConfig,
    model_cls=MambaSWELUForCausalLM,
    description="Mamba-1 blocks + SWELU activations, then 3 dense SWELU layers; tied LM head",
    sizes={
        "mamba-swelu-tiny": dict(vocab_size=4096, d_model=128, n_layers=2, dense_hidden=256, max_seq_len=512),
        "mamba-swelu-small": dict(vocab_size=8192, d_model=256, n_layers=4, dense_hidden=512, max_seq_len=1024),
        "mamba-swelu-124m": dict(vocab_size=50257, d_model=1024, n_layers=6, dense_hidden=2048, max_seq_len=1024),
        "mamba-swelu-350m": dict(vocab_size=50257, d_model=1536, n_layers=16, dense_hidden=4096,
                                 max_seq_len=2048),
        "mamba-swelu-124m-original": dict(_MAMBA_124M, **MAMBA_SWELU_ORIGINAL, mixer="simplified",
                                          swelu_lambda=False),
        "mamba-swelu-124m-original-mamba": dict(_MAMBA_124M, **MAMBA_SWELU_ORIGINAL),
    },
    notes={
        "mamba-swelu-124m-original": "the first 124M run exactly: scan-less simplified mixer, SWELU without λ",
        "mamba-swelu-124m-original-mamba": "the original code with the real Mamba mixer and SWELU λ",
    },
))

AutoConfig.register(MambaSWELUConfig.model_type, MambaSWELUConfig, exist_ok=True)
AutoModelForCausalLM.register(MambaSWELUConfig, MambaSWELUForCausalLM, exist_ok=True)


def _inl(d_model: int, n_layers: int, n_heads: int, n_iterations: int, ff_dim: int, max_seq_len: int,
         vocab_size: int = 50257) -> dict:
    return dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                n_iterations=n_iterations, ff_dim=ff_dim, max_seq_len=max_seq_len)


# The original INL code, V0 (projection context; the 3B/4B guide's counts) and V1 (attention hybrid).
# V0 evaluates checkpoints only: its context and α see the whole row and batch (INLConfig.leaky).
INL_V0 = dict(context="projection", context_mean="sequence", block_output="state", controller_activation="relu",
              alpha_form="batch", excitation_learnable=False, excitation_clock="counter", mu_drift=1e-4,
              ff_inner_dropout=True, init_scheme="pytorch", dropout=0.1, decay_all_parameters=True)
INL_V1 = dict(context="attention", attention_residual=True, attention_bias=True, positions="sinusoidal",
              block_output="state", controller_activation="relu", controller_shared=True, alpha_form="l2",
              excitation_learnable=False, excitation_clock="constant", ff_inner_dropout=True,
              init_scheme="pytorch", dropout=0.1, decay_all_parameters=True)
_INL_SIZES = {
    "inl-tiny": _inl(64, 2, 4, 3, 128, 512, vocab_size=4096),
    "inl-small": _inl(512, 6, 8, 5, 2048, 512),
    "inl-medium": _inl(768, 12, 12, 7, 3072, 1024),
    "inl-large": _inl(1024, 24, 16, 10, 4096, 2048),
    "inl-xlarge": _inl(1536, 32, 24, 12, 6144, 4096),
    "inl-3b": _inl(2048, 40, 32, 15, 8192, 4096),
    "inl-4b": _inl(2304, 48, 36, 15, 9216, 4096),
}

register_family(Family(
    name="inl",
    config_cls=INLConfig,
    model_cls=INLForCausalLM,
    description="INL-LLM: attention context drives a learned second-order integrator per token; tied LM head",
    sizes={
        **_INL_SIZES,
        **{f"{name}-v0": dict(size, **INL_V0) for name, size in _INL_SIZES.items()},
        **{f"{name}-v1": dict(size, **INL_V1) for name, size in _INL_SIZES.items()},
    },
    notes={
        "inl-3b": "2.20B with attention; 1.70B with context=projection (the original's '3B')",
        "inl-4b": "3.29B with attention; 2.52B with context=projection (the original's '4B')",
        **{f"{name}-v0": "the original V0 code exactly (evaluation only: it sees the whole row)"
           for name in _INL_SIZES},
        **{f"{name}-v1": "the original V1 code (attention + INL hybrid)" for name in _INL_SIZES},
    },
))
register_family(LLAMA_FAMILY)

AutoConfig.register(INLConfig.model_type, INLConfig, exist_ok=True)
AutoModelForCausalLM.register(INLConfig, INLForCausalLM, exist_ok=True)

__all__ = ["FAMILIES", "Family", "INLConfig", "INLForCausalLM", "MambaSWELUConfig", "MambaSWELUForCausalLM",
           "build_config", "build_model", "count_parameters", "register_family"]
