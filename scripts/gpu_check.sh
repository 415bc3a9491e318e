#!/usr/bin/env bash
# Every GPU check of the project in one run that fits in about 8 minutes on one H100/H200:
#   1. the CUDA tests (tests/test_cuda.py and every CUDA-marked test),
#   2. diffmoe bench layers on CUDA in bfloat16 (every MoE layer against the dense FFN),
#   3. diffmoe bench model on the 0.3B paper configs under FSDP2 on one GPU, bf16, activation
#      checkpointing off and on, writing tables with MFU and peak memory.
# Usage: bash scripts/gpu_check.sh [OUT]   (default OUT=results/gpu; tables in OUT/*/*.md)
set -euo pipefail
OUT=${1:-results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -m pytest -q -x tests/test_cuda.py 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
timeout 150 diffmoe bench layers --device cuda --dtype bfloat16 --out "$OUT/layers" || echo "bench layers: timed out or failed" | tee -a "$OUT/errors.txt"
mem_gb=$(python -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)")
configs="configs/10-paper-0.3b-dense.yaml configs/11-paper-0.3b-lory-8e.yaml configs/13-paper-0.3b-sparsemixer-16e.yaml"
if [ "$mem_gb" -ge 130 ]; then  # 6.8B parameters: fp32 weights, gradients and Adam moments are ~109 GB
  configs="$configs configs/12-paper-0.3b-lory-32e.yaml"
fi
for cfg in $configs; do
  name=$(basename "$cfg" .yaml)
  timeout 120 diffmoe bench model "$cfg" --device cuda --layout fsdp --ac both --compile off --repeats 3 --warmup 1 \
    --out "$OUT/model/$name" || echo "bench model $name: timed out or failed" | tee -a "$OUT/errors.txt"
done
cat "$OUT"/model/*/bench_model_cuda_bfloat16_fsdp.md 2>/dev/null | grep "^| 1" || true
