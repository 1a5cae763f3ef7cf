#!/usr/bin/env bash
# GPU check: runs the benchmarks that use a GPU and prints their JSON lines (one per benchmark), in under
# 5 minutes on one GPU (each step has its own time cap). Needs the `gpu` extra (onnxruntime-gpu in place of
# onnxruntime; the steps are in pyproject.toml); the service then picks the CUDA provider by itself
# (training.runtime.onnx_providers) and logs which one runs.
#
#   bash benchmarks/gpu_check.sh            # PY=/path/to/python to use another interpreter
#
# Steps: the environment (ORT providers, torch CUDA device); concept scoring at the issue's size (1,024 units x
# 5,000 concepts x 50,000 images) on CUDA against its floor; DWARF on CUDA; a whole audit on CUDA (400 phantom
# images; its summary's device says where it ran); the HTTP service (ORT on CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi
"$PY" - <<'PY'
import json

import onnxruntime as ort
import torch

from training.runtime import onnx_providers

print(json.dumps({"bench": "gpu_env", "ort_version": ort.__version__, "ort_available": ort.get_available_providers(),
                  "ort_providers": onnx_providers(), "torch_cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
run() {  # cap seconds, then the command; prints the command's last line (its JSON) or why there is none
  local cap=$1; shift
  local out
  out=$(timeout "$cap" "$@" 2>/tmp/gpu_check.err | tail -1)
  local rc=$?
  if [ -n "$out" ]; then echo "$out"; else echo "{\"bench\": \"$2\", \"failed\": true, \"cap_s\": $cap, \"stderr\": $(tail -c 400 /tmp/gpu_check.err | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"; fi
  return 0
}
run 90 "$PY" benchmarks/concept_bench.py --full --device cuda --loop-units 64
run 60 "$PY" benchmarks/dwarf_bench.py --device cuda
run 90 "$PY" benchmarks/audit_bench.py --device cuda --repeats 1 --size 64
run 120 "$PY" benchmarks/serve_bench.py
