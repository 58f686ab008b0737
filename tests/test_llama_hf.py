"""Llama baselines (parameter-matched to MambaSWELU) and loading any Hugging Face causal LM."""

import json
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmlab import hub
from lmlab.errors import ConfigError
from lmlab.models import build_config, build_model, hf, registry

# Exact counts (meta device, tied embeddings), as printed by bench/model_table.py.
LLAMA_COUNTS = {
    "llama-tiny": 950_912,
    "llama-small": 4_622_592,
    "llama-124m": 100_985_856,
    "llama-350m": 350_357_504,
}
MAMBA_COUNTS = {"tiny": 955_274, "small": 4_638_478, "124m": 100_917_266, "350m": 348_395_558}


@pytest.mark.parametrize("size", ["tiny", "small", "124m", "350m"])
def test_llama_sizes_match_mamba_swelu_counts(size):
    llama = registry.parameter_count(f"llama-{size}")
    mamba = registry.parameter_count(f"mamba-swelu-{size}")
    assert mamba == MAMBA_COUNTS[size]
    assert llama == LLAMA_COUNTS[f"llama-{size}"]
    assert abs(llama - mamba) / mamba < 0.03


def test_llama_family_builds_plain_hf_model_that_trains():
    torch.manual_seed(0)
    cfg = build_config("llama-tiny", vocab_size=300)
    assert isinstance(cfg, LlamaConfig) and cfg.tie_word_embeddings
    model = build_model(cfg)
    assert type(model) is LlamaForCausalLM and not hf.is_lmlab_model(model)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 300, (2, 19))
    assert model(ids).logits.shape == (2, 19, 300)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_llama_override_is_validated():
    with pytest.raises(ConfigError, match="model.hidden_sise"):
        build_config("llama-tiny", overrides={"hidden_sise": 64})


def _tiny_llama(path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_load_local_folder_identical_logits(tmp_path):
    ref = _tiny_llama(tmp_path / "llama")
    model = hf.load_model(str(tmp_path / "llama"), dtype="float32").eval()
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert isinstance(hf.load_config(str(tmp_path / "llama")), LlamaConfig)


def test_load_local_gpt2_folder(tmp_path):
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    model = hf.load_model(tmp_path / "gpt2", device="cpu")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 50)


def test_forward_cached_matches_full_forward_for_hf_and_lmlab_models(tmp_path):
    llama = _tiny_llama(tmp_path / "llama")
    inl = build_model(build_config("inl-tiny", vocab_size=97)).eval()
    ids = torch.randint(0, 97, (2, 9))
    for model in (llama, inl):
        full = model(ids).logits
        cache = hf.new_cache(model)
        steps = [hf.forward_cached(model, ids[:, :4], cache)]
        steps += [hf.forward_cached(model, ids[:, t:t + 1], cache) for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        hf.load_model(str(tmp_path / "nothing" / "here"))


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    expected = ("model.name: 'meta-llama/Llama-3.2-1B' not found locally and the Hugging Face hub is "
                "unreachable (offline?); pass a local folder")
    with pytest.raises(ConfigError) as err:
        hf.load_model("meta-llama/Llama-3.2-1B")
    assert str(err.value) == expected
    assert time.perf_counter() - t0 < 5


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "status", lambda name: None)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable"):
        hf.load_config("meta-llama/Llama-3.2-1B")
    assert time.perf_counter() - t0 < 5


@pytest.fixture
def silent_endpoint():
    """A loopback TCP port that accepts connections and never answers (a hung hub)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"https://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_unknown_hub_id_fails_fast_when_the_hub_hangs(monkeypatch, silent_endpoint):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", silent_endpoint)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="lmlab-tests/no-such-model-3f9c"):
        hf.load_model("lmlab-tests/no-such-model-3f9c")
    assert time.perf_counter() - t0 < hub.PROBE_TIMEOUT_S + 5


def test_hub_probe_respects_its_deadline(silent_endpoint):
    t0 = time.perf_counter()
    assert hub.status("a/b", endpoint=silent_endpoint, timeout=1.0) is None
    assert time.perf_counter() - t0 < 2.5


def test_remote_code_folder_needs_trust_remote_code(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lmlab_test_custom_lm",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    }))
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        hf.load_model(str(folder))
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        hf.load_config(str(folder))


def test_bad_dtype_is_a_config_error(tmp_path):
    _tiny_llama(tmp_path / "llama")
    with pytest.raises(ConfigError, match="model.dtype"):
        hf.load_model(str(tmp_path / "llama"), dtype="float13")
