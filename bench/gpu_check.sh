#!/usr/bin/env bash
# The GPU numbers of issue 13 in one command, on an H100/H200-class machine:  bash bench/gpu_check.sh | tee gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
echo "# lmlab GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), $(date -u +%F)"
python -m pytest -q tests/test_scan_triton.py                 # Triton kernels vs the reference (CUDA variants)
python bench/gpu_check.py                                     # scan errors, Llama-124M / INL-small MFU, FSDP2 smoke
python bench/bench_scan.py --sections gpu                     # MambaSWELU-124M tokens/s + MFU vs transformers' Mamba
python bench/planner_check.py --cuda                          # planner vs max_memory_allocated (within 15 %)
