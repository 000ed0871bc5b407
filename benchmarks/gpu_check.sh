#!/usr/bin/env bash
# GPU check of the benchmark harness and of distillation at the published 8B shapes (benchmarks/gpu_check.py):
# torch backend, bfloat16, random Llama-3.1-8B / 4B-Width / 4B-Depth models at batch 1 and 32 (128/128), measured beside
# their roofline projection, and one 8B -> 4B-Width distillation step at sequence 4096 (time, peak memory).
# Needs a CUDA GPU, torch and transformers (pyyaml comes with transformers); no network, nothing else installed.
# Finishes within 8 minutes (the script stops starting phases after 7); writes gpu_check.json into OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default: $OUT if set, else benchmarks/results
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
python - <<'CHECK'
import sys
import torch, transformers  # noqa: F401
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA GPU visible (torch %s); on a CPU run `python benchmarks/gpu_check.py --tiny` instead" % torch.__version__)
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
CHECK
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 python benchmarks/gpu_check.py --out "$out" --budget 420
