"""INL-LLM: shapes, learning, cached decoding, export, parameter counts, adaptive stop, dropout."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmlab import _compat
from lmlab.errors import ConfigError
from lmlab.models import INLConfig, INLForCausalLM, build_config, build_model, registry

V = 101  # not a power of two, nor are the sequence lengths below


def _model(context="attention", ff="gelu", **overrides) -> INLForCausalLM:
    torch.manual_seed(0)
    cfg = build_config("inl-tiny", vocab_size=V, overrides=dict(context=context, ff=ff, **overrides))
    model = build_model(cfg)
    with torch.no_grad():  # the controller heads start at zero weight; wake them so the context matters
        for blk in model.blocks:
            for head in (blk.inl.to_alpha, blk.inl.to_beta, blk.inl.to_gate, blk.inl.to_vcand):
                head.weight.normal_(0.0, 0.3)
    return model.eval()


def test_shapes_loss_and_config_names():
    model = _model()
    ids = torch.randint(0, V, (3, 17))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 17, V)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model.lm_head.weight is model.wte.weight  # tied
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.iterations_run() == [3, 3]


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="context"):
        build_config("inl-tiny", overrides={"context": "convolution"})
    with pytest.raises(ConfigError, match="n_heads"):
        build_config("inl-tiny", overrides={"n_heads": 5})
    with pytest.raises(ConfigError, match="model.n_iteration"):
        build_config("inl-tiny", overrides={"n_iteration": 5})


@pytest.mark.parametrize("context,ff", [("attention", "gelu"), ("projection", "swiglu")])
def test_loss_decreases(context, ff):
    torch.manual_seed(0)
    cfg = build_config("inl-tiny", vocab_size=V, overrides=dict(context=context, ff=ff))
    model = build_model(cfg).train()
    ids = torch.randint(0, V, (2, 15))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    # every parameter family learns, the integrator's included
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for name in ("controller.weight", "to_vcand.weight", "mu", "gamma", "phi", "amplitude", "kappa_raw"):
        assert f"blocks.0.inl.{name}" in grads, name


@pytest.mark.parametrize("context", ["attention", "projection"])
def test_cached_decoding_equals_full_forward(context):
    model = _model(context)
    ids = torch.randint(0, V, (2, 15))
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, :6], cache=cache).logits, model(ids[:, 6:9], cache=cache).logits]  # prefill + chunk
    steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 15)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.seen == 15
    # the context really reaches later tokens: change the first token, the last logits move
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % V
    assert (model(other).logits[:, -1] - full[:, -1]).abs().max() > 1e-6


def test_hf_generate_matches_manual_greedy():
    model = _model()
    prompt = torch.randint(0, V, (1, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("context", ["attention", "projection"])
def test_seq_idx_is_a_document_mask(context):
    model = _model(context)
    ids = torch.randint(0, V, (1, 13))
    seq_idx = torch.tensor([[0] * 5 + [1] * 8])
    packed = model(ids, seq_idx=seq_idx).logits
    separate = torch.cat([model(ids[:, :5]).logits, model(ids[:, 5:]).logits], dim=1)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)


def test_save_pretrained_reloads_with_auto_class(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is INLForCausalLM and loaded.config.model_type == "inl_llm"
    assert loaded.lm_head.weight is loaded.wte.weight
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# Exact counts on the meta device (vocab 50257, inl-tiny 4096), as printed by bench/model_table.py:
# (context=attention, context=projection).
INL_COUNTS = {
    "inl-tiny": (461_314, 436_866),
    "inl-small": (47_806_470, 43_090_950),
    "inl-medium": (133_130_508, 111_906_060),
    "inl-large": (379_044_888, 303_571_992),
    "inl-xlarge": (1_034_342_944, 807_899_680),
    "inl-3b": (2_201_485_352, 1_698_250_792),
    "inl-4b": (3_288_582_960, 2_524_281_648),
}


@pytest.mark.parametrize("name", list(INL_COUNTS))
def test_parameter_counts(name):
    attention, projection = INL_COUNTS[name]
    assert registry.parameter_count(name) == attention
    assert registry.parameter_count(name, overrides={"context": "projection"}) == projection


def test_projection_variant_is_the_original_count_plus_d_plus_1_per_layer():
    # the original: 4 controller MLPs 3d→64→d, d×d context projection, GELU FF, LayerNorms, μ γ φ;
    # ours adds a learnable amplitude (d) and κ (1) per layer
    for name, quoted_billions in (("inl-3b", 1.70), ("inl-4b", 2.52)):
        cfg = build_config(name)
        d, layers, ff, k = cfg.d_model, cfg.n_layers, cfg.ff_dim, cfg.controller_hidden
        per_layer = 4 * d + (d * d + d) + 4 * (3 * d * k + k + k * d + d) + 3 * d + (2 * d * ff + ff + d)
        original = cfg.vocab_size * d + layers * per_layer + 2 * d
        assert round(original / 1e9, 2) == quoted_billions
        projection = registry.parameter_count(name, overrides={"context": "projection"})
        assert projection == original + layers * (d + 1)


def test_adaptive_stop_only_at_inference():
    model = _model(adaptive_stop=True, stop_tol=0.05)
    ids = torch.randint(0, V, (2, 11))
    model.eval()
    with torch.no_grad():
        stopped = model(ids).logits
    assert all(n < model.config.n_iterations for n in model.iterations_run())
    model.config.adaptive_stop = False  # read at call time
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, stopped)
    assert model.iterations_run() == [3, 3]
    model.config.adaptive_stop = True
    model.train()
    model(ids)
    assert model.iterations_run() == [3, 3]  # training always runs the fixed number
    # per-token stop: cached decoding still equals the full forward
    model.eval()
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                             for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), stopped, rtol=0, atol=1e-5)


def test_dropout_only_in_train_mode():
    model = _model(dropout=0.3)
    ids = torch.randint(0, V, (2, 10))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, V, (2, 9))
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            _compat.enable_activation_checkpointing(model)
        model(ids, labels=ids).loss.backward()
        grads.append(model.blocks[0].inl.controller.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_config_roundtrip_keeps_values():
    cfg = INLConfig(d_model=32, n_heads=2, context="projection", ff="swiglu", dynamic_alpha=False)
    again = INLConfig.from_dict(cfg.to_dict())
    assert (again.context, again.ff, again.dynamic_alpha) == ("projection", "swiglu", False)
    assert again.d_model == 32
    assert not hasattr(INLForCausalLM(again).blocks[0].inl, "kappa_raw")
