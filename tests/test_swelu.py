import pytest
import torch

from lmlab.models.swelu import SWELU, make_activation, swelu, swelu_reference


def _params(k, lam=1.3):
    return (torch.tensor(k, dtype=torch.float64, requires_grad=True),
            torch.tensor(lam, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("k", [0.3, 0.5, 1.0, 1.7, 3.0])
def test_gradcheck_away_from_zero(k):
    torch.manual_seed(0)
    z = torch.randn(32, dtype=torch.float64)
    z = (z + 0.05 * z.sign()).requires_grad_()  # keep |z| >= 0.05: the formula is smooth there
    assert torch.autograd.gradcheck(swelu, (z, *_params(k)))


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_gradcheck_with_zeros_in_input(k):
    z = torch.tensor([0.0, 0.0, 0.4, -0.7, 0.0, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swelu, (z, *_params(k)))


def test_slope_at_zero_is_lambda_for_k1():
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    k, lam = _params(1.0, 0.7)
    swelu(z, k, lam).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 0.7))


@pytest.mark.parametrize("k", [0.1, 0.5, 0.99])
def test_finite_at_zero_for_k_below_one(k):
    z = torch.tensor([0.0, 1e-30, -1e-30, 0.2], requires_grad=True)
    kk, lam = torch.tensor(k, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    y = swelu(z, kk, lam)
    y.sum().backward()
    for t in (y, z.grad, kk.grad, lam.grad):
        assert torch.isfinite(t).all()
    assert y[0] == 0
    # the naive formula breaks exactly here: this is what the custom backward exists for
    z2 = z.detach().clone().requires_grad_()
    kk2 = torch.tensor(k, requires_grad=True)
    swelu_reference(z2, kk2, torch.tensor(1.0)).sum().backward()
    assert not torch.isfinite(z2.grad).all() or not torch.isfinite(kk2.grad).all()


def test_matches_reference_forward_and_backward():
    torch.manual_seed(1)
    z = torch.randn(100, dtype=torch.float64)
    for k in (0.4, 1.0, 2.5):
        a = z.clone().requires_grad_()
        b = z.clone().requires_grad_()
        ka, la = _params(k)
        kb, lb = _params(k)
        ya, yb = swelu(a, ka, la), swelu_reference(b, kb, lb)
        assert torch.allclose(ya, yb)
        (ya * torch.arange(100)).sum().backward()
        (yb * torch.arange(100)).sum().backward()
        for g1, g2 in ((a.grad, b.grad), (ka.grad, kb.grad), (la.grad, lb.grad)):
            assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)


def test_module_learnable_and_fixed():
    m = SWELU(k_init=1.5, lam_init=2.0)
    assert abs(float(m.k) - 1.5) < 1e-6 and float(m.lam) == 2.0
    assert {n for n, _ in m.named_parameters()} == {"k_raw", "lam"}
    fixed = SWELU(learnable=False)
    assert list(fixed.parameters()) == [] and {n for n, _ in fixed.named_buffers()} == {"k_raw", "lam"}
    y = m(torch.tensor([100.0, -100.0]))
    assert torch.allclose(y, torch.tensor([2.0, -2.0]))  # saturates at ±λ


def test_activation_names():
    assert isinstance(make_activation("silu"), torch.nn.SiLU)
    with pytest.raises(ValueError, match="allowed: swelu, silu"):
        make_activation("relu")
