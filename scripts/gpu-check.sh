#!/usr/bin/env bash
# The prepared GPU check (docs/engine.md, "Backends"): run it once on a fresh NVIDIA machine that has
# this repository, Python 3.10+ and network access to PyPI, then read gpu-check/report.md.
#
#   bash scripts/gpu-check.sh            # OUT=gpu-check by default; SHAPES="qwen2-0.5b qwen2-7b" adds a 7B
#
# Rehearsal on a machine without a GPU (what CI's test of this script runs):
#   INSTALL=0 SHAPES=tiny ENGINES=0 LOAD_BACKENDS=cpu BACKENDS=cpu GPU_TESTS=0 CONTEXTS=256 \
#     SERVE_CLIENTS="1 2" SERVE_SECONDS=1 OUT=/tmp/rehearsal \
#     bash scripts/gpu-check.sh
#
# It installs the gpu extra in its own virtual environment, writes a random-weight checkpoint at the
# Open-dCoder-0.5B shape and converts it to fp32 graphs, builds its native TensorRT engines
# (dlm-convert --engine tensorrt: fp16 or bf16 chosen on the CPU, then one profile per bucket; the
# build record gives each engine's seconds and bytes), loads it twice with each of LOAD_BACKENDS
# (the native engines, then the TensorRT provider: the provider's first load builds its engines into
# the cache, the second must find them), runs the GPU test tier, then dlm-bench's engine level on each
# backend (tensorrt, tensorrt-ep, cuda, cpu) at a 2,048-token window with 3 tokens per step, and
# dlm-serve's throughput on the first of LOAD_BACKENDS at 1-32 concurrent clients. Every step's time,
# output and exit status go to the report; a failed step does not stop the others, so that one run
# says as much as it can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
SHAPES=${SHAPES:-qwen2-0.5b}
BACKENDS=${BACKENDS:-tensorrt tensorrt-ep cuda cpu}
LOAD_BACKENDS=${LOAD_BACKENDS:-tensorrt tensorrt-ep}
ENGINES=${ENGINES:-1}
SERVE_LOAD=${SERVE_LOAD:-1}
SERVE_CLIENTS=${SERVE_CLIENTS:-1 2 4 8 16 32}
SERVE_SECONDS=${SERVE_SECONDS:-8}
INSTALL=${INSTALL:-1}
GPU_TESTS=${GPU_TESTS:-1}
CONTEXTS=${CONTEXTS:-2048}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"

step() {  # step NAME COMMAND...: run, time and record one step (its output in $OUT/NAME.log)
  local name=$1; shift
  local started=$SECONDS
  echo "== $name: $*" >&2
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - started))" >> "$STEPS"
  tail -n 3 "$OUT/$name.log" >&2
  return $rc
}

if [ "$INSTALL" = 1 ]; then
  step venv "$PYTHON" -m venv "$OUT/venv"
  . "$OUT/venv/bin/activate"
  # torch only converts (never serves): its CPU build is enough and much smaller than a CUDA one
  step install pip install --extra-index-url https://download.pytorch.org/whl/cpu -e '.[export,gpu,dev]'
fi
step versions python - <<'EOF'
import json, shutil, subprocess
import onnxruntime as ort
info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
try:
    import tensorrt
    info["tensorrt"] = tensorrt.__version__
except Exception as exc:  # noqa: BLE001
    info["tensorrt"] = f"unavailable: {exc}"
smi = shutil.which("nvidia-smi")
info["nvidia-smi"] = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if smi else None
print(json.dumps(info))
EOF
export DLM_LSP_CACHE="$OUT/cache"
for shape in $SHAPES; do
  step "checkpoint-$shape" python -m engine.tiny --shape "$shape" "$OUT/$shape/checkpoint"
  step "convert-$shape" dlm-convert "$OUT/$shape/checkpoint" "$OUT/$shape/engine" --precision fp32
  [ "$ENGINES" = 1 ] && step "engine-$shape" dlm-convert --engine tensorrt "$OUT/$shape/engine"
  for backend in $LOAD_BACKENDS; do
   for load in build cached; do  # a first load may build engines, the second must read them
    step "load-$load-$backend-$shape" python - "$OUT/$shape/engine" "$backend" <<'EOF'
import json, sys, time
from engine import Engine
t0 = time.perf_counter()
engine = Engine.load(sys.argv[1], backend=sys.argv[2])
loaded = time.perf_counter() - t0
result = engine.complete("def add(a, b):\n    return ", "\n", None)
print(json.dumps({"backend": engine.info.backend, "load_s": loaded,
                  "first_completion_s": time.perf_counter() - t0 - loaded, "window": engine.info.window,
                  "text": result.text}))
EOF
   done
  done
done
[ "$GPU_TESTS" = 1 ] && step gpu-tests python -m pytest -m gpu tests -q -rs
# items to complete: this repository's own source (random weights: only the shapes and the speed matter)
python - "$OUT/items.jsonl" <<'EOF'
import json, pathlib, sys
with open(sys.argv[1], "w") as out:
    for path in sorted(pathlib.Path("engine").rglob("*.py")):
        out.write(json.dumps({"text": path.read_text(), "path": str(path)}) + "\n")
EOF
for shape in $SHAPES; do
  for backend in $BACKENDS; do
    step "bench-$backend-$shape" dlm-bench --model "$OUT/$shape/engine" --backend "$backend" --level engine \
      --heldout "$OUT/items.jsonl" --kinds single --count 10 --contexts "$CONTEXTS" --tokens-per-step 3 \
      --threshold 1.0 --budget-ms 60000 --no-progress --out "$OUT/bench-$backend-$shape"
  done
done
# the throughput curve: dlm-serve on the native engines, 1-32 concurrent clients, 32-token middles
if [ "$SERVE_LOAD" = 1 ]; then
  for shape in $SHAPES; do
    # shellcheck disable=SC2086 # SERVE_CLIENTS is a list
    step "serve-load-$shape" python scripts/serve_load.py --model "$OUT/$shape/engine" --clients $SERVE_CLIENTS \
      --seconds "$SERVE_SECONDS" --settings "{\"minConfidence\": 0, \"backend\": \"${LOAD_BACKENDS%% *}\"}" \
      --out "$OUT/serve-load-$shape.json"
  done
fi
python scripts/gpu_report.py "$OUT"
