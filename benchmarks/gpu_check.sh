#!/usr/bin/env bash
# Every GPU check and benchmark of the device path, in one call on one CUDA GPU, in under 8 minutes:
#   1. the CUDA tests (pytest -m cuda): the Trainer invariants, bit-exact resume, the radix select against the sort,
#      the fused Triton passes against the per-tensor ones, and no step waiting for the device (CUDA's sync check);
#   2. one refresh of every masked tensor of a 127M-parameter LLM (145 tensors), per implementation;
#   3. step time against dense, interleaved, on the LLM (bf16-mixed), the LM and the CNN;
#   4. a profile of one Top-KAST step of the LLM.
# Logs and JSON go to benchmarks/results/ (gpu_*.log, device_refresh.json, overhead_gpu_<model>.json). Each part has
# a time limit, so that a slow one leaves the others their time; the exit status is that of the tests.
#
#   bash benchmarks/gpu_check.sh        # from anywhere; the project is imported from this checkout
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
results=benchmarks/results
mkdir -p "$results"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu_machine.log"
python -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, \
  'lightning', lightning.__version__, 'commit', '$(git rev-parse --short HEAD 2>/dev/null)')" | tee -a "$results/gpu_machine.log"

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, its output to the screen and to a log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (at most $limit s)"
  local began=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$results/gpu_$name.log"
  local status=${PIPESTATUS[0]}
  echo "=== $name: exit $status after $((SECONDS - began)) s" | tee -a "$results/gpu_$name.log"
  return "$status"
}

# --nbmake and the doctests are the CPU suite's: here, only the CUDA cases
part tests 150 python -m pytest -m cuda -q -p no:cacheprovider -o addopts="--strict-markers -ra" tests/
tests=$?
part refresh 70 python benchmarks/device_refresh.py --json "$results/device_refresh.json"
methods=(dense "Top-KAST, interval 1" "Top-KAST, interval 100, early refresh")
for model in llm lm cnn; do
  part "overhead_$model" 75 python benchmarks/overhead.py --accelerator gpu --models "$model" --repeats 2 \
    --warmup 20 --steps 50 --methods "${methods[@]}" --json "$results/overhead_gpu_$model.json"
done
part profile 50 python benchmarks/profile_step.py --model llm --method "Top-KAST, interval 1" --accelerator gpu \
  --warmup 5 --steps 5
exit "$tests"
