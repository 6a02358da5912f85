#!/usr/bin/env bash
# One call on a lent GPU: build the extension, run the GPU tests, measure the card's ceilings, run
# the benchmark suites, write the report. Everything (logs, pytest-benchmark JSON, junit XML, the
# markdown/PNG report) goes to OUTDIR; a short table of steps, each with the seconds it took, is
# printed last.
#
#   bench/gpu_check.sh OUTDIR [--tests-only | --bench-only | --suite NAME ... | --quick | --full | --no-build]
#
#   (default)      build, tests -m gpu, ceilings, op suites at their main shapes, model suite, then
#                  the model's torch.compile training step if the time budget still allows it
#   --tests-only   build + tests
#   --bench-only   build + ceilings + suites (no tests)
#   --suite NAME   build + ceilings + every case of one suite (patch_detailer, attention, elementwise,
#                  patchify, model); repeatable
#   --quick        the first run on a card, planned for under 5 minutes with a warm Triton cache:
#                  budget 285 s, no build when a CUDA extension for this torch is already there,
#                  tests -m gpu, ceilings, the op and model suites' main cases without torch.compile
#   --full         every case of every suite (needs DIP_CHECK_BUDGET_S near 580 and the run's timeout)
#   --no-build     use the extension as it is
#
# Triton cache: TRITON_CACHE_DIR (default OUTDIR/triton-cache) is filled first from the archive
# DIP_TRITON_CACHE_ARCHIVE (default build/triton-cache-sm90.tar.xz, made by
# `python -m dip.precompile --archive`) when it exists; the summary says how many Triton
# binaries the run still compiled itself (cache misses) and for which kernels.
#
# The whole run is kept inside DIP_CHECK_BUDGET_S seconds (default 470, 285 with --quick): each
# step gets min(its own limit, what is left) through `timeout`, a step that does not fit is skipped
# and reported, and every step runs whatever happened before it. A benchmark step stopped by its
# timeout still writes the JSON of everything it finished (bench/conftest.py turns SIGTERM into
# KeyboardInterrupt). Exit codes: 0 every step ok, 1 a step not ok, 2 bad arguments, 3 no CUDA
# device visible to torch (nothing to check). Needs: torch, triton, pytest, pytest-benchmark
# (matplotlib and nvidia-ml-py optional); no network.
set -u -o pipefail

usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUTDIR=$1; shift
RUN_BUILD=1 RUN_TESTS=1 RUN_BENCH=1 QUICK=0 FULL=0 SUITES=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --tests-only) RUN_BENCH=0 ;;
    --bench-only) RUN_TESTS=0 ;;
    --suite) [[ $# -ge 2 ]] || usage
             case $2 in patch_detailer|attention|elementwise|patchify|model) ;; *) echo "unknown suite $2"; usage ;; esac
             SUITES="$SUITES $2"; RUN_TESTS=0; shift ;;
    --quick) QUICK=1 ;;
    --full) FULL=1 ;;
    --no-build) RUN_BUILD=0 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1"; usage ;;
  esac
  shift
done

T0=$(date +%s)
BUDGET=${DIP_CHECK_BUDGET_S:-$([[ $QUICK == 1 ]] && echo 285 || echo 470)}
DEADLINE=$((T0 + BUDGET))
RESERVE=20   # kept back for the report and the summary
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR/logs"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-$(command -v python3 || command -v python)}
export DIP_BENCH_OUT=$OUTDIR
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUTDIR/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
CACHE_ARCHIVE=${DIP_TRITON_CACHE_ARCHIVE:-$REPO/build/triton-cache-sm90.tar.xz}
if [[ $QUICK == 1 ]]; then export DIP_BENCH_SECONDS=${DIP_BENCH_SECONDS:-0.3}
elif [[ $FULL == 1 ]]; then export DIP_BENCH_SECONDS=${DIP_BENCH_SECONDS:-1.0}
else export DIP_BENCH_SECONDS=${DIP_BENCH_SECONDS:-0.5}; fi
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfE)
BENCH_COLUMNS=(--benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name)

STEPS=()   # "name|status|seconds|log"
record() { STEPS+=("$1|$2|$3|$4"); }

