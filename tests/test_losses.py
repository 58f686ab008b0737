"""The chunked LM head and losses (lmlab.train.losses) held to the plain full-logits path: values and gradients with
respect to the hidden states and the head's weight (tied and untied), over chunk sizes (one token, an uneven last
chunk, one chunk for all), chunks whose targets are all -100, label smoothing, fp64 / fp32 / bf16 inputs and bf16
autocast; then whole objectives (pretrain, packed SFT, DPO with a frozen copy and with adapters, IPO, SimPO, ORPO,
KTO) on tiny models with train.chunked_loss on and off, through DDP and FSDP2 of one rank; the policy
(train.chunked_loss, train.loss_chunk_mb) and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.train.losses import (
    LossChunking,
    head_computes,
    linear_cross_entropy_sum,
    linear_token_logps,
    lm_loss_sum,
    lm_token_logps,
    output_head,
    token_logps,
    token_loss_sum,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

V, D = 50, 16


def _data(dtype=torch.float32, seed=0, b=3, l=13):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, l, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (b, l), generator=g)
    t[0, :11] = -100  # with chunks of ≤ 11 rows: a chunk with nothing to predict
    t[1, 4] = -100
    return h, w, t


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


# ------------------------------------------------------------------------------------------ the functions
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 10_000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_sum_matches_the_plain_path(dtype, tol, chunk, smoothing):
    h, w, t = _data(dtype)
    want = token_loss_sum(h @ w.t(), t, smoothing)
    got = linear_cross_entropy_sum(h, w, t, smoothing, chunk)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    got_grads = _grads(got * 1.7, h, w)  # the incoming gradient scales the saved ones
    for a, b in zip(got_grads, _grads(want * 1.7, h, w), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert got_grads[0][0, :11].abs().max() == 0  # rows without a target get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_fused_cpu_softmax_equals_the_torch_ops(dtype, smoothing, monkeypatch):
    """The CPU kernel that turns a chunk's logits into its loss and gradient (kernels_cpu.ce_rows) against the
    torch ops it replaces (kernels_cpu.reference()): it runs, and loss and gradients agree."""
    from lmlab.models import kernels_cpu

    if not kernels_cpu.available():
        pytest.skip("no C++ compiler: the torch ops run")
    calls = []
    real = kernels_cpu.ce_rows
    monkeypatch.setattr(kernels_cpu, "ce_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, t = _data(dtype, b=4, l=40)
    got = linear_cross_entropy_sum(h, w, t, smoothing, chunk_tokens=16)
    got_grads = _grads(got, h, w)
    assert len(calls) == 10  # 4 · 40 rows less the 12 without a target, in chunks of 16
    with kernels_cpu.reference():
        want = linear_cross_entropy_sum(h, w, t, smoothing, chunk_tokens=16)
        want_grads = _grads(want, h, w)
    assert len(calls) == 10
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("vocab,smoothing", [(4096, 0.0), (1000, 0.1)])  # 1000: a row that ends mid-vector
def test_the_fused_cpu_softmax_rounds_a_bf16_gradient_once(vocab, smoothing):
    """bf16 logits: each gradient is the fp32 softmax gradient rounded to bf16 once (the exps stay fp32), so it
    equals torch's fp32 gradient rounded to bf16 but for the last bit of a few elements (the two exps differ in
    their last bits); rounding the exps to bf16 first would change about a quarter of them."""
    from lmlab.models import kernels_cpu

    if not kernels_cpu.available():
        pytest.skip("no C++ compiler: the torch ops run")
    g = torch.Generator().manual_seed(12)
    z = (torch.randn(64, vocab, generator=g) * 3).bfloat16()
    t = torch.randint(0, vocab, (64,), generator=g)
    ref = z.float()
    lse = torch.logsumexp(ref, -1)
    want_loss = (1 - smoothing) * (lse - ref.gather(1, t[:, None]).squeeze(1)) + smoothing * (lse - ref.mean(-1))
    want = torch.softmax(ref, -1) - smoothing / vocab
    want[torch.arange(64), t] -= 1 - smoothing
    got = z.clone()
    loss = kernels_cpu.ce_rows(got, t, smoothing, grad=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    differ = (got != want.bfloat16()).float().mean().item()
    assert differ < 1e-3, differ
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-6)


def test_the_fused_cpu_softmax_refuses_targets_outside_the_vocabulary():
    from lmlab.models import kernels_cpu

    if not kernels_cpu.available():
        pytest.skip("no C++ compiler: the torch ops run")
    z = torch.randn(3, V)
    with pytest.raises(IndexError, match=rf"targets must lie in \[0, {V}\), got 0\.\.{V}"):
        kernels_cpu.ce_rows(z, torch.tensor([0, 1, V]))


def test_cross_entropy_sum_with_a_tied_weight():
    """The weight also feeds the hidden states (an input embedding tied to the head): both gradients add up."""
    _, w, t = _data(torch.float64)
    ids = torch.randint(0, V, t.shape, generator=torch.Generator().manual_seed(1))
    mix = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def hidden():
        return torch.tanh(F.embedding(ids, w) @ mix)

    want = _grads(token_loss_sum(hidden() @ w.t(), t), w)[0]
    got = _grads(linear_cross_entropy_sum(hidden(), w, t, chunk_tokens=4), w)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nothing_to_predict_gives_zero_and_zero_gradients():
    h, w, t = _data(torch.float32)
    t.fill_(-100)
    got = linear_cross_entropy_sum(h, w, t, chunk_tokens=4)
    assert got.item() == 0 == token_loss_sum(h @ w.t(), t).item()
    gh, gw = _grads(got, h, w)
    assert gh.abs().max() == 0 and gw.abs().max() == 0
    lp = linear_token_logps(h, w, t, 4)
    assert lp.abs().max() == 0 and _grads(lp.sum(), h)[0].abs().max() == 0


def test_without_grad_mode_no_gradient_is_kept():
    h, w, t = _data(torch.float32)
    with torch.no_grad():
        got = linear_cross_entropy_sum(h, w, t, chunk_tokens=4)
    assert not got.requires_grad
    torch.testing.assert_close(got, token_loss_sum(h @ w.t(), t).detach())


def test_only_the_weight_or_only_the_hidden_states_need_a_gradient():
    h, w, t = _data(torch.float32)
    frozen = w.detach()
    got = linear_cross_entropy_sum(h, frozen, t, chunk_tokens=3)
    torch.testing.assert_close(_grads(got, h)[0], _grads(token_loss_sum(h @ frozen.t(), t), h)[0])
    fixed = h.detach()
    got = linear_cross_entropy_sum(fixed, w, t, chunk_tokens=3)
    torch.testing.assert_close(_grads(got, w)[0], _grads(token_loss_sum(fixed @ w.t(), t), w)[0])


@pytest.mark.parametrize("chunk", [7, 10_000])  # the head's gradient accumulated in fp32; one chunk's product
def test_bf16_inputs_within_bf16_tolerance(chunk):
    h, w, t = _data(torch.bfloat16)
    want = token_loss_sum(h @ w.t(), t)  # bf16 logits raised to fp32, as the plain path does
    got = linear_cross_entropy_sum(h, w, t, chunk_tokens=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    for a, b in zip(_grads(got, h, w), _grads(want, h, w), strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk", [7, 10_000])  # one chunk: its bf16 product cast to fp32 as it is scaled
def test_bf16_autocast_runs_the_matmul_as_nn_linear_would(chunk):
    h, w, t = _data(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = token_loss_sum(F.linear(h, w), t)
        got = linear_cross_entropy_sum(h, w, t, chunk_tokens=chunk)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    for a, b in zip(_grads(got, h, w), _grads(want, h, w), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    ref32 = token_loss_sum(h @ w.t(), t)
    assert (got - ref32).abs() > 1e-6  # the matmul did run in bf16


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 4, 10_000])
def test_token_logps_match_the_plain_path_under_a_nonlinear_loss(dtype, tol, chunk):
    h, w, labels = _data(dtype, seed=3)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    want = token_logps(h @ w.t(), labels)
    got = linear_token_logps(h, w, targets, chunk)[:, :-1]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    def loss(lp):  # nonlinear in the sums, as DPO is
        s = lp.sum(-1)
        return -F.logsigmoid(0.3 * (s[0] - s[1])) + (s[2] / 10).square()

    for a, b in zip(_grads(loss(got), h, w), _grads(loss(want), h, w), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_token_logps_bf16_within_tolerance():
    h, w, labels = _data(torch.bfloat16, seed=4)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    want, got = token_logps(h @ w.t(), labels), linear_token_logps(h, w, targets, 5)[:, :-1]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    for a, b in zip(_grads(got.sum(), h, w), _grads(want.sum(), h, w), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ the policy
def test_chunk_tokens_and_auto():
    c = LossChunking("auto", 256)
    assert c.chunk_tokens(50_257) == 256 * 2 ** 20 // (4 * 50_257) == 1335
    assert c.chunk_tokens(10 ** 12) == 1
    assert c.wanted(1336, 50_257) and not c.wanted(1335, 50_257)  # on once the logits exceed one chunk
    assert LossChunking("on").wanted(1, 50_257) and not LossChunking("off").wanted(10 ** 9, 50_257)
    assert LossChunking("on", tokens=3).chunk_tokens(50_257) == 3
    cfg = load_config(None, [])
    assert LossChunking.of(cfg) == LossChunking("auto", 256)  # the defaults


class _Tiny(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.lm_head = nn.Linear(D, V, bias=bias)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return type("Out", (), {"logits": self.lm_head(torch.tanh(self.emb(ids)))})()


class _Capped(_Tiny):
    """A head whose logits the forward soft-caps afterwards (as Gemma 2 does)."""

    def forward(self, ids):
        return type("Out", (), {"logits": 30 * torch.tanh(self.lm_head(torch.tanh(self.emb(ids))) / 30)})()


def test_a_model_that_changes_its_logits_takes_the_plain_path():
    m = _Capped()
    ids, t = torch.randint(0, V, (2, 5)), torch.randint(0, V, (2, 5))
    want = token_loss_sum(m(ids).logits, t)
    with pytest.raises(ConfigError, match=r"^train.chunked_loss=on: _Capped's forward changes .*=auto or off$"):
        lm_loss_sum(m, lambda: m(ids), t, LossChunking("on", tokens=3))
    assert m.lm_head.__class__ is nn.Linear  # put back
    auto = LossChunking("auto", tokens=3)
    assert auto.head_for(m, 10) is not None
    torch.testing.assert_close(lm_loss_sum(m, lambda: m(ids), t, auto), want)
    assert auto.head_for(m, 10) is None  # remembered: no second try
    labels = t.clone()
    torch.testing.assert_close(lm_token_logps(m, lambda: m(ids), labels, auto), token_logps(m(ids).logits, labels))


def test_head_computes_swaps_the_head_for_one_forward_and_puts_it_back():
    m = _Tiny()
    head = m.lm_head
    ids = torch.randint(0, V, (2, 5))
    with head_computes(m, lambda h, w: (h.shape, w is head.weight)):
        assert m(ids).logits == (torch.Size([2, 5, D]), True)
    assert m.lm_head is head
    with pytest.raises(RuntimeError), head_computes(m, lambda h, w: h):
        raise RuntimeError
    assert m.lm_head is head and [n for n, _ in m.named_parameters()] == ["emb.weight", "lm_head.weight"]


def test_on_refuses_a_head_it_cannot_compute_in_one_line():
    assert output_head(_Tiny(bias=True)) is None
    with pytest.raises(ConfigError, match=r"^train.chunked_loss=on: .*_Tiny.*Linear.*auto or off$"):
        LossChunking("on").check(_Tiny(bias=True))
    LossChunking("auto").check(_Tiny(bias=True))  # auto falls back to the plain path
    assert LossChunking("auto").head_for(_Tiny(bias=True), 10 ** 9) is None
    LossChunking("on").check(_Tiny())


# ------------------------------------------------------------------------------------------ whole objectives
def _model(name, tied=True, vocab=V, dtype=torch.float64):
    """A tiny model, in float64 by default: the chunked and plain paths then agree to rounding (1e-9), so any
    difference in what they compute shows."""
    from lmlab.models import build_config, build_model

    over = {"d_model": 32, "n_layers": 2, "dense_hidden": 32} if name.startswith("mamba") else {}
    if not tied:
        over["tie_word_embeddings"] = False
    torch.manual_seed(0)
    model = build_model(build_config(name, vocab_size=vocab, overrides=over))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model.to(dtype).train()


def _objective(objective, *extra, chunk=7):
    from lmlab.train.objectives import make_objective

    cfg = load_config(None, [f"train.objective={objective}", *extra])
    obj = make_objective(cfg)
    return obj, LossChunking("on", tokens=chunk), LossChunking("off")


def _on_and_off(obj, model, batch, on, off, params=None):
    """(loss, metrics, gradients) with the chunked path and with the plain one, on the same model."""
    out = []
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    for policy in (on, off):
        obj.chunking = policy
        loss, metrics = obj.loss(model, batch)
        out.append((loss.detach(), {k: v.detach() for k, v in metrics.items()},
                    torch.autograd.grad(loss, params, allow_unused=True)))
    return out


def _assert_same(a, b, tol=1e-9):
    (la, ma, ga), (lb, mb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=tol, atol=tol)
    assert len(ga) == len(gb) and any(g is not None for g in ga)
    for x, y in zip(ga, gb, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _token_batch(b=2, l=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, l), generator=g)
    y = torch.randint(0, V, (b, l), generator=g)
    return x, y


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name, tied", [("mamba-swelu-tiny", True), ("llama-tiny", False), ("inl-tiny", True)])
def test_pretrain_chunked_equals_plain(name, tied, dtype, tol):
    model = _model(name, tied, dtype=dtype)
    x, y = _token_batch()
    y[0, -3:] = -100
    seq = torch.zeros_like(x)
    seq[:, 9:] = 1  # two documents per row, for the models that honour them
    batch = {"input_ids": x, "targets": y}
    if getattr(model, "supports_packed_documents", False):
        batch["seq_idx"] = seq
    obj, on, off = _objective("pretrain")
    _assert_same(*_on_and_off(obj, model, batch, on, off), tol=tol)  # fp32: sums in another order


@pytest.mark.parametrize("name", ["mamba-swelu-tiny", "llama-tiny"])
def test_sft_packed_and_masked_chunked_equals_plain(name):
    model = _model(name)
    x, y = _token_batch(seed=1)
    y[:, :6] = -100  # prompts
    y[:, 11:14] = -100
    seq = torch.zeros_like(x)
    seq[:, 10:] = 1
    pos = torch.cat([torch.arange(10), torch.arange(x.shape[1] - 10)]).expand_as(x)
    batch = {"input_ids": x, "targets": y, "seq_idx": seq, "position_ids": pos}
    obj, on, off = _objective("sft", chunk=4)
    _assert_same(*_on_and_off(obj, model, batch, on, off))


def _pairs(b=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side, width in (("chosen", 15), ("rejected", 12)):
        ids = torch.randint(0, V, (b, width), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100  # the prompt
        labels[1, -2:] = -100  # padding
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    return batch


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_pair_objectives_chunked_equal_plain_with_a_frozen_copy(objective):
    model = _model("mamba-swelu-tiny")
    obj, on, off = _objective(objective, "finetune.method=full")
    obj.check_model(model)
    obj.setup(model, model, None)
    _perturb(model)  # the policy moves away from its reference
    _assert_same(*_on_and_off(obj, model, _pairs(), on, off))


def test_dpo_with_lora_adapters_chunked_equals_plain():
    from lmlab.train.adapters import add_adapters

    obj, on, off = _objective("dpo", "finetune.method=lora", "finetune.lora_dropout=0", "model.name=llama-tiny")
    model = add_adapters(_model("llama-tiny", tied=False), obj.cfg).train()
    _perturb(model)
    obj.check_model(model)
    obj.setup(model, model, None)
    assert obj.reference is None  # the reference is the base with its adapters off
    _assert_same(*_on_and_off(obj, model, _pairs(), on, off))


def test_kto_chunked_equals_plain():
    obj, on, off = _objective("kto", "finetune.method=full")
    model = _model("mamba-swelu-tiny")
    obj.check_model(model)
    obj.setup(model, model, None)
    _perturb(model)
    p = _pairs(b=3)
    batch = {"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"],
             "kl_input_ids": p["chosen_input_ids"].roll(1, 0), "kl_labels": p["chosen_labels"].roll(1, 0),
             "desirable": torch.tensor([True, False, True])}
    _assert_same(*_on_and_off(obj, model, batch, on, off))


def test_token_logps_of_a_model_as_grpo_takes_them():
    model = _model("llama-tiny", tied=False)
    x, labels = _pairs()["chosen_input_ids"], _pairs()["chosen_labels"]
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out = []
    for policy in (LossChunking("on", tokens=5), LossChunking("off")):
        lp = lm_token_logps(model, lambda: model(input_ids=x), labels, policy)
        loss = -(torch.exp(lp - lp.detach()) * adv[:, None]).sum() + lp.square().sum()
        out.append((lp.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_auto_leaves_a_small_batch_on_the_plain_path_where_chunks_are_not_faster(monkeypatch):
    import lmlab.train.losses as losses

    monkeypatch.setattr(losses, "FASTER_CHUNKED_ON", ())  # as on a GPU
    model = _model("mamba-swelu-tiny")
    x, y = _token_batch()
    calls = []
    monkeypatch.setattr(losses, "linear_cross_entropy_sum", lambda *a, **k: calls.append(1) or a[0].sum())
    lm_loss_sum(model, lambda: model(x), y, LossChunking("auto", 1.0))  # 38 tokens × 50 × 4 B < 1 MiB
    assert calls == []
    lm_loss_sum(model, lambda: model(x), y, LossChunking("auto", 38 * V * 4 / 2 ** 20 * 0.99))
    assert calls == [1]


def test_auto_chunks_even_a_small_batch_on_the_cpu(monkeypatch):
    import lmlab.train.losses as losses

    model = _model("mamba-swelu-tiny")
    x, y = _token_batch()
    calls = []
    monkeypatch.setattr(losses, "linear_cross_entropy_sum", lambda *a, **k: calls.append(1) or a[0].sum())
    lm_loss_sum(model, lambda: model(x), y, LossChunking("auto", 1.0))
    assert calls == [1]
    lm_loss_sum(model, lambda: model(x), y, LossChunking("off", 1.0))
    assert calls == [1]


# ------------------------------------------------------------------------------------------ strategies
def test_under_ddp_the_gradients_equal_the_plain_path(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model("llama-tiny", tied=False)
    wrapped = DDP(model)
    x, y = _token_batch()
    obj, on, off = _objective("pretrain")
    grads = []
    for policy in (on, off):
        obj.chunking = policy
        loss, _ = obj.loss(wrapped, {"input_ids": x, "targets": y})
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["loss", "logps"])
@pytest.mark.parametrize("name", ["llama-tiny", "mamba-swelu-tiny"])
def test_under_fsdp2_the_head_is_computed_whole_inside_the_forward(one_rank_group, name, kind, monkeypatch):
    """Outside the forward FSDP2's weights are sharded DTensors; the chunked head reads the weight inside the
    forward, where the root has it gathered (and the log-probabilities' backward finds it gathered again), and
    its gradient reaches the shards as the plain path's does."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import lmlab.train.losses as losses

    fn = "linear_cross_entropy_sum" if kind == "loss" else "linear_token_logps"
    seen, real = [], getattr(losses, fn)
    monkeypatch.setattr(losses, fn, lambda h, w, *a: seen.append(type(w)) or real(h, w, *a))

    model = _model(name, tied=name != "llama-tiny")
    plain = copy.deepcopy(model)
    for m in (model, plain):
        scalars = {p for p in m.parameters() if p.dim() == 0}  # fully_shard refuses them; lmlab keeps them whole
        for blk in (m.model.layers if hasattr(m, "model") else m.blocks):
            fully_shard(blk, ignored_params=scalars)
        fully_shard(m, ignored_params=scalars)
    assert isinstance(model.get_output_embeddings().weight, DTensor)
    x, y = _token_batch()
    obj, on, off = _objective("pretrain")
    grads = []
    for m, policy in ((model, on), (plain, off)):
        if kind == "loss":
            obj.chunking = policy
            loss, _ = obj.loss(m, {"input_ids": x, "targets": y})
        else:
            lp = lm_token_logps(m, lambda m=m: m(input_ids=x), y, policy)
            loss = -F.logsigmoid(lp.sum(-1)[0] - lp.sum(-1)[1]) + lp.square().sum()
        loss.backward()
        grads.append((loss.detach(), [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                                      for p in m.parameters()]))
    assert seen == [nn.Parameter]  # the gathered weight, once
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
