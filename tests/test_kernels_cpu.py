"""The fused CPU kernels against their torch references: values and gradients, fp32 and bf16, documents kept
apart, the same result on any thread count, and the whole model with and without them."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import build_config, build_model, kernels_cpu
from lmlab.models.common import LayerNorm
from lmlab.models.mamba import causal_conv
from lmlab.models.swelu import swelu, swelu_torch

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason="no C++ compiler: the fused kernels are off")


def _grads(fn, inputs, g):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g)


@pytest.mark.parametrize("k", [0.4, 1.0, 2.5])
def test_swelu_matches_the_reference_values_and_gradients(k):
    torch.manual_seed(0)
    z = torch.randn(3, 70, 129) * 2
    z[0, 0, :5] = 0.0  # the slope at 0 (clamped for k < 1) and dk's limit there
    z[1, 1, :3] = torch.tensor([1e-8, -1e-7, 3e-6])
    z.requires_grad_(True)
    kt, lam = torch.tensor(k, requires_grad=True), torch.tensor(1.3, requires_grad=True)
    g = torch.randn(z.shape)
    y1, (gz1, gk1, gl1) = _grads(kernels_cpu.swelu_fused, (z, kt, lam), g)
    # the reference evaluated in float64: torch's fp32 exp has been seen off by 1e-4 on a worker thread's first
    # call in a process (under pytest, 2 threads), which would fail this test for the reference's sake
    z64, k64, l64 = (t.detach().double().requires_grad_() for t in (z, kt, lam))
    y2, grads = _grads(swelu_torch, (z64, k64, l64), g.double())
    y2, (gz2, gk2, gl2) = y2.float(), (t.float() for t in grads)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz1, gz2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gk1, gk2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gl1, gl2, rtol=1e-4, atol=1e-4)
    assert gz1.abs().sum() > 0 and torch.isfinite(gz1).all()


def test_swelu_in_bf16_computes_in_fp32():
    """A bf16 input gives the fp32 result rounded once (not bf16 arithmetic throughout)."""
    torch.manual_seed(1)
    z = torch.randn(8, 4096).bfloat16().requires_grad_(True)
    k, lam = torch.tensor(0.7, requires_grad=True), torch.tensor(1.1, requires_grad=True)
    y = kernels_cpu.swelu_fused(z, k, lam)
    assert y.dtype == torch.bfloat16
    ref = swelu_torch(z.detach().float(), k.detach(), lam.detach())
    torch.testing.assert_close(y.float(), ref.bfloat16().float(), rtol=0, atol=0)
    g = torch.randn(z.shape).bfloat16()
    gz, gk, gl = torch.autograd.grad(y, (z, k, lam), g)
    zf = z.detach().float().requires_grad_(True)
    gzr, gkr, glr = torch.autograd.grad(swelu_torch(zf, k, lam), (zf, k, lam), g.float())
    assert gz.dtype == torch.bfloat16 and gk.dtype == torch.float32
    torch.testing.assert_close(gz.float(), gzr.bfloat16().float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(gk, gkr, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gl, glr, rtol=1e-4, atol=1e-3)


def test_the_module_uses_the_fused_kernel_on_cpu_and_the_reference_when_asked(monkeypatch):
    calls = []
    real = kernels_cpu.swelu_fused
    monkeypatch.setattr(kernels_cpu, "swelu_fused", lambda *a: calls.append(1) or real(*a))
    z, k, lam = torch.randn(10), torch.tensor(1.0), torch.tensor(1.0)
    swelu(z, k, lam)
    assert calls == [1]
    with kernels_cpu.reference():
        swelu(z, k, lam)
    assert calls == [1]


def _conv_ref(x_rows, conv, seq_idx):
    return F.silu(causal_conv(conv, x_rows.transpose(1, 2), seq_idx)).transpose(1, 2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("documents", [False, True])
def test_conv_silu_matches_the_reference(bias, documents):
    torch.manual_seed(2)
    b, l, d, K = 3, 41, 20, 4
    conv = torch.nn.Conv1d(d, d, K, groups=d, padding=K - 1, bias=bias)
    xz = torch.randn(b, l, 2 * d, requires_grad=True)  # the mixer reads x in place from in_proj's output
    x = xz[..., :d]
    seq = None
    if documents:
        seq = torch.zeros(b, l, dtype=torch.long)
        seq[0, 10:] = 1
        seq[0, 12:] = 2  # a two-token document: taps must not reach back over it
        seq[2, 1:] = 1
    g = torch.randn(b, l, d)
    params = [xz, conv.weight] + ([conv.bias] if bias else [])
    u1 = kernels_cpu.conv_silu(x, conv.weight, conv.bias, seq)
    u2 = _conv_ref(x, conv, seq)
    torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-6)
    assert u1.is_contiguous() and u1.shape == (b, l, d)
    for a, r in zip(torch.autograd.grad(u1, params, g), torch.autograd.grad(u2, params, g)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        assert a.abs().sum() > 0


def test_conv_silu_bf16_is_the_fp32_result_rounded():
    torch.manual_seed(3)
    conv = torch.nn.Conv1d(16, 16, 4, groups=16, padding=3)
    x = torch.randn(2, 30, 16).bfloat16()
    u = kernels_cpu.conv_silu(x, conv.weight, conv.bias)
    ref = _conv_ref(x.float(), conv, None).detach()
    assert u.dtype == torch.bfloat16
    torch.testing.assert_close(u.float(), ref.bfloat16().float(), rtol=0, atol=0.02)


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(4)
    z = torch.randn(70_000, requires_grad=True)
    conv = torch.nn.Conv1d(64, 64, 4, groups=64, padding=3)
    x = torch.randn(4, 300, 64, requires_grad=True)
    k, lam = torch.tensor(0.8, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = kernels_cpu.swelu_fused(z, k, lam)
            u = kernels_cpu.conv_silu(x, conv.weight, conv.bias)
            n = kernels_cpu.layer_norm(x, conv.bias, conv.bias, 1e-5, torch.bfloat16)
            loss = y.sum() + (u * u).sum() + (n.float() * u).sum()
            outs.append([y, u, n, *torch.autograd.grad(loss, (z, k, lam, x, conv.weight, conv.bias))])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True])
def test_the_model_with_fused_kernels_matches_the_reference_paths(packed):
    """mamba-swelu-tiny's logits and every parameter's gradient, fused kernels on vs the torch references."""
    torch.manual_seed(5)
    model = build_model(build_config("mamba-swelu-tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 49))
    seq = torch.tensor([[0] * 20 + [1] * 28, [0] * 48]) if packed else None

    def run():
        logits = model(ids[:, :-1], seq_idx=seq).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        return logits, torch.autograd.grad(loss, list(model.parameters()))

    fused_logits, fused_grads = run()
    with kernels_cpu.reference():
        ref_logits, ref_grads = run()
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for (name, _), a, r in zip(model.named_parameters(), fused_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=2e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("zdt", [torch.float32, torch.bfloat16])
def test_swelu_residual_is_the_residual_plus_swelu(zdt):
    torch.manual_seed(8)
    z = (torch.randn(3, 50, 40) * 2).to(zdt)
    z[0, 0, :3] = 0.0  # the slope's clamp at 0
    h = torch.randn(3, 50, 40)
    k, lam = torch.tensor(0.7), torch.tensor(1.3)
    args = [t.clone().requires_grad_() for t in (z, k, lam, h)]
    ref_args = [t.clone().requires_grad_() for t in (z, k, lam, h)]
    y = kernels_cpu.swelu_residual(*args)
    ref = ref_args[3] + swelu_torch(ref_args[0].float(), ref_args[1], ref_args[2])  # the SWELU term unrounded
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, args, g), torch.autograd.grad(ref, ref_args, g)
    assert got[0].dtype == zdt and torch.equal(got[3], g)
    tol = dict(rtol=1e-2, atol=1e-2) if zdt == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for name, a, r in zip(("z", "k", "lam", "h"), got, want):
        torch.testing.assert_close(a.float(), r.float(), msg=name, **tol)


def _layer_norm_case(xdt, seed=6):
    torch.manual_seed(seed)
    x = (torch.randn(3, 150, 96) * 3 + 1).to(xdt)  # 450 rows: 7 blocks of 64, the last one short
    w, b = torch.randn(96) * 0.5 + 1, torch.randn(96)
    return x, w, b


@pytest.mark.parametrize("xdt,odt", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                     (torch.bfloat16, torch.bfloat16)])
def test_layer_norm_matches_nn_layernorm_then_the_cast(xdt, odt):
    x, w, b = _layer_norm_case(xdt)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_args = [t.clone().requires_grad_() for t in (x, w, b)]
    y = kernels_cpu.layer_norm(*args, 1e-5, odt)
    ref = F.layer_norm(ref_args[0].float(), (96,), ref_args[1], ref_args[2], 1e-5).to(odt)
    assert y.dtype == odt and y.shape == x.shape
    # the fp32 statistics may differ from torch's in the last bit: one bf16 step at most where the output rounds
    tol = dict(rtol=8e-3, atol=1e-2) if odt == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), ref.float(), **tol)
    g = torch.randn(x.shape).to(odt)
    got = torch.autograd.grad(y, args, g)
    want = torch.autograd.grad(ref, ref_args, g)
    assert got[0].dtype == xdt
    for name, a, r in zip("xwb", got, want):
        gtol = dict(rtol=2e-2, atol=2e-2) if xdt == torch.bfloat16 and name == "x" else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.float(), r.float(), msg=name, **gtol)


def test_the_norm_module_is_nn_layernorm_except_under_cpu_bf16_autocast():
    x, _, _ = _layer_norm_case(torch.float32)
    norm, plain = LayerNorm(96), torch.nn.LayerNorm(96)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    plain.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), plain(x))  # no autocast: nn.LayerNorm itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        ref = plain(x)
        with kernels_cpu.reference():
            assert norm(x).dtype == torch.float32  # the reference path: nn.LayerNorm's fp32, cast by the next Linear
    assert y.dtype == torch.bfloat16 and ref.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.bfloat16().float(), rtol=8e-3, atol=1e-2)


def test_the_public_kernels_refuse_what_they_cannot_read():
    z = torch.randn(3, 8)
    with pytest.raises(ValueError, match="res must be float32"):
        kernels_cpu.swelu_residual(z, torch.tensor(1.0), torch.tensor(1.0), torch.randn(3, 8).bfloat16())
    with pytest.raises(ValueError, match="res must be float32"):
        kernels_cpu.swelu_residual(z, torch.tensor(1.0), torch.tensor(1.0), torch.randn(3, 9))
    with pytest.raises(ValueError, match="x must be bfloat16"):
        kernels_cpu.widen_scale(z, 2.0)
    with pytest.raises(ValueError, match="weight and bias of 8 elements"):
        kernels_cpu.layer_norm(z, torch.ones(7), torch.zeros(8), 1e-5, torch.bfloat16)


def test_a_norm_over_several_dimensions_stays_nn_layernorm():
    x = torch.randn(5, 4, 6)
    norm, plain = LayerNorm((4, 6)), torch.nn.LayerNorm((4, 6))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    plain.load_state_dict(norm.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), plain(x))


@pytest.mark.parametrize("n", [5, 16, 40_000])
def test_widen_scale_is_the_cast_then_the_multiply_bitwise(n):
    torch.manual_seed(7)
    x = (torch.randn(n) * 50).bfloat16()
    for scale in (1 / 1024, 1 / 777, 3.0):
        assert torch.equal(kernels_cpu.widen_scale(x, scale), x.float().mul_(torch.tensor(scale, dtype=torch.float32)))


def test_missing_compiler_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(kernels_cpu.LIBRARY, "lib", None)
    monkeypatch.setattr(kernels_cpu.LIBRARY, "error", "no C++ compiler found")
    assert not kernels_cpu.usable(torch.zeros(1))
    z = torch.randn(50)
    torch.testing.assert_close(swelu(z, torch.tensor(1.0), torch.tensor(1.0)),
                               swelu_torch(z, torch.tensor(1.0), torch.tensor(1.0)))
