#!/usr/bin/env bash
# The GPU numbers docs/benchmarks.md records, in one command, on an H100/H200-class machine:
#   bash bench/gpu_check.sh | tee gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
echo "# lmlab GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), $(date -u +%F)"
python -m pytest -q tests/test_scan_triton.py tests/test_losses.py tests/test_optimizer.py -k 'not resumes'  # Triton kernels; chunked loss vs plain; the clip in the fused AdamW step
python bench/gpu_check.py                   # scan errors, Llama-124M / INL-small MFU, FSDP2 smoke, chunked loss
python bench/bench_scan.py --sections gpu                     # MambaSWELU-124M tokens/s + MFU vs transformers' Mamba
python bench/planner_check.py --cuda                          # planner vs max_memory_allocated (within 15 %)
# DeepSpeed ZeRO-2 in bf16 on one GPU, then a resume to a longer budget (when lmlab[deepspeed] is installed)
if python -c "import deepspeed" 2>/dev/null; then
    out=$(mktemp -d)
    torchrun --nproc_per_node 1 -m lmlab.cli pretrain model.name=mamba-swelu-tiny data.source=stdlib \
        data.max_docs=200 train.max_steps=40 train.save_every=20 train.strategy=deepspeed train.zero_stage=2 \
        train.precision=bf16 train.progress=false run.out_dir="$out" run.name=ds | tail -n 3
    torchrun --nproc_per_node 1 -m lmlab.cli resume "$out/ds" train.max_steps=60 | tail -n 2
fi
