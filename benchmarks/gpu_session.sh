#!/usr/bin/env bash
# The GPU measurements in one run (about 6 minutes on one H200; its steps' time limits add up to
# 11 minutes, the last step first to go if a session's limit cuts the run), for a machine lent
# for a short session: the fast path's checks, then the benchmarks whose figures
# benchmarks/README.md records.
# Every result also goes to $OUT (default gpu-results/). Run from the repository root; packages the
# machine lacks (webdataset, braceexpand, jsonargparse and its helpers, normflows) are installed
# from wheels in .whl/ when that folder exists (benchmarks/README.md, "On a GPU", says how to get them).
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
py=python3
step() {  # step SECONDS NAME COMMAND...: one measurement, its output in $out/NAME.txt
  local limit=$1 name=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
step 180 gpu_check $py benchmarks/gpu_check.py
nf=benchmarks/adapters/normflows_glow.py
step 120 reference $py benchmarks/glow_step.py --device cuda --config reference \
  --impl glowlab glowlab:graphs glowlab:compile+graphs "$nf" --conv-floor --json "$out/reference.json"
step 90 paper $py benchmarks/glow_step.py --device cuda --config paper \
  --impl glowlab glowlab:graphs "$nf" --pairs 10 --conv-floor --json "$out/paper.json"
step 150 main_job $py benchmarks/main_job.py --accelerator gpu --variant cuda_graphs eager --no-wandb \
  --json "$out/main_job.json"
step 60 compile_time $py benchmarks/compile_time.py --device cuda --depths 8 32 --width 512 --modes per-step
step 60 step_overhead $py benchmarks/step_overhead.py --accelerator gpu --steps 200
