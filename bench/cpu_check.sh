#!/usr/bin/env bash
# The CPU numbers docs/benchmarks.md records for the training step, in one command, on a quiet machine:
#   bash bench/cpu_check.sh | tee cpu.md
# (nothing else CPU-heavy may run meanwhile: the tables are timings). About 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "# lmlab CPU check: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores, $(date -u +%F)"
python bench/bench_profile.py                                   # the bar: per-part profile, fused paths, fp32
python bench/bench_profile.py --reference                       # the same step on the torch reference paths
python bench/bench_profile.py --precision bf16                  # CPU bf16 autocast, fused paths
python bench/bench_profile.py --compare                         # fp32/bf16 × fused/reference, interleaved
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/bench_profile.py --compare  # bf16 without AMX (where there is AMX)
for model in mamba-swelu-small llama-small inl-tiny; do        # the ratio at sequence 1,024
    python bench/bench_profile.py --model "$model" --seq 1024 --batch 1 --compare --reps 3
done
python bench/bench_memory.py                                    # chunked vs plain loss: peak RSS, 124M at 1,024
out=$(mktemp -d)
/usr/bin/time -f "quickstart: %e s wall" lmlab quickstart --out "$out/a" | tail -n 4
/usr/bin/time -f "quickstart --finetune: %e s wall" lmlab quickstart --finetune --out "$out/b" | tail -n 8
# bf16 against fp32 over the quickstart's 500 steps (the fp32 run above is the other curve): val loss per eval
/usr/bin/time -f "quickstart train.precision=bf16: %e s wall" lmlab quickstart --out "$out/c" train.precision=bf16 \
    | tail -n 4
python bench/compare_curves.py "$out"/a/*/metrics.jsonl "$out"/c/*/metrics.jsonl
