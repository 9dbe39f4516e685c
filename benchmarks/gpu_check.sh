#!/usr/bin/env bash
# One short GPU check (under 8 minutes on an H200): train the gpt2 preset (124M) in bf16 for a few
# hundred steps through the project's loop, next to a bare PyTorch loop, and print tokens/s and
# MFU; then the serving check when benchmarks/gpu_serve_check.py exists.
#
#   benchmarks/gpu_check.sh            # on a GPU machine
#   benchmarks/gpu_check.sh --quick    # CPU smoke run: same code paths, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

quick=""
if [[ "${1:-}" == "--quick" ]]; then quick="--quick"; fi

if [[ -n "$quick" ]]; then
  python benchmarks/bench_train.py --preset tiny --steps 5 --warmup 2 --batch-size 4 --seq-len 64 \
    --vocab 512 --only project,bare
else
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --quick'; print(torch.cuda.get_device_name(0))"
  # 16 x 1024 tokens per step; 300 timed steps each, torch.compile on; HF Trainer left out for time.
  timeout 420 python benchmarks/bench_train.py --preset gpt2 --steps 300 --warmup 20 --batch-size 16 \
    --seq-len 1024 --compile --only project,bare
fi

if [[ -f benchmarks/gpu_serve_check.py ]]; then
  python benchmarks/gpu_serve_check.py $quick
fi
