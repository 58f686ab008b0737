"""Every CPU scan backend against the sequential reference: outputs and gradients of all inputs.

The reference runs in float64 on the same values; fast backends run in float32 and must agree to
~1e-4 of the largest reference value. Shapes are random-ish and cut across the chunk sizes
(16 for `triton`, 32 for `chunked`, 64 for `cpu`), with L = 1 and batch 1 included; one case puts
document boundaries exactly on chunk boundaries. The fallback without a C++ compiler is exercised in
fresh processes (no compiler on PATH; a compiler without OpenMP, two processes building at once).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import MambaSWELUConfig, MambaSWELUForCausalLM
from lmlab.models import scan as S

FAST = ["chunked", "cpu"]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]

# (b, d, l, n, seq_idx: False / True (random documents) / positions where documents start, with initial_state)
CASES = [
    (2, 3, 37, 4, False, False),
    (1, 5, 65, 16, True, True),
    (2, 4, 1, 16, False, True),
    (1, 2, 1, 3, True, False),
    (3, 6, 130, 16, True, False),
    (2, 7, 64, 5, False, True),
    (1, 3, 33, 16, False, False),
    (2, 3, 130, 16, (1, 16, 32, 64, 65, 128), True),  # resets on the chunk boundaries of every backend
]


def case_id(c):
    return "b{}d{}l{}n{}{}{}".format(*c[:4], "-seq" if c[4] is True else "-cuts" if c[4] else "", "-h0" * c[5])


def make_inputs(b, d, l, n, seq, h0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    A = -(0.1 + 2 * torch.rand(d, n, generator=g)).to(dtype)
    kw = dict(u=r(b, d, l), delta=r(b, d, l, scale=0.5), A=A,
              B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d, scale=0.5))
    if h0:
        kw["initial_state"] = r(b, d, n)
    if seq is True:
        kw["seq_idx"] = torch.sort(torch.randint(0, 3, (b, l), generator=g), dim=1).values
    elif seq:
        kw["seq_idx"] = sum((torch.arange(l) >= cut).long() for cut in seq).expand(b, l).contiguous()
    if seq and l > 1:  # a seq_idx case that resets nothing would test nothing
        assert S.reset_mask(kw["seq_idx"]).any()
    return kw


def run(kw, backend, dtype, weights):
    """Output, last state and the gradients of a fixed random functional of both, w.r.t. every input."""
    leaves = {k: v.detach().to(dtype).requires_grad_() if k != "seq_idx" else v for k, v in kw.items()}
    y, last = S.selective_scan(**leaves, return_last_state=True, backend=backend)
    wy, wl = weights
    loss = (y * wy.to(dtype)).sum() + (last * wl.to(dtype)).sum()
    names = [k for k in NAMES if k in leaves]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return {"y": y, "last": last, **{f"d{k}": gr for k, gr in zip(names, grads)}}


def assert_close_to_ref(got, ref, rtol, zero=()):
    """`zero`: gradients that are exactly zero by construction (A with one step and no initial state)."""
    for key, r in ref.items():
        g = got[key].double()
        err = (g - r).abs().max().item()
        scale = r.abs().max().item()
        if key in zero:
            assert scale == 0 and err == 0, f"{key}: must be exactly zero here"
            continue
        assert scale > 1e-6, f"{key}: the reference is ~0, the comparison would be vacuous"
        assert err <= rtol * scale, f"{key}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_matches_reference(backend, case):
    b, d, l, n, seq, h0 = case
    kw = make_inputs(*case)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(b, d, l, generator=g), torch.randn(b, d, n, generator=g))
    ref = run(kw, "ref", torch.float64, weights)
    zero = ("dA",) if l == 1 and not h0 else ()  # h_0 = δ·B·u: nothing flows through exp(δ·A)
    assert_close_to_ref(run(kw, backend, torch.float32, weights), ref, rtol=1e-4, zero=zero)


@pytest.mark.parametrize("backend", FAST)
def test_backend_float64_is_exact(backend):
    kw = make_inputs(2, 3, 70, 16, True, True)
    weights = (torch.randn(2, 3, 70), torch.randn(2, 3, 16))
    ref = run(kw, "ref", torch.float64, weights)
    assert_close_to_ref(run(kw, backend, torch.float64, weights), ref, rtol=1e-10)


def as_row_views(kw):
    """The same values as the mixer hands them over: u, delta, z (b, d, l) and B, C (b, n, l) as transposed views
    of (b, l, ·) rows, z a slice of a wider row (every channel stride 1, time strides > d)."""
    out = dict(kw)
    b, d, l = kw["u"].shape
    xz = torch.cat([kw["u"], kw["z"]], dim=1).transpose(1, 2).contiguous()  # (b, l, 2d)
    out["u"], out["z"] = xz[..., :d].transpose(1, 2), xz[..., d:].transpose(1, 2)
    bc = torch.cat([kw["B"], kw["C"]], dim=1).transpose(1, 2).contiguous()  # (b, l, 2n)
    n = kw["B"].shape[1]
    out["B"], out["C"] = bc[..., :n].transpose(1, 2), bc[..., n:].transpose(1, 2)
    out["delta"] = kw["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    assert out["u"].stride(1) == out["z"].stride(1) == out["delta"].stride(1) == 1
    return out


ROW_CASES = [(2, 40, 70, 16, True, True), (3, 16, 65, 5, False, False), (1, 33, 9, 16, True, False)]


def _needs_kernel():
    if not S.scan_cpu.cpu_kernel_available():
        pytest.skip("no C++ compiler: the cpu backend runs `chunked`")


@pytest.mark.parametrize("case", ROW_CASES, ids=case_id)
def test_cpu_row_views_equal_contiguous_inputs_bitwise(case):
    """The kernel's vector loads of the mixer's row views (full channel blocks, and a short last one) give the
    bits its strided loads of contiguous (b, d, l) tensors give, outputs and every gradient; both near the reference."""
    _needs_kernel()
    kw = make_inputs(*case)
    weights = (torch.randn(case[0], case[1], case[2]), torch.randn(case[0], case[1], case[3]))
    got, want = run(as_row_views(kw), "cpu", torch.float32, weights), run(kw, "cpu", torch.float32, weights)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert_close_to_ref(got, run(kw, "ref", torch.float64, weights), rtol=1e-4)


def _projections(dtype, seed=11, b=2, l=70, d=40, n=16, rank=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s)  # noqa: E731
    u, z = r(b, l, d).to(dtype), r(b, l, d).to(dtype)
    w_x, w_dt = r(rank + 2 * n, d, s=0.3).to(dtype), r(d, rank, s=0.3).to(dtype)
    dt_bias, A, D = r(d, s=0.1) - 2, -torch.rand(d, n, generator=g) * 4 - 0.5, r(d)
    return [u, w_x, w_dt, dt_bias, A, D, z]


def _composed(u, w_x, w_dt, dt_bias, A, D, z, seq_idx, rank, n):
    """What the mixer runs without the fused node: x_proj, split, dt_proj, and the scan of the cpu backend."""
    dt, B, C = torch.split(u @ w_x.t(), [rank, n, n], dim=-1)
    y = S.selective_scan(u.transpose(1, 2), (dt @ w_dt.t()).transpose(1, 2), A, B.transpose(1, 2),
                         C.transpose(1, 2), D=D, z=z.transpose(1, 2), delta_bias=dt_bias, seq_idx=seq_idx,
                         backend="cpu")
    return y.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_projected_scan_is_the_projections_then_the_scan(dtype, packed):
    """x_proj, dt_proj and the scan as one node (its x_proj input gradient added into the scan's du by the
    matmul) against the three composed: output and the seven gradients."""
    _needs_kernel()
    seq_idx = torch.tensor([[0] * 30 + [1] * 40, [0] * 70]) if packed else None
    inputs = _projections(dtype)
    weight = torch.randn(2, 70, 40)
    results = []
    for fused in (True, False):
        args = [t.clone().requires_grad_() for t in inputs]
        y = (S.projected_scan(*args, seq_idx=seq_idx, backend="cpu") if fused
             else _composed(*args, seq_idx, 5, 16))
        results.append([y.float(), *torch.autograd.grad((y.float() * weight).sum(), args)])
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    names = ("y", "u", "w_x", "w_dt", "dt_bias", "A", "D", "z")
    for name, got, want in zip(names, *results):
        scale = want.float().abs().max().clamp(min=1)
        torch.testing.assert_close(got.float() / scale, want.float() / scale, msg=name, **tol)


def test_projected_scan_is_fused_only_on_the_cpu_backend():
    inputs = _projections(torch.float32)
    assert S.projected_scan(*inputs, backend="chunked") is None
    assert S.projected_scan(*[t.double() for t in inputs], backend="cpu") is None
    if S.scan_cpu.cpu_kernel_available():
        assert S.projected_scan(*inputs, backend="cpu").shape == (2, 70, 40)


# du, dΔ, dz of 1 MiB or more each (the kernel's STREAM_BYTES) leave the backward as whole cache lines written with
# non-temporal stores: d = 1040 is 65 blocks of 16 lanes in groups of 2 and 3 (of 130 and 65 blocks with 8 lanes), so
# fp32 rows are 64-byte aligned and half the bf16 ones are not; l = 260 makes each bf16 output 1.03 MiB
STREAMED = (2, 1040, 260, 16, (1, 64, 100), True)


def test_cpu_streamed_outputs_match_reference():
    """At the sizes whose backward streams its outputs, the kernel still agrees with the float64 reference, through
    the mixer's row views too (fp32: every output 2.1 MiB)."""
    _needs_kernel()
    b, d, l, n = STREAMED[:4]
    assert b * l * d * 2 >= 2**20  # bf16 outputs as large as STREAM_BYTES (test below)
    kw = make_inputs(*STREAMED)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(b, d, l, generator=g), torch.randn(b, d, n, generator=g))
    assert_close_to_ref(run(as_row_views(kw), "cpu", torch.float32, weights), run(kw, "ref", torch.float64, weights),
                        rtol=1e-4)


