"""The GPU numbers of docs/benchmarks.md in one pass (H100/H200 class): `bash bench/gpu_check.sh` runs this file and the
GPU sections of the other benchmarks. Prints markdown tables for docs/benchmarks.md; asserts nothing timed.

    scan      Triton scan vs the reference on CUDA: fp32 and bf16, forward and backward, lengths 1000 and 1537
    models    Llama-124M and INL-small bf16 training steps: tokens/s and MFU against the measured bf16 peak
    fsdp      FSDP2 on one GPU (a one-rank process group): a few lmlab training steps, loss finite
    loss      the chunked LM head + loss under bf16 autocast on CUDA against the plain path (loss, gradients), and
              the measured peak memory of a mamba-swelu-124m step at 8 × 1024 with it off and on (auto)
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from _common import table
from bench_scan import timed, train_step_fn


def bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / min(timed(lambda: a @ a, 10, 3, torch.cuda.synchronize))


def _scan_row(dtype: torch.dtype, l: int) -> list:
    import functools

    from lmlab.models import scan as scan_lib

    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n = 2, 256, 16
    ins = [(torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype).requires_grad_()
           for shape, scale in (((b, d, l), 1.0), ((b, d, l), 0.5), ((b, n, l), 1.0), ((b, n, l), 1.0),
                                ((b, d, l), 1.0))]
    u, delta, B, C, z = ins
    A = -torch.rand(d, n, device="cuda", generator=g).add(0.5).requires_grad_()
    D = torch.randn(d, device="cuda", generator=g).requires_grad_()
    out = {}
    for backend in ("ref", "triton"):
        y = scan_lib.selective_scan(u, delta, A, B, C, D=D, z=z, backend=backend)
        grads = torch.autograd.grad(y.float().square().sum(), (u, delta, A, B, C, D, z))
        out[backend] = (y.float(), [x.float() for x in grads])
    fwd = float((out["triton"][0] - out["ref"][0]).abs().max() / out["ref"][0].abs().max())
    bwd = max(float((a - c).abs().max() / c.abs().max().clamp(min=1e-12)) for a, c in zip(out["triton"][1],
                                                                                          out["ref"][1]))
    run = functools.partial(scan_lib.selective_scan, u, delta, A, B, C, D=D, z=z, backend="triton")
    t = min(timed(run, 10, 2, torch.cuda.synchronize))
    return [str(dtype).split(".")[1], l, f"{fwd:.1e}", f"{bwd:.1e}", f"{t * 1e3:.2f}"]


def section_scan() -> None:
    rows = [_scan_row(dtype, l) for dtype in (torch.float32, torch.bfloat16) for l in (1000, 1537)]
    table(f"Triton scan vs reference on {torch.cuda.get_device_name()} (relative max error, b=2 d=256 n=16)",
          ["dtype", "length", "forward", "backward", "triton fwd ms"], rows)


def section_models(peak: float) -> None:
    from lmlab.models.registry import build_config, build_model, count_parameters

    rows = []
    for name, batch in (("llama-124m", 16), ("inl-small", 16), ("mamba-swelu-124m", 16)):
        model = build_model(build_config(name)).cuda()
        params = count_parameters(model)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1024), device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        t = min(timed(train_step_fn(model, ids, opt, "cuda"), 5, 2, torch.cuda.synchronize))
        tps = batch * 1024 / t
        rows.append([name, f"{params / 1e6:.1f}M", f"{t * 1e3:.0f}", f"{tps:,.0f}", f"{6 * params * tps / peak:.1%}"])
        del model, opt
        torch.cuda.empty_cache()
    table(f"bf16 training step, batch × 1024 tokens ({torch.cuda.get_device_name()}, measured bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s; MFU = 6·N·tokens/s / peak, attention FLOPs not counted)",
          ["model", "params", "ms/step", "tokens/s", "MFU"], rows)


def section_fsdp() -> None:
    import torch.distributed as dist

    from lmlab.config import Config
    from lmlab.models.registry import build_config, build_model
    from lmlab.runtime import setup_runtime
    from lmlab.train.objectives import make_objective
    from lmlab.train.optim import make_optimizer
    from lmlab.train.step import apply_update, compute_gradients
    from lmlab.train.strategies.fsdp import FSDP, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rt = setup_runtime("cuda", "bf16")
    dist.init_process_group("nccl", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    cfg = Config()
    cfg.train.strategy = "fsdp"
    model = build_model(build_config("mamba-swelu-124m")).cuda()
    shard(model, rt)  # a one-rank mesh: the same code path as several ranks
    opt = make_optimizer(model, 3e-4, 0.1, (0.9, 0.95), 1e-8, rt.device)
    obj = make_objective(cfg)
    losses = []
    for _ in range(5):
        ids = torch.randint(0, model.config.vocab_size, (4, 1025), device="cuda")
        r = compute_gradients(model, obj, [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}], rt, optimizer=opt,
                              grad_clip=1.0)
        apply_update(opt)
        losses.append(float(r.loss))
    full = FSDP(cfg, rt).full_state_dict(model)
    table("FSDP2 on one GPU (mamba-swelu-124m, bf16 params, fp32 reduce)", ["step losses", "full state dict"],
          [[" ".join(f"{x:.3f}" for x in losses), f"{len(full)} tensors"]])
    dist.destroy_process_group()

def section_loss() -> None:
    from lmlab.models.registry import build_config, build_model
    from lmlab.plan.measure import measure_training_peak
    from lmlab.train.losses import LossChunking
    from lmlab.train.objectives import Pretrain

    torch.manual_seed(0)
    model = build_model(build_config("mamba-swelu-small")).cuda()
    ids = torch.randint(0, model.config.vocab_size, (4, 1025), device="cuda")
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    out = {}
    for mode in ("off", "on"):
        objective = Pretrain(None)
        objective.chunking = LossChunking(mode, tokens=512)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = objective.loss(model, batch)
        out[mode] = (loss.float(), torch.autograd.grad(loss, list(model.parameters())))
    rel = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))
              for a, b in zip(out["on"][1], out["off"][1]))
    rows = [["mamba-swelu-small, bf16 autocast, 4 × 1024, chunks of 512",
             f"{float((out['on'][0] - out['off'][0]).abs() / out['off'][0].abs()):.1e}", f"{rel:.1e}"]]
    table("Chunked loss vs the plain path on CUDA (relative differences)", ["case", "loss", "max grad"], rows)
    del model
    torch.cuda.empty_cache()
    rows = []
    for mode in ("off", "auto"):
        m = measure_training_peak("mamba-swelu-124m", seq_len=1024, micro_batch=8, precision="bf16", device="cuda",
                                  chunked_loss=mode)
        rows.append([mode, f"{m['peak_bytes'] / 2**20:,.0f}"])
    table("mamba-swelu-124m training step, 8 × 1024, bf16: measured peak GPU memory (MiB)",
          ["train.chunked_loss", "peak MiB"], rows)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py: no CUDA device")
    section_scan()
    section_models(bf16_peak())
    section_fsdp()
    section_loss()


if __name__ == "__main__":
    main()
