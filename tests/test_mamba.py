"""The mixer against transformers' own Mamba mixer, and the whole model's recurrent decoding."""

import pytest
import torch
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from lmlab.models.mamba import MambaCache, MambaMixer
from lmlab.models.mamba_swelu import MambaSWELUConfig, MambaSWELUForCausalLM


def _pair(d=16, n=4, k=4, expand=2, rank=3):
    hf_cfg = MambaConfig(hidden_size=d, state_size=n, intermediate_size=expand * d, conv_kernel=k,
                         time_step_rank=rank, use_conv_bias=True, use_bias=False, hidden_act="silu",
                         num_hidden_layers=1)
    torch.manual_seed(0)
    ours = MambaMixer(d, d_state=n, d_conv=k, expand=expand, dt_rank=rank, scan_backend="ref")
    hf = HFMambaMixer(hf_cfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


@pytest.mark.parametrize("L", [1, 7, 13, 33])
def test_mixer_matches_transformers(L):
    ours, hf = _pair()
    hf.eval()  # transformers' pure-torch path (no kernels) is used in eval mode
    ours.eval()
    _assert_same_outputs_and_gradients(ours, hf, torch.randn(2, L, 16))


def _assert_same_outputs_and_gradients(a, b, x):
    """Two mixers with the same parameter names: outputs, input gradient and every parameter's gradient."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = a(x1), b(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    g_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(p.grad, g_b[name].grad, rtol=1e-4, atol=1e-6, msg=name)


class _WrappedLinear(torch.nn.Linear):
    """Stands for an adapter-wrapped or quantised layer: not a plain nn.Linear, so the mixer calls it whole."""


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("name", ["x_proj", "dt_proj"])
def test_the_fused_paths_equal_the_module_calls(backend, name):
    """A plain dt_proj hands its bias to the scan; plain x_proj and dt_proj run inside the cpu backend's projected
    scan. Any other module in their place (here a Linear subclass, as an adapter or a 4-bit layer would be) runs
    whole: outputs, every gradient and a decoding step agree."""
    torch.manual_seed(0)
    plain = MambaMixer(16, d_state=4, dt_rank=3, scan_backend=backend)
    wrapped = MambaMixer(16, d_state=4, dt_rank=3, scan_backend=backend)
    wrapped.load_state_dict(plain.state_dict())
    old = getattr(wrapped, name)
    setattr(wrapped, name, _WrappedLinear(old.in_features, old.out_features, bias=old.bias is not None))
    getattr(wrapped, name).load_state_dict(old.state_dict())
    if name == "dt_proj":
        assert wrapped._delta(torch.randn(2, 5, 3))[1] is None and plain._delta(torch.randn(2, 5, 3))[1] is not None
    x = torch.randn(2, 11, 16)
    _assert_same_outputs_and_gradients(plain, wrapped, x)
    # decoding a token: the state update adds the same bias
    with torch.no_grad():
        c1, c2 = MambaCache(), MambaCache()
        plain(x[:, :4], cache=c1), wrapped(x[:, :4], cache=c2)
        torch.testing.assert_close(plain.step(x[:, 4], c1), wrapped.step(x[:, 4], c2), rtol=1e-5, atol=1e-6)


def test_the_fused_paths_under_cpu_bf16_autocast_equal_the_module_calls():
    torch.manual_seed(1)
    plain = MambaMixer(32, d_state=8, dt_rank=3, scan_backend="cpu")
    wrapped = MambaMixer(32, d_state=8, dt_rank=3, scan_backend="cpu")
    wrapped.load_state_dict(plain.state_dict())
    for name in ("x_proj", "dt_proj"):
        old = getattr(wrapped, name)
        setattr(wrapped, name, _WrappedLinear(old.in_features, old.out_features, bias=old.bias is not None))
        getattr(wrapped, name).load_state_dict(old.state_dict())
    x = torch.randn(2, 40, 32)
    outs = []
    for m in (plain, wrapped):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xx)
        assert y.dtype == torch.bfloat16
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        outs.append([y.float(), xx.grad, *(p.grad for p in m.parameters())])
    for got, want in zip(*outs):
        scale = want.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got / scale, want / scale, rtol=3e-2, atol=3e-2)


def test_hooked_or_frozen_projections():
    """A forward hook on x_proj or dt_proj sees its call (the layer is then run as a module); frozen projections
    (a LoRA run's base weights) get no gradient from the fused node while the rest get the module path's."""
    torch.manual_seed(2)
    fused = MambaMixer(16, d_state=4, dt_rank=3, scan_backend="cpu")
    calls = []
    handles = [getattr(fused, name).register_forward_hook(lambda m, i, o, _n=name: calls.append(_n))
               for name in ("x_proj", "dt_proj")]
    fused(torch.randn(1, 6, 16))
    assert calls == ["x_proj", "dt_proj"]
    for h in handles:
        h.remove()
    module = MambaMixer(16, d_state=4, dt_rank=3, scan_backend="cpu")
    module.load_state_dict(fused.state_dict())
    module.x_proj.register_forward_hook(lambda *a: None)  # runs the composed path
    for m in (fused, module):
        m.x_proj.weight.requires_grad_(False)
        m.dt_proj.weight.requires_grad_(False)
    _assert_same_outputs_and_gradients(fused, module, torch.randn(2, 9, 16))
    assert fused.x_proj.weight.grad is None and fused.dt_proj.weight.grad is None
    assert fused.dt_proj.bias.grad is not None


def test_an_empty_sequence_runs_through_the_mixer():
    m = MambaMixer(16, d_state=4, dt_rank=3, scan_backend="cpu")
    x = torch.randn(2, 0, 16, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 0, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_reference_initialisation():
    m = MambaMixer(32, d_state=8, expand=2)
    A = -torch.exp(m.A_log)
    assert torch.allclose(A[0], -torch.arange(1, 9, dtype=torch.float32))
    assert torch.all(m.D == 1)
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert m.dt_rank == 2  # ceil(32 / 16)


def _tiny(**kw):
    cfg = MambaSWELUConfig(vocab_size=97, d_model=32, n_layers=2, dense_hidden=48, max_seq_len=64,
                           scan_backend="ref", **kw)
    torch.manual_seed(0)
    return MambaSWELUForCausalLM(cfg).eval()


def test_step_decoding_equals_full_forward():
    model = _tiny()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        pre = model(ids[:, :5], cache=cache).logits  # prefill 5, then one token at a time
        steps = [model(ids[:, t: t + 1], cache=cache).logits for t in range(5, 19)]
    got = torch.cat([pre, *steps], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)
    assert cache.seen == 19 and cache.ssm[0].shape == (2, 64, 16)


def test_cache_state_size_does_not_grow():
    model = _tiny()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 3)), cache=cache)
        sizes = [t.numel() for t in cache.conv + cache.ssm]
        for _ in range(20):
            model(torch.randint(0, 97, (1, 1)), cache=cache)
    assert [t.numel() for t in cache.conv + cache.ssm] == sizes


def test_document_mask_isolates_packed_documents():
    """With seq_idx, tokens of the second document see nothing of the first (conv, scan, positions)."""
    model = _tiny()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 6))
    other_a = torch.randint(0, 97, (1, 9))
    seq_idx = torch.tensor([[0] * 9 + [1] * 6])
    with torch.no_grad():
        y1 = model(torch.cat([a, b], 1), seq_idx=seq_idx).logits[:, 9:]
        y2 = model(torch.cat([other_a, b], 1), seq_idx=seq_idx).logits[:, 9:]
        alone = model(b).logits
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y1, alone, rtol=1e-4, atol=1e-5)


def test_silu_ablation_has_no_swelu():
    model = _tiny(activation="silu")
    assert model.swelu_modules() == {}
    assert not any("k_raw" in n for n, _ in model.named_parameters())


def test_mixer_cache_shapes():
    m = MambaMixer(16, d_state=4, scan_backend="ref").eval()
    cache = MambaCache()
    with torch.no_grad():
        m(torch.randn(1, 2, 16), cache=cache)  # shorter than d_conv: conv state is left-padded
    assert cache.conv[0].shape == (1, 32, 4) and cache.ssm[0].shape == (1, 32, 4)


def test_activation_checkpointing_same_gradients_less_saved():
    """One checkpoint per block: identical gradients, and autograd keeps less for the backward."""
    from lmlab.train.setup import enable_activation_checkpointing

    cfg = MambaSWELUConfig(vocab_size=97, d_model=32, n_layers=3, dense_hidden=48, max_seq_len=64, dropout=0.1)
    ids = torch.randint(0, 97, (2, 40))
    grads, saved = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = MambaSWELUForCausalLM(cfg).train()
        if ckpt:
            enable_activation_checkpointing(model, "tiny")
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)  # the same dropout masks in both runs (replayed under checkpointing)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append(sum(nbytes))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved[1] < 0.7 * saved[0], saved


def test_activation_checkpointing_refuses_models_without_it():
    from lmlab.errors import ConfigError
    from lmlab.train.setup import enable_activation_checkpointing

    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2), "linear")


def test_mixer_under_cpu_bf16_autocast_makes_no_fp32_copy_of_the_scan_output():
    """Under autocast out_proj casts its input itself: the scan's bf16 output goes to it as it is, not raised to
    fp32 and cast back; without autocast the output keeps the input's dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                casts.append((tuple(args[0].shape), args[0].dtype, (kwargs or {}).get("dtype")))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mixer = MambaMixer(32, 8, 4, 2, 4)  # d_inner 64
    x = torch.randn(2, 12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        y = mixer(x)
    assert y.dtype == torch.bfloat16
    assert not [c for c in casts if c[0] == (2, 12, 64) and c[2] == torch.float32], casts
    assert mixer(x).dtype == torch.float32
