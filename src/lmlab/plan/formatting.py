"""The planner's words: the memory line the trainer prints, the plan for logs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .hardware import GIB

if TYPE_CHECKING:
    from .estimate import Estimate


def gib(n: float) -> float:
    return n / GIB


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def memory_fits(est: Estimate) -> tuple[bool, str]:
    """(fits with the margin, one line saying so — with what would make it fit when it does not)."""
    m = est.memory
    where = "of host memory" if est.hardware == "cpu" else "per GPU"
    keys = ("weights", "reference", "gradients", "optimizer", "guard", "activations", "overhead")
    split = ", ".join(f"{k} {_size(m[k])}" for k in keys if k in m)
    tr = trainable_text(est)
    tr = f"; {tr}" if tr else ""
    if est.fits:
        return True, f"fits: {_size(m['total'])} of {_size(est.gpu_memory)} {where} ({split}{tr})"
    head = "tight" if est.fits_without_margin else "does not fit"
    msg = (f"{head}: needs {_size(m['total'])} of {_size(est.gpu_memory)} {where} ({split}{tr}; "
           f"{est.margin:.0%} kept free for fragmentation)")
    if est.suggestions:
        msg += "; would fit with: " + "; ".join(est.suggestions)
    return False, msg


def trainable_text(est: Estimate) -> str:
    """'71,168 trainable of 955,274 (0.07 %; lora r=16 on in_proj, out_proj)' for adapter runs, else ''."""
    if est.method == "full":
        return ""
    share = 100 * est.params_trainable / max(est.params_total, 1)
    return (f"{est.params_trainable:,} trainable of {est.params_total:,} ({share:.2f} %; {est.method} "
            f"r={est.lora_rank} on {', '.join(est.lora_targets)})")


def fmt_hours(h: float) -> str:
    return f"{h:.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:.1f} days)"


def format_plan(est: Estimate) -> str:
    """A few lines for logs: parameters, memory per GPU, speed, time and cost."""
    m = est.memory
    ref = f", reference {gib(m['reference']):.2f}" if "reference" in m else ""
    tr = "" if est.method == "full" else f", {est.params_trainable:,} trainable ({est.method} r={est.lora_rank})"
    lines = [
        f"plan      {est.model}: {est.params_total:,} params{tr}, vocabulary {est.vocab_size:,} ({est.tokenizer}); "
        f"{est.gpus}x {est.hardware} {est.precision}, "
        f"batch {est.micro_batch} x seq {est.seq_len} x accum {est.grad_accum} x {est.gpus} GPU = "
        f"{est.tokens_per_step:,} tokens/step",
        f"memory    {gib(m['total']):.1f} GiB of {gib(est.gpu_memory):.1f} GiB per GPU: weights "
        f"{gib(m['weights']):.2f}{ref}, grads {gib(m['gradients']):.2f}, optimizer {gib(m['optimizer']):.2f}, "
        f"activations {gib(m['activations']):.2f}{' (checkpointed)' if est.checkpointing else ''}, "
        f"overhead {gib(m['overhead']):.2f}",
        f"speed     {est.tokens_per_second:,.0f} tokens/s at MFU {est.mfu:.0%} "
        f"({est.flops_per_token / 1e9:.2f} GFLOP/token, {est.peak_tflops:g} TFLOP/s peak per GPU)",
    ]
    if est.hours is not None:
        lines.append(f"budget    {est.tokens:,} tokens = {est.steps:,} steps, {fmt_hours(est.hours)}, "
                     f"{est.gpu_hours:,.0f} GPU-h = {est.cost:,.0f} {est.currency} "
                     f"+ {est.energy_kwh:,.0f} kWh = {est.energy_cost:,.0f} {est.currency} electricity")
    ok, msg = memory_fits(est)
    if not ok:
        lines.append(f"WARNING   {msg}")
    return "\n".join(lines)