@pytest.mark.parametrize("case", [(2, 40, 70, 16, True, True), STREAMED], ids=["small", "streamed"])
def test_cpu_bf16_storage_is_the_float32_scan_rounded(case):
    """bf16 inputs are read and outputs written as bf16 with everything computed in fp32 (the state, A, D, the
    parameter gradients stay fp32): every result equals the fp32 scan of the same (bf16-valued) inputs, rounded
    to bf16 as torch rounds, to the bit (the streamed size: through the kernel's vector rounding)."""
    _needs_kernel()
    b, d, l, n = case[:4]
    kw = make_inputs(*case)
    for k in ("u", "delta", "z", "B", "C"):
        kw[k] = kw[k].to(torch.bfloat16).float()
    rows = as_row_views(kw)
    weights = (torch.randn(b, d, l).to(torch.bfloat16).float(), torch.randn(b, d, n))

    def scan(dtype):
        leaves = {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v).detach().requires_grad_()
                  if k != "seq_idx" else v for k, v in rows.items()}
        y, last = S.selective_scan(**leaves, return_last_state=True, backend="cpu")
        loss = (y.float() * weights[0]).sum() + (last * weights[1]).sum()
        names = [k for k in NAMES if k in leaves]
        return {"y": y, "last": last, **dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))}

    got, want = scan(torch.bfloat16), scan(torch.float32)
    assert got["y"].dtype == got["u"].dtype == got["B"].dtype == torch.bfloat16 and got["last"].dtype == torch.float32
    assert got["A"].dtype == torch.float32
    for key in want:
        assert torch.equal(got[key], want[key].to(got[key].dtype)), key


