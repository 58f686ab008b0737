"""MambaSWELU ablation switches: `activation: silu` and `swelu_learnable: false`."""

import torch
from torch import nn

from lmlab.models import build_config, build_model
from lmlab.models.swelu import SWELU


def test_silu_ablation_has_no_swelu_parameters():
    base = build_model(build_config("mamba-swelu-tiny"), device="meta")
    silu = build_model(build_config("mamba-swelu-tiny", overrides={"activation": "silu"}), device="meta")
    assert not any(isinstance(m, SWELU) for m in silu.modules())
    assert not any(n.endswith(("k_raw", "lam")) for n, _ in silu.named_parameters())
    assert any(isinstance(m, nn.SiLU) for m in silu.modules())
    n_swelu = sum(isinstance(m, SWELU) for m in base.modules())  # one per block + one per dense layer
    assert n_swelu == base.config.n_layers + base.config.n_dense
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(base) - count(silu) == 2 * n_swelu  # k and λ per SWELU


def test_frozen_swelu_keeps_k_and_lambda_as_buffers():
    model = build_model(build_config("mamba-swelu-tiny", vocab_size=64, overrides={"swelu_learnable": False}))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for act in (m for m in model.modules() if isinstance(m, SWELU)):
        assert not isinstance(act.k_raw, nn.Parameter) and not isinstance(act.lam, nn.Parameter)
    assert not any(n.endswith(("k_raw", "lam")) for n in params)
    n_swelu = model.config.n_layers + model.config.n_dense
    assert sum(n.endswith(("k_raw", "lam")) for n in buffers) == 2 * n_swelu
    frozen = {n: b.clone() for n, b in buffers.items() if n.endswith(("k_raw", "lam"))}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 7))
    for _ in range(3):  # trains without touching them
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(buffers[n], v) for n, v in frozen.items())
    assert sum(not torch.equal(p.detach(), before[n]) for n, p in params.items()) > len(params) // 2