# run_step NAME LIMIT_S CMD...: run with min(LIMIT_S, time left) under `timeout`, log to logs/NAME.log
run_step() {
  local name=$1 limit=$2; shift 2
  local log="$OUTDIR/logs/$name.log"
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  if ((left < 20)); then
    echo "=== [$name] skipped: out of time budget"
    record "$name" "SKIPPED (budget)" 0 "-"
    return 0
  fi
  local t=$((limit < left ? limit : left))
  echo "=== [$name] limit ${t}s: $*"
  local start=$(date +%s)
  timeout -k 15 "$t" "$@" >"$log" 2>&1
  local rc=$?
  local secs=$(($(date +%s) - start))
  local status
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${secs}s" ;;
    5) status="no tests ran" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  tail -n "${TAIL:-12}" "$log" | sed 's/^/    /'
  echo "=== [$name] $status in ${secs}s"
  record "$name" "$status" "$secs" "logs/$name.log"
}

# ------------------------------------------------------------------ 1. what is this machine
{
  echo "gpu_check $(date -Is) repo=$REPO out=$OUTDIR budget=${BUDGET}s quick=$QUICK full=$FULL suites='$SUITES'"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu,driver_version \
    --format=csv 2>/dev/null
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("torch sees no CUDA device")
EOF
  echo "nproc $(nproc)"; command -v nvcc >/dev/null && nvcc --version | tail -n 2
} 2>&1 | tee "$OUTDIR/logs/env.log"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: torch sees no CUDA device here; there is nothing to check (exit 3)"
  exit 3
fi

# ------------------------------------------------------------------ 2. warm Triton cache
# one directory per compiled binary, holding __grp__<kernel>.json
cache_entries() { find "$TRITON_CACHE_DIR" -mindepth 2 -maxdepth 2 -name '__grp__*.json' 2>/dev/null | sort; }
if [[ -f $CACHE_ARCHIVE ]]; then
  run_step warm_cache 30 tar -xJf "$CACHE_ARCHIVE" -C "$TRITON_CACHE_DIR"
  "$PY" -m dip.precompile --check-cache "$TRITON_CACHE_DIR" 2>&1 | tee -a "$OUTDIR/logs/warm_cache.log"
else
  echo "=== [warm_cache] no $CACHE_ARCHIVE: every Triton kernel compiles on this machine"
  record warm_cache "skipped: no archive" 0 "-"
fi
cache_entries >"$OUTDIR/logs/cache_before.txt"

# Build for this card only (setup.py's default builds two architectures: twice the time).
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null)
  case $CAP in 9.0) export TORCH_CUDA_ARCH_LIST="9.0a" ;; "") ;; *) export TORCH_CUDA_ARCH_LIST=$CAP ;; esac
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# ------------------------------------------------------------------ 3. build
if [[ $RUN_BUILD == 1 && $QUICK == 1 ]] && "$PY" -c \
    "import torch, dip_kernels, sys; sys.exit(0 if torch.ops.dip_C.built_with_cuda() else 1)" >/dev/null 2>&1; then
  echo "=== [build] skipped (--quick): dip_kernels._C is already built with CUDA for this torch"
  record build "skipped: prebuilt" 0 "-"
  RUN_BUILD=0
fi
if [[ $RUN_BUILD == 1 ]]; then
  # pip as asked; an "externally managed" system Python needs --break-system-packages, and if pip
  # itself cannot run, an in-place build is all the checks need (they run from the repository)
  run_step build 240 bash -c '
    "$0" -m pip install --no-build-isolation --no-deps --no-index -v -e . 2>&1 | tee /tmp/dip_pip.log
    rc=${PIPESTATUS[0]}
    if [[ $rc != 0 ]] && grep -q "externally-managed-environment" /tmp/dip_pip.log; then
      "$0" -m pip install --no-build-isolation --no-deps --no-index --break-system-packages -v -e . ; rc=$?
    fi
    if [[ $rc != 0 ]] && grep -q "No module named pip" /tmp/dip_pip.log; then
      "$0" setup.py build_ext --inplace; rc=$?
    fi
    exit $rc' "$PY"
fi
run_step backends 60 "$PY" -c "
import torch, dip_kernels
loaded, has_cuda, reason = dip_kernels.backends._extension_status()
print('extension loaded:', loaded, '| built with CUDA:', has_cuda, '|', reason or '')
for op in dip_kernels.OPS:
    print(f'{op:18s}', dip_kernels.available_backends(op, 'cuda'))
# what auto runs for DiP-XL/16's attention and head, in bf16 and float32
for dtype in (torch.bfloat16, torch.float32):
    qkv = torch.empty(2, 256, 3456, device='cuda', dtype=dtype)
    print(dip_kernels.explain('attention', qkv, torch.empty(72, device='cuda')))
    print(dip_kernels.explain('patch_detailer', torch.empty(512, 3, 16, 16, device='cuda', dtype=dtype),
                              torch.empty(512, 1152, device='cuda', dtype=dtype)))
