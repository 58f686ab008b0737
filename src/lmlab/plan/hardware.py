"""GPUs the planner knows: memory, dense peak TFLOP/s by dtype, board power and a typical cloud price.

Peaks are dense tensor-core figures (no 2:4 sparsity) with fp32 accumulation, as PyTorch runs them:
`bf16`/`fp16` for mixed-precision matmuls, `fp32` for plain fp32 (PyTorch's default, TF32 off for
matmuls), `tf32` for `torch.set_float32_matmul_precision("high")`. Memory is what the driver reports
(GiB). Prices are typical on-demand marketplace rates in US dollars per GPU-hour (late 2020s);
pass `price_per_hour` / `--price-per-hour` for your own. Board power (TDP) drives the electricity
estimate; real draw under training is usually 70-100 % of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import ConfigError

GIB = 1024**3
CURRENCY = "USD"  # GPU prices and the electricity price share this currency


@dataclass(frozen=True)
class Hardware:
    name: str  # key used on the command line
    label: str  # what people call it
    memory_gib: float
    tflops: dict[str, float] = field(default_factory=dict)  # dense peak by dtype: fp32, tf32, bf16, fp16
    tdp_w: float = 0.0
    price_per_hour: float = 0.0  # USD per GPU-hour

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_tflops(self, precision: str) -> float:
        """Peak for the dtype the matmuls run in: 4-bit (QLoRA) computes in bf16."""
        key = {"4bit": "bf16"}.get(precision, precision)
        return self.tflops[key]


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("rtx3090", "NVIDIA GeForce RTX 3090 24GB", 24.0,
             {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0}, tdp_w=350, price_per_hour=0.22),
    Hardware("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 24.0,
             {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}, tdp_w=450, price_per_hour=0.30),
    Hardware("a100-40", "NVIDIA A100 40GB (SXM)", 40.0,
             {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, tdp_w=400, price_per_hour=1.00),
    Hardware("a100-80", "NVIDIA A100 80GB (SXM)", 80.0,
             {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, tdp_w=400, price_per_hour=1.50),
    Hardware("h100", "NVIDIA H100 80GB (SXM)", 79.6,
             {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}, tdp_w=700, price_per_hour=2.50),
    Hardware("h100-pcie", "NVIDIA H100 80GB (PCIe)", 79.6,
             {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}, tdp_w=350, price_per_hour=2.00),
    Hardware("h200", "NVIDIA H200 141GB (SXM)", 140.4,
             {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}, tdp_w=700, price_per_hour=3.50),
)}


def cpu_hardware(tflops: float = 1.0) -> Hardware:
    """This machine's CPU: host memory as the budget; `tflops` is a placeholder peak (time estimates on
    a CPU are not meaningful, the memory split is)."""
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # containers
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            mem = min(mem, int(text) / GIB)
    return Hardware("cpu", "CPU (host memory)", mem, dict.fromkeys(("fp32", "tf32", "bf16", "fp16"), tflops))


def get_hardware(name: str | Hardware) -> Hardware:
    if isinstance(name, Hardware):
        return name
    if str(name).lower() == "cpu":
        return cpu_hardware()
    hw = HARDWARE.get(str(name).lower())
    if hw is None:
        raise ConfigError(f"--hardware: unknown GPU {name!r}; allowed: {', '.join(HARDWARE)}, cpu")
    return hw


def hardware_from_device(device=None) -> Hardware:
    """The table entry for a CUDA device, with the memory the driver reports.

    An unknown GPU keeps its own name and memory and borrows the A100's throughput and price
    (the estimate's notes say so).
    """
    import torch

    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    name, mem = props.name, props.total_memory / GIB
    upper = name.upper()
    if "H100" in upper and "PCIE" in upper:
        return replace(HARDWARE["h100-pcie"], memory_gib=mem)
    for key, needle in (("rtx3090", "3090"), ("rtx4090", "4090"), ("h200", "H200"), ("h100", "H100")):
        if needle in upper:
            return replace(HARDWARE[key], memory_gib=mem)
    if "A100" in upper:
        return replace(HARDWARE["a100-40" if mem < 60 else "a100-80"], memory_gib=mem)
    return replace(HARDWARE["a100-40"], name="cuda", label=f"{name} (throughput and price assumed = A100)",
                   memory_gib=mem)