@pytest.mark.parametrize("backend", ["ref", *FAST])
def test_without_optional_inputs(backend):
    """No D, z, bias, softplus; no last state: the plain return value."""
    kw = make_inputs(2, 3, 20, 4, False, False)
    for k in ("D", "z", "delta_bias"):
        kw.pop(k)
    y = S.selective_scan(**kw, delta_softplus=False, backend=backend)
    y_ref = S.selective_scan_ref(**{k: v.double() for k, v in kw.items()}, delta_softplus=False)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 20) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["ref", *FAST])
def test_seq_idx_blocks_leakage(backend):
    """Perturbing document 1 changes nothing in document 2, outputs and gradients alike."""
    b, d, l, n = 2, 4, 50, 8
    kw = make_inputs(b, d, l, n, False, False)
    cut = 23
    kw["seq_idx"] = (torch.arange(l) >= cut).long().expand(b, l)
    y = S.selective_scan(**kw, backend=backend)
    bumped = dict(kw)
    for k in ("u", "delta", "z"):
        bumped[k] = kw[k].clone()
        bumped[k][:, :, :cut] += 3.0
    for k in ("B", "C"):
        bumped[k] = kw[k].clone()
        bumped[k][:, :, :cut] -= 2.0
    y2 = S.selective_scan(**bumped, backend=backend)
    assert torch.equal(y[:, :, cut:], y2[:, :, cut:])
    assert not torch.allclose(y[:, :, :cut], y2[:, :, :cut])
    u = kw["u"].clone().requires_grad_()
    S.selective_scan(**{**kw, "u": u}, backend=backend)[:, :, cut:].sum().backward()
    assert torch.count_nonzero(u.grad[:, :, :cut]) == 0