"

# ------------------------------------------------------------------ 4. GPU tests
if [[ $RUN_TESTS == 1 ]]; then
  run_step tests $([[ $QUICK == 1 ]] && echo 150 || echo 170) \
    "${PYTEST[@]}" tests -m gpu --junitxml="$OUTDIR/tests.xml" --durations=15
fi

# ------------------------------------------------------------------ 5. benchmarks
bench() {  # bench NAME LIMIT_S MARK FILES...
  local name=$1 limit=$2 mark=$3; shift 3
  local args=("${PYTEST[@]}" "${BENCH_COLUMNS[@]}" "$@" --benchmark-json="$OUTDIR/bench_$name.json")
  [[ -n $mark ]] && args+=(-m "$mark")
  TAIL=2 run_step "bench_$name" "$limit" "${args[@]}"   # the report prints the numbers
}

# --quick leaves torch.compile's baselines out: inductor compiles its own kernels, cold, on the card
QUICK_K=()
[[ $QUICK == 1 ]] && QUICK_K=(-k "not compile")

if [[ $RUN_BENCH == 1 ]]; then
  bench ceiling $([[ $QUICK == 1 ]] && echo 30 || echo 60) "" bench/test_bench_ceiling.py
  if [[ -n $SUITES ]]; then
    for s in $SUITES; do
      if [[ $s == model ]]; then
        bench model 220 "$([[ $QUICK == 1 ]] && echo 'not slow' || echo '')" bench/test_bench_model.py
      else
        bench "$s" 240 "$([[ $QUICK == 1 ]] && echo 'not slow' || echo '')" "bench/test_bench_$s.py"
      fi
    done
  else
    OPS=(bench/test_bench_patch_detailer.py bench/test_bench_attention.py bench/test_bench_elementwise.py
         bench/test_bench_patchify.py)
    if [[ $FULL == 1 ]]; then bench ops 240 "" "${OPS[@]}"
    elif [[ $QUICK == 1 ]]; then bench ops 75 "not slow" "${OPS[@]}" "${QUICK_K[@]}"
    else bench ops 160 "not slow" "${OPS[@]}"; fi
    # the model without torch.compile's two-minute training-step build first, then that build
    bench model $([[ $QUICK == 1 ]] && echo 75 || echo 170) "not slow" bench/test_bench_model.py "${QUICK_K[@]}"
    if [[ $FULL == 1 ]]; then  # also torch.compile of the batch-64 forward
      bench model_slow 300 "slow" bench/test_bench_model.py
    elif [[ $QUICK == 0 ]]; then
      bench model_train_compile 200 "slow" bench/test_bench_model.py -k test_model_train
    fi
  fi
fi

# ------------------------------------------------------------------ 6. report and summary
shopt -s nullglob
JSONS=("$OUTDIR"/bench_*.json)
if ((${#JSONS[@]})); then
  echo "=== [report]"
  timeout 60 "$PY" -m bench.report "${JSONS[@]}" --out "$OUTDIR" 2>&1 | tee "$OUTDIR/logs/report.log"
  rc=${PIPESTATUS[0]}
  record report "$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")" 0 "logs/report.log"
fi

cache_entries >"$OUTDIR/logs/cache_after.txt"
MISSES=$(comm -13 "$OUTDIR/logs/cache_before.txt" "$OUTDIR/logs/cache_after.txt")
echo
echo "Triton binaries compiled on this machine (cache misses): $(grep -c . <<<"$MISSES")"
[[ -n $MISSES ]] && sed 's|.*/__grp__\(.*\)\.json|\1|' <<<"$MISSES" | sort | uniq -c | sed 's/^/    /'
echo
echo "gpu_check finished in $(($(date +%s) - T0))s (budget ${BUDGET}s); results in $OUTDIR"
printf '%-26s %-24s %6s  %s\n' step status seconds log
FAILED=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name status secs log <<<"$s"
  printf '%-26s %-24s %6s  %s\n' "$name" "$status" "$secs" "$log"
  [[ $status == ok || $status == skipped:* ]] || FAILED=$((FAILED + 1))  # "skipped: ..." is by design
done
echo "$FAILED step(s) not ok" | tee "$OUTDIR/summary.txt"
exit $((FAILED > 0))
