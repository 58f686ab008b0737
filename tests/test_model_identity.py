"""A model of lmlab's own families built with a fixed seed has exactly the weights, state-dict keys and config
it had when these checksums were taken: refactoring the shared model code (models/common.py) must change none.

How the checksums were computed (with the code before the shared config/model bases existed, and checked equal
after): for each case, `cfg = build_config(size, overrides=...)`, `torch.manual_seed(0)`,
`model = build_model(cfg)` on CPU, then `_weights_digest(model)` and `_config_digest(cfg)` below. The cases
cover every init branch: both init schemes of each family, the simplified mixer, RMSNorm, SwiGLU, the
projection context and the V0/V1 sizes. A change that is meant to change initial weights (a new init, a new
parameter) updates the table and says so.
"""

import hashlib
import json

import pytest
import torch
from torch import nn

from lmlab.models import build_config, build_model
from lmlab.models.registry import config_parameters

CASES = {  # name: (size, overrides, weights digest, config digest)
    "mamba-swelu-tiny": (
        "mamba-swelu-tiny", {},
        "e9f16ce341a8b10edbf6ca3416ee2c204bb19be8091173f83bc10c6cecfb49a8",
        "19add81b537a7047f4ca45e9a76125a206b41bbe2291f6bb425660711676bb45"),
    "mamba-swelu-tiny-normal": (
        "mamba-swelu-tiny", dict(init_scheme="normal", swelu_k_param="abs", dense_dropout=True),
        "b6b964fc55a1ae5434ca80e756f46175d43e0c6c1134ff2fce91970e08858f57",
        "ab447645c2e05512e2f90813ed0f6f37e4e4062b826db95eff4857314be6273a"),
    "mamba-swelu-tiny-simplified": (
        "mamba-swelu-tiny", dict(mixer="simplified", swelu_lambda=False, init_scheme="normal", norm="rmsnorm"),
        "f279f9323b60268ae419c5cbe44030bcdbfd137e8f1d4e92a807205273eae66b",
        "c4bd1e681f9a09934855bbd2aee692eab0ff7fc93f3c23c5a2dd18e56ba19557"),
    "inl-tiny": (
        "inl-tiny", {},
        "9258b5d069f7b49dff82d965c1c941ed315995fcd83d688a7c5fffa26ab9b8f1",
        "54deba3509bea6b1e6d9cb8a1ef61012e4231c8ce577401232e87cd787542d2d"),
    "inl-tiny-v0": (
        "inl-tiny-v0", {},
        "22c8bd57b863299aad862a7dfe0b7f12fabc63e833a6a8b82b285f71e70e5074",
        "0a7091bc25b150f62ab51b6a7075cb79a855901f0d068008eaea532d63477d0d"),
    "inl-tiny-v1": (
        "inl-tiny-v1", {},
        "3eb7e0914be9cfab4b444e8bbe00faad9b336a10357dc750fdedca8ab897c9a7",
        "7a2fad97d31cc063832beaea20c10c419776584bacccdd6d4fe98604933e5fa1"),
    "inl-tiny-swiglu-rms-projection": (
        "inl-tiny", dict(ff="swiglu", norm="rmsnorm", context="projection"),
        "3d72a0d9bfde859cc56cc5a4a2b3bcaf0183d6b1cf47c8016b68f001527f4a87",
        "cdb6fcf315160627865a4bb20224ef2c4206b91d3991a21d82948d291668a3c0"),
}


def _weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict in key order: each key, dtype, shape and the tensor's raw bytes."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _config_digest(cfg) -> str:
    """sha256 of the family's own config keys (its __init__ parameters) and their values, as sorted JSON."""
    own = {key: getattr(cfg, key) for key in config_parameters(type(cfg))}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", CASES)
def test_seeded_model_has_the_recorded_weights_and_config(name):
    size, overrides, weights, config = CASES[name]
    cfg = build_config(size, overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert _config_digest(cfg) == config
    assert _weights_digest(model) == weights


@pytest.mark.parametrize("size", ["mamba-swelu-tiny", "inl-tiny"])
def test_embedding_accessors_reach_wte_and_lm_head(size):
    """transformers' own accessors serve lmlab's families (input: `wte`, output: the tied `lm_head`)."""
    model = build_model(build_config(size, overrides=dict(vocab_size=32)))
    assert model.get_input_embeddings() is model.wte and model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight is model.wte.weight
    emb, head = nn.Embedding(32, model.config.d_model), nn.Linear(model.config.d_model, 32, bias=False)
    model.set_input_embeddings(emb)
    model.set_output_embeddings(head)
    assert model.wte is emb and model.lm_head is head
    assert model.config.hidden_size == model.config.d_model and model.config.num_hidden_layers == model.config.n_layers
