"""The Triton scan and decoding kernels against the reference.

Without a GPU they run on CPU tensors under Triton's interpreter: `test_interpreted` re-runs this file
in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported, so never in this
process). With CUDA the same tests also run natively, at larger sizes.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from test_scan import assert_close_to_ref, case_id, make_inputs, run  # noqa: E402

from lmlab.models import scan as S  # noqa: E402

INTERPRETED = S.triton_interpreted()
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
needs_triton_device = pytest.mark.skipif(DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")

# tiny under the interpreter (it runs every program in Python); bigger on a GPU
CASES = [(2, 3, 21, 4, False, False), (1, 5, 17, 16, True, True), (1, 20, 1, 5, True, True)]
if DEVICE == "cuda":
    CASES += [(4, 300, 1000, 16, True, True), (2, 64, 333, 16, False, False)]


@pytest.mark.skipif(INTERPRETED, reason="this is the driver of the interpreted run")
@pytest.mark.slow
def test_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    tests_dir = os.path.dirname(__file__)
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", __file__],
                         env=env, cwd=tests_dir, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


@needs_triton_device
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_scan_matches_reference(case):
    b, d, l, n, seq, h0 = case
    kw = {k: v.to(DEVICE) for k, v in make_inputs(*case).items()}
    weights = (torch.randn(b, d, l, device=DEVICE), torch.randn(b, d, n, device=DEVICE))
    ref = run(kw, "ref", torch.float64, weights)
    assert_close_to_ref(run(kw, "triton", torch.float32, weights), ref, rtol=1e-4)


@needs_triton_device
def test_triton_scan_bf16_inputs():
    kw = {k: v.to(DEVICE) for k, v in make_inputs(1, 4, 20, 8, False, False).items()}
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "A" else v for k, v in kw.items()}
    y = S.selective_scan(**low, backend="triton")
    assert y.dtype == torch.bfloat16
    y_ref = S.selective_scan_ref(**{k: v.double() if v.is_floating_point() else v for k, v in low.items()})
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


@needs_triton_device
def test_triton_seq_idx_blocks_leakage():
    b, d, l, n, cut = 1, 4, 20, 4, 9
    kw = {k: v.to(DEVICE) for k, v in make_inputs(b, d, l, n, False, False).items()}
    kw["seq_idx"] = (torch.arange(l, device=DEVICE) >= cut).long().expand(b, l)
    y = S.selective_scan(**kw, backend="triton")
    bumped = {**kw, "u": kw["u"].clone()}
    bumped["u"][:, :, :cut] += 3.0
    y2 = S.selective_scan(**bumped, backend="triton")
    assert torch.equal(y[:, :, cut:], y2[:, :, cut:])


@needs_triton_device
def test_triton_state_update_matches_torch():
    from lmlab.models.scan_triton import selective_state_update_triton

    b, d, n = 3, 70, 16
    g = torch.Generator().manual_seed(0)
    state = torch.randn(b, d, n, generator=g).to(DEVICE)
    args = [torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), -torch.rand(d, n, generator=g),
            torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)]
    kw = dict(D=torch.randn(d, generator=g), z=torch.randn(b, d, generator=g),
              dt_bias=torch.randn(d, generator=g))
    args = [a.to(DEVICE) for a in args]
    kw = {k: v.to(DEVICE) for k, v in kw.items()}
    for dt in (args[1], args[1] - 30.0):  # the second exercises softplus far in the negative tail
        s_ref, s_tri = state.clone(), state.clone()
        y_ref = S.selective_state_update_ref(s_ref, args[0], dt, *args[2:], **kw)
        y_tri = selective_state_update_triton(s_tri, args[0], dt, *args[2:], **kw)
        torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s_tri, s_ref, rtol=1e-4, atol=1e-5)


@needs_triton_device
def test_chunk_constant_matches_the_kernel():
    """scan.py states the Triton chunk without importing triton; the kernel module is the truth."""
    from lmlab.models import scan_triton

    assert S.SCAN_CHUNK["triton"] == S.TRITON_CHUNK == scan_triton.CHUNK


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_prefers_a_kernel():
    assert S.resolve_backend("auto", "cuda") in ("mamba_ssm", "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_on_cuda_triton_matches_reference():
    from test_scan import tiny_model

    ref, fast = tiny_model("ref").cuda(), tiny_model("triton").cuda()
    ids = torch.randint(0, 64, (2, 45), device="cuda")
    torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