@pytest.mark.parametrize("backend", ["ref", *FAST])
def test_step_decoding_equals_full_scan(backend):
    """Scan a prefix with return_last_state, then selective_state_update step by step = one full scan."""
    b, d, l, n, pre = 2, 5, 19, 16, 7
    kw = make_inputs(b, d, l, n, False, False)
    full = S.selective_scan(**kw, backend=backend)
    head = {k: (v[..., :pre] if v.dim() == 3 else v) for k, v in kw.items()}
    y_head, state = S.selective_scan(**head, return_last_state=True, backend=backend)
    steps = [S.selective_state_update(state, kw["u"][:, :, t], kw["delta"][:, :, t], kw["A"],
                                      kw["B"][:, :, t], kw["C"][:, :, t], D=kw["D"], z=kw["z"][:, :, t],
                                      dt_bias=kw["delta_bias"])
             for t in range(pre, l)]
    got = torch.cat([y_head, torch.stack(steps, dim=-1)], dim=-1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)


def test_resolve_backend(monkeypatch):
    assert S.resolve_backend("auto", "cpu") in ("cpu", "chunked")
    assert S.resolve_backend("chunked", "cpu") == "chunked"
    assert "ref" in S.available_backends("cpu") and "cpu" not in S.available_backends("cuda")
    with pytest.raises(ConfigError, match=r"^model.scan_backend: 'fast' is not a scan backend; allowed on cpu: auto, "):
        S.resolve_backend("fast", "cpu")
    with pytest.raises(ConfigError, match="^model.scan_backend: 'cpu' runs on CPU tensors only; allowed on cuda"):
        S.resolve_backend("cpu", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as err:
        S.resolve_backend("triton", "cpu")
    assert "\n" not in str(err.value) and "'triton'" in str(err.value)
    assert str(err.value).endswith("allowed on cpu: auto, ref, chunked, cpu")
    # the planner's view: the device type alone, nothing imported or built
    assert S.resolve_backend("auto", "cuda", probe=False) == "triton"
    assert S.resolve_backend("auto", "cpu", probe=False) == "cpu"
    assert S.resolve_backend("mamba_ssm", "cuda", probe=False) == "mamba_ssm"
    assert S.available_backends("cuda", probe=False) == ["ref", "chunked", "triton", "mamba_ssm"]


def test_backend_names_and_chunks_are_the_kernels_constants():
    from lmlab.models import scan_cpu

    assert tuple(S.BACKENDS) == S.BACKEND_NAMES and S.SCAN_CHOICES == ("auto", *S.BACKEND_NAMES)
    assert S.SCAN_CHUNK["chunked"] == scan_cpu.CHUNK and S.SCAN_CHUNK["cpu"] == scan_cpu.CPU_CHUNK
    assert set(S.SCAN_CHUNK) == set(S.BACKEND_NAMES) - {"ref"}


def test_scan_modules_do_not_import_each_other_back():
    """scan.py dispatches to the backends; the backend modules import nothing of lmlab but the C++ builder,
    which imports nothing of lmlab (no import cycle)."""
    import ast

    for name in ("scan_cpu.py", "scan_triton.py", "cpp_build.py"):
        tree = ast.parse((pathlib.Path(S.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "cpp_build":
                assert name == "scan_cpu.py", name
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and not node.module.startswith("lmlab"), (name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("lmlab") for a in node.names), name


def test_auto_is_the_compiled_kernel_here():
    """On a machine with a C++ compiler (this one, CI) auto must not silently fall back to torch."""
    from lmlab.models.scan_cpu import cpu_kernel_available

    assert cpu_kernel_available()
    assert S.resolve_backend("auto", "cpu") == "cpu"


def test_missing_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    from lmlab.models import scan_cpu

    monkeypatch.setattr(scan_cpu.LIBRARY, "lib", None)
    monkeypatch.setattr(scan_cpu.LIBRARY, "error", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path))
    kw = make_inputs(1, 2, 9, 4, True, False)
    with pytest.warns(RuntimeWarning, match="chunked") as record:
        y = S.selective_scan(**kw, backend="cpu")
    assert len([w for w in record if "C++ selective scan" in str(w.message)]) == 1
    torch.testing.assert_close(y, S.selective_scan_ref(**kw), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.selective_scan(**kw, backend="cpu")  # no second warning
        assert S.resolve_backend("auto", "cpu") == "chunked"


def test_kernel_source_is_package_data_and_keys_the_build_cache(monkeypatch, tmp_path):
    """The C++ source ships as scan_cpu.cpp beside the module; the compiler is handed exactly that text, and an
    edited source builds anew (a new cache key) instead of loading the library built from the old one."""
    from lmlab.models import cpp_build, scan_cpu
    from lmlab.models.cpp_build import FLAG_SETS

    source = scan_cpu.cpp_source()
    assert 'extern "C" void scan_fwd_f32' in source and "#include" not in pathlib.Path(scan_cpu.__file__).read_text()
    (tmp_path / "log").mkdir()
    fake = tmp_path / "c++"  # keeps each source it is handed; writes an empty (unloadable) output
    fake.write_text('#!/bin/sh\nprev=""\nfor a in "$@"; do\n  case "$a" in *.cpp) cp "$a" "$LOG/$$.cpp";; esac\n'
                    '  [ "$prev" = -o ] && out="$a"\n  prev="$a"\ndone\n: > "$out"\n')
    fake.chmod(0o755)
    for key, value in (("CXX", fake), ("LMLAB_CACHE", tmp_path / "cache"), ("LOG", tmp_path / "log")):
        monkeypatch.setenv(key, str(value))

    def build() -> set[str]:
        with pytest.raises(RuntimeError, match="could not build scan_cpu"):
            cpp_build.build("scan_cpu", scan_cpu.cpp_source())
        return {p.name for p in (tmp_path / "cache").rglob("*.so")}

    first = build()
    assert len(first) == len(FLAG_SETS)
    assert {p.read_text() for p in (tmp_path / "log").iterdir()} == {source}
    assert build() == first  # same source: the cached builds are reused
    monkeypatch.setattr(scan_cpu, "cpp_source", lambda: source + "// edited\n")
    assert len(build() - first) == len(FLAG_SETS)


# Run in a fresh process: builds (or fails to build) the kernel from scratch, trains a tiny model a step with
# `auto`, checks it against `ref`, and reports the backend auto chose and every warning raised.
_CHILD = textwrap.dedent("""
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as record:
        from lmlab.models import MambaSWELUConfig, MambaSWELUForCausalLM
        from lmlab.models import scan as S
        torch.set_num_threads(2)
        auto = S.resolve_backend("auto", "cpu")
        cfg = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, dense_hidden=32, max_seq_len=128)
        torch.manual_seed(0)
        fast = MambaSWELUForCausalLM(MambaSWELUConfig(**cfg, scan_backend="auto"))
        ref = MambaSWELUForCausalLM(MambaSWELUConfig(**cfg, scan_backend="ref"))
        ref.load_state_dict(fast.state_dict())
        ids = torch.randint(0, 64, (2, 70))
        seq_idx = (torch.arange(70) >= 33).long().expand(2, 70)
        errs = []
        for model in (fast, ref):
            out = model(ids, labels=ids, seq_idx=seq_idx)
            out.loss.backward()
        errs.append((fast(ids).logits - ref(ids).logits).abs().max().item())
        errs += [(pf.grad - pr.grad).abs().max().item() / (pr.grad.abs().max().item() + 1e-9)
                 for pf, pr in zip(fast.parameters(), ref.parameters())]
        S.selective_scan(torch.randn(1, 4, 9), torch.randn(1, 4, 9), -torch.rand(4, 3), torch.randn(1, 3, 9),
                         torch.randn(1, 3, 9), backend="cpu")
    print(json.dumps({"auto": auto, "max_err": max(errs),
                      "warnings": [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]}))
""")


def _child(env_changes: dict, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "LMLAB_DISABLE_CPP_SCAN")}
    env.update(env_changes)
    return subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_no_compiler_on_path_falls_back_in_a_fresh_process(tmp_path):
    """A machine without any C++ compiler: one warning from the scan, `auto` = chunked, training still matches
    ref."""
    (tmp_path / "bin").mkdir()
    res = _result(_child({"PATH": str(tmp_path / "bin"), "LMLAB_CACHE": str(tmp_path / "cache")}))
    assert res["auto"] == "chunked"
    scan = [w for w in res["warnings"] if "selective scan" in w]
    assert len(scan) == 1 and "no C++ compiler" in scan[0], res["warnings"]
    assert all("no C++ compiler" in w for w in res["warnings"]), res["warnings"]  # other kernels: the same cause
    assert res["max_err"] < 1e-3
    assert not list((tmp_path / "cache").glob("**/*.so"))


@pytest.mark.slow
def test_compiler_without_openmp_builds_serial_kernel_concurrently(tmp_path):
    """A compiler that rejects -fopenmp (e.g. Apple clang): the serial flag set builds and is used, silently.
    Two processes build into the same empty cache at once: both work and exactly one .so per library is left."""
    import shutil

    real = shutil.which("c++") or shutil.which("g++")
    if real is None:
        pytest.skip("no C++ compiler here")
    fake = tmp_path / "c++"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && echo "unsupported option -fopenmp" >&2 '
                    f'&& exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    env = {"CXX": str(fake), "LMLAB_CACHE": str(tmp_path / "cache")}
    procs = [_child(env) for _ in range(2)]
    for res in map(_result, procs):
        assert res["auto"] == "cpu" and res["warnings"] == [] and res["max_err"] < 1e-3, res
    built = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    libraries = [name.rsplit("_", 1)[0] for name in built]  # scan_cpu, and any other kernels the model builds
    assert "scan_cpu" in libraries and len(set(libraries)) == len(libraries), built
    assert all(name.endswith(".so") for name in built), built


def tiny_model(backend):
    cfg = MambaSWELUConfig(vocab_size=64, d_model=16, n_layers=2, d_state=8, dense_hidden=32, max_seq_len=128,
                           scan_backend=backend)
    torch.manual_seed(0)
    return MambaSWELUForCausalLM(cfg)


@pytest.mark.parametrize("backend", FAST)
def test_model_logits_and_grads_match_reference(backend):
    ref = tiny_model("ref")
    fast = tiny_model("ref")
    fast.load_state_dict(ref.state_dict())
    fast.set_scan_backend(backend)
    ids = torch.randint(0, 64, (2, 45))
    seq_idx = (torch.arange(45) >= 20).long().expand(2, 45)
    for kw in ({}, {"seq_idx": seq_idx}):
        out_r, out_f = ref(ids, labels=ids, **kw), fast(ids, labels=ids, **kw)
        torch.testing.assert_close(out_f.logits, out_r.logits, rtol=1e-4, atol=1e-5)
        out_r.loss.backward()
        out_f.loss.backward()
        for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-3, atol=1e-6, msg=name)
        ref.zero_grad()
        fast.zero_grad()


@pytest.mark.parametrize("backend", FAST)
def test_model_cached_generation_equals_full_forward(backend):
    model = tiny_model(backend).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        logits = [model(ids[:, :5], cache=cache).logits]
        logits += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-5)


def test_model_config_selects_the_backend(monkeypatch):
    """`model.scan_backend` (config field) reaches every mixer, and the scan really runs that backend."""
    from lmlab.models.registry import build_config, build_model

    calls = []
    for name in ("ref", "chunked", "cpu"):
        fn = S.BACKENDS[name]
        monkeypatch.setitem(S.BACKENDS, name, lambda *a, _n=name, _f=fn, **k: calls.append(_n) or _f(*a, **k))
    # the cpu backend's training forward runs x_proj, dt_proj and the scan as one node (projected_scan)
    fused = S.scan_cpu.projected_scan
    monkeypatch.setattr(S.scan_cpu, "projected_scan", lambda *a, **k: calls.append("cpu") or fused(*a, **k))
    ids = torch.randint(0, 64, (1, 10))
    for name in ("ref", "chunked", "cpu"):
        calls.clear()
        tiny_model(name)(ids)
        assert calls == [name, name]
    cfg = build_config("mamba-swelu-tiny", overrides={"scan_backend": "chunked"})
    model = build_model(cfg, device="meta")
    assert {blk.mixer.scan_backend for blk in model.blocks} == {"chunked"}
    calls.clear()
    model = tiny_model("auto")
    model(ids)
    assert calls == ["cpu", "cpu"]
    model.set_scan_backend("ref")
    calls.clear()
    model(ids)
    assert calls == ["ref", "ref"]


@pytest.mark.parametrize("groups", [None, 7], ids=["as-chosen", "more-groups-than-blocks"])
def test_cpu_kernel_writes_every_output_it_returns(monkeypatch, groups):
    """Every array the C++ backward fills (gradients, partial sums) is allocated uninitialised: poisoned with NaN
    here, any element the kernel leaves unwritten shows in the comparison with the reference. With more channel
    groups than blocks (backward_groups never asks for that, the kernel allows it) the empty groups' partial sums
    are zeros."""
    _needs_kernel()
    kw = make_inputs(2, 20, 70, 16, True, True)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(2, 20, 70, generator=g), torch.randn(2, 20, 16, generator=g))
    ref = run(kw, "ref", torch.float64, weights)
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *size, **k: real(self, *size, **k).fill_(float("nan")))
    if groups is not None:
        monkeypatch.setattr(S.scan_cpu, "backward_groups", lambda b, d: groups)
    assert_close_to_ref(run(kw, "cpu", torch.float32, weights), ref, rtol=1e-4)
