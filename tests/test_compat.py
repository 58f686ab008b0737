"""The transformers contracts lmlab depends on, checked against whatever transformers is installed.

These are the tests that fail first when a new transformers release moves a name (5.24 renamed the
cache of every output and `generate` hook to `cache`).
"""

import pytest
import torch
from transformers.generation import utils as gen_utils

from lmlab import _compat
from lmlab.generate import SamplingConfig, generate
from lmlab.models import build_config, build_model, hf
from lmlab.models.common import LMOutput

FAMILIES = {
    "mamba-swelu": dict(name="mamba-swelu-tiny", overrides=dict(d_model=32, dense_hidden=32, scan_backend="ref")),
    "inl-attention": dict(name="inl-tiny", overrides=dict(d_model=32, n_heads=2, ff_dim=32)),
    "inl-projection": dict(name="inl-tiny", overrides=dict(d_model=32, n_heads=2, ff_dim=32, context="projection")),
    "llama": dict(name="llama-tiny", overrides=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                    num_key_value_heads=2)),
}


def _tiny(family: str):
    torch.manual_seed(0)
    spec = FAMILIES[family]
    model = build_model(build_config(spec["name"], vocab_size=61, overrides=spec["overrides"])).eval()
    model.generation_config.pad_token_id = 0
    return model


def _cache_names() -> list[str]:
    """Every name under which the installed transformers' `generate` looks for a cache in a model output."""
    return list(gen_utils.ALL_CACHE_NAMES)


@pytest.mark.parametrize("family", ["mamba-swelu", "inl-attention", "inl-projection"])
def test_output_carries_the_cache_under_the_name_generate_reads(family):
    model = _tiny(family)
    cache = model.new_cache()
    out = model(torch.randint(1, 61, (2, 5)), cache=cache)
    found = [name for name in _cache_names() if name in out]
    assert found, f"{type(out).__name__} holds none of {_cache_names()}"
    assert all(out[name] is cache for name in found)
    # transformers' own step from one output to the next call's inputs keeps our cache object
    kwargs = model._update_model_kwargs_for_generation(out, {"attention_mask": torch.ones(2, 5)})
    assert any(kwargs.get(name) is cache for name in _cache_names())
    # and the output class takes the cache under the current contract's name
    assert LMOutput(logits=out.logits, cache=cache).cache is cache


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_generate_equals_recompute_for_every_family(family):
    model = _tiny(family)
    prompt = torch.randint(1, 61, (2, 6))
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append((kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1]),
        with_kwargs=True)
    out = model.generate(prompt, max_new_tokens=7, do_sample=False)
    hook.remove()
    assert lengths == [6] + [1] * 6, "generate did not carry the cache between steps"
    slow = generate(model, prompt, SamplingConfig(max_new_tokens=7, temperature=0.0), use_cache=False)
    assert torch.equal(out, slow)
    fast = generate(model, prompt, SamplingConfig(max_new_tokens=7, temperature=0.0), use_cache=True)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("family", ["mamba-swelu", "inl-attention", "inl-projection"])
def test_beam_search_reorders_the_cache(family):
    model = _tiny(family)
    prompt = torch.randint(1, 61, (2, 6))
    beam = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False)
    slow = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beam, slow)


def test_hf_cache_keyword_is_one_the_installed_llama_accepts(recwarn):
    model = _tiny("llama")
    cache = hf.new_cache(model)
    hf.forward_cached(model, torch.randint(1, 61, (1, 4)), cache)
    assert cache.get_seq_length() == 4
    assert not [w for w in recwarn if "deprecated" in str(w.message) and "cache" in str(w.message)]


def test_activation_checkpointing_shim_uses_no_deprecated_name(recwarn):
    model = _tiny("mamba-swelu")
    _compat.enable_activation_checkpointing(model)
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
    assert all(blk.gradient_checkpointing for blk in model.blocks)
