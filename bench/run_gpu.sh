#!/usr/bin/env bash
# bench/run_gpu.sh PHASE|STAGE ... : the GPU benchmarks and GPU tests, from the repository root of a GPU node
# (docs/benchmarks.md "Running on a GPU node"). After `pip install -e ".[vllm]"`:
#
#   AMM_GIT_COMMIT=$(git rev-parse --short HEAD) BUDGET_S=100000 bash bench/run_gpu.sh all
#
# `all` runs every stage in order; `run1` / `run2` / `run3` are the same stages in three parts (run1: env install
# models estimate tests_gpu step_hf build7b3b; run2: install tests_vllm rollout 7b3b_offload; run3: 7b3b_offload
# step_vllm 7b3b_sleep 7b3b step_vllm_zero3) for machines that allow only short commands. Models and intermediate
# files live in /tmp. Stages that succeeded are remembered (/tmp/amm-gpu-out/done): phases skip them (FORCE=1 reruns
# them), so a later part picks up what an earlier one had no time for. Any stage can be named alone (always runs), e.g.
# `bash bench/run_gpu.sh install 7b3b_sleep`. `smoke` runs every bench in --tiny mode and `check_workers` the GPU
# tests' workers against a stand-in vLLM (bench/check_gpu_workers_cpu.py); both are meant for a CPU machine.
#
# Budget: the run stops starting stages once fewer seconds are left than a stage needs (BUDGET_S, default 530 s
# from the start); skipped stages are listed in the summary.
# Each stage runs in its own process group, stopped (SIGTERM, then SIGKILL 20 s later) when its limit passes; the
# bench and test workers die with their parent (PR_SET_PDEATHSIG), so torchrun ranks do not outlive a killed stage.
# Logs and JSON go to /tmp/amm-gpu-out/<tag>/; at exit $RESULTS_DIR (default /tmp/amm-gpu-out/out) receives three files:
#   <tag>_summary.txt   stage, rc, seconds, GPU memory in use after it; bench/digest.py of the results; pytest's summary
#   <tag>_results.jsonl one {"stage", "result"} object per RESULT line
#   <tag>_logs.tar.gz   every log, JSON and profiler table of the run
# Optional, for a node without network: INSTALL_SCRIPT=path/to/script.sh makes the `install` stage run that script
# (e.g. one that installs pre-downloaded wheels) instead of pip; SITE=dir adds a --target install folder to the path.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ $# -gt 0 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2; }
INSTALL_SCRIPT=${INSTALL_SCRIPT:-}
DEST=${RESULTS_DIR:-/tmp/amm-gpu-out/out}
TAG=${TAG:-$(echo "$*" | tr ' ' '_' | tr -cd 'A-Za-z0-9_.-' | cut -c1-60)}
WORK=/tmp/amm-gpu-out/$TAG
BUDGET_S=${BUDGET_S:-530}
mkdir -p "$WORK" "$DEST"
export SITE=${SITE:-/tmp/site}
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
# FlashInfer is optional in vLLM: without it installed the sampler fails with "No module named 'flashinfer'".
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
PY=${PY:-python3}
T0=$(date +%s)
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"
DONE=/tmp/amm-gpu-out/done  # stages that succeeded on this machine; run1/run2/run3 skip them (FORCE=1 reruns)
mkdir -p "$DONE"

gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | head -1 || echo "-"; }

finish() {
  {
    echo "=== digest of the RESULT lines (all figures: ${TAG}_results.jsonl)"
    $PY bench/digest.py "$WORK"/*.log 2>&1
    for f in "$WORK"/tests_*.log; do
      [ -f "$f" ] && { echo "=== pytest summary: $(basename "$f")"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error" "$f" | tail -n 30; }
    done
  } >> "$SUMMARY"
  $PY - "$WORK" "$DEST/${TAG}_results.jsonl" <<'EOF' || true
import json, os, sys
work, dest = sys.argv[1], sys.argv[2]
with open(dest, "w") as out:
    for name in sorted(os.listdir(work)):
        if name.endswith(".log"):
            for line in open(os.path.join(work, name), errors="replace"):
                if line.startswith("RESULT "):
                    try:
                        out.write(json.dumps({"stage": name[:-4], "result": json.loads(line[7:])}) + "\n")
                    except ValueError:
                        pass
EOF
  cp "$SUMMARY" "$DEST/${TAG}_summary.txt"
  tar -czf "$DEST/${TAG}_logs.tar.gz" -C "$(dirname "$WORK")" "$TAG" 2>/dev/null
  echo "=== done in $(( $(date +%s) - T0 ))s; files in $DEST: ${TAG}_summary.txt ${TAG}_results.jsonl ${TAG}_logs.tar.gz"
  cat "$SUMMARY"
}
trap finish EXIT

# stage NAME NEED LIMIT CMD... : skip when less than NEED seconds are left; kill the process group after LIMIT.
stage() {
  local name=$1 need=$2 lim=$3 left rc t pid waited=0; shift 3
  left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if [ "$left" -lt "$need" ]; then
    echo "=== $name SKIPPED (budget: needs ${need}s, ${left}s left)" | tee -a "$SUMMARY"; return 0
  fi
  [ "$lim" -gt $(( left - 5 )) ] && lim=$(( left - 5 ))
  echo "=== [$(( $(date +%s) - T0 ))s] $name (limit ${lim}s)"
  t=$(date +%s)
  setsid bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1 < /dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$lim" ]; then
      # SIGTERM first: torchrun stops its ranks (they run in their own session, out of this group's reach)
      kill -TERM -- "-$pid" 2>/dev/null
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null
      break
    fi
    sleep 1; waited=$(( waited + 1 ))
  done
  wait "$pid"; rc=$?
  [ "$waited" -ge "$lim" ] && rc=124
  kill -KILL -- "-$pid" 2>/dev/null  # whatever the stage left behind (vLLM engine processes, torchrun workers)
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s gpu_used_after=$(gpu_used)" | tee -a "$SUMMARY"
  [ "$rc" = 0 ] && touch "$DONE/$name"
  $PY bench/digest.py "$WORK/$name.log" 2>/dev/null
  case $name in env|install) tail -n 20 "$WORK/$name.log" | tee -a "$SUMMARY" ;; esac
  [ "$rc" = 0 ] || grep -v -e "^INFO" -e "it/s]" -e "Warning" "$WORK/$name.log" | tail -n 25
  return 0
}

do_install() {
  set -o pipefail
  if [ -n "$INSTALL_SCRIPT" ]; then
    WITH_DEEPSPEED=1 bash "$INSTALL_SCRIPT" 2>&1 | grep -v "Running pip as the 'root'" || return 1
  else
    $PY -m pip install -q -e ".[vllm]" 2>&1 | grep -v "Running pip as the 'root'" || return 1
  fi
  $PY -c "
import importlib, sys
missing = []
for n in ('torch', 'transformers', 'trl', 'deepspeed', 'datasets', 'peft', 'accelerate', 'vllm'):
    try:
        m = importlib.import_module(n); print(n, getattr(m, '__version__', '?'))
    except Exception as e:
        print(n, 'MISSING', type(e).__name__, str(e)[:120]); missing.append(n)
sys.exit(1 if set(missing) & {'trl', 'deepspeed', 'datasets'} else 0)  # without vLLM the vllm stages fail alone
"
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv,noheader
  $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; free -g | head -2; df -h /tmp | tail -1
}

build_bench_models() {
  $PY -c "import sys; sys.path.insert(0, 'bench'); import _common as C; \
print(C.build_models('/tmp/amm-bench/models', {'student': 'bench_student', 'teacher': 'bench_teacher'}))"
}

smoke() {  # every bench in --tiny mode plus test collection: checks the scripts, measures nothing
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  $PY bench/bench_rollout.py --tiny --json "$WORK/smoke_rollout.json" &&
  $PY bench/bench_step.py --tiny --log-dir "$WORK/smoke_step" --json "$WORK/smoke_step.json" &&
  $PY bench/bench_7b3b.py --tiny --json "$WORK/smoke_7b3b.json" &&
  $PY bench/bench_7b3b.py --estimate-only --json "$WORK/smoke_estimate.json" &&
  $PY -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider
}

export -f do_install env_info build_bench_models smoke
export INSTALL_SCRIPT PY WORK

phase() {
  local s
  for s in "$@"; do
    if [ -f "$DONE/$s" ] && [ "${FORCE:-0}" != 1 ] && [ "$s" != env ] && [ "$s" != install ]; then
      echo "=== $s already done on this machine (FORCE=1 reruns it)" | tee -a "$SUMMARY"
    else
      run_stage "$s"
    fi
  done
}

run_stage() {
  case $1 in
    run1) phase env install models estimate tests_gpu step_hf build7b3b ;;
    run2) phase install tests_vllm rollout 7b3b_offload ;;
    run3) phase 7b3b_offload step_vllm 7b3b_sleep 7b3b step_vllm_zero3 ;;
    all) phase env install models estimate tests_gpu step_hf build7b3b tests_vllm rollout 7b3b_offload step_vllm \
        7b3b_sleep 7b3b step_vllm_zero3 ;;
    env) stage env 5 60 env_info ;;
    install) stage install 40 300 do_install ;;
    models) stage models 45 240 build_bench_models ;;
    build7b3b) stage build7b3b 60 300 $PY bench/bench_7b3b.py --build-only ;;
    estimate) stage estimate 10 60 $PY bench/bench_7b3b.py --estimate-only --json "$WORK/7b3b_estimate.json" ;;
    tests_gpu) stage tests_gpu 45 240 $PY -m pytest tests/test_gpu.py -m "gpu and not vllm" -v -rA -p no:cacheprovider ;;
    tests_vllm) stage tests_vllm 150 330 $PY -m pytest tests/test_gpu.py -m vllm -v -rA -p no:cacheprovider ;;
    rollout) stage rollout 90 240 $PY bench/bench_rollout.py --json "$WORK/rollout.json" ;;
    step_hf) stage step_hf 150 330 $PY bench/bench_step.py --use-vllm 0 --log-dir "$WORK/step_hf" --json "$WORK/step_hf.json" ;;
    step_vllm) stage step_vllm 150 330 $PY bench/bench_step.py --use-vllm 1 --log-dir "$WORK/step_vllm" --json "$WORK/step_vllm.json" ;;
    step_vllm_zero3) stage step_vllm_zero3 120 330 $PY bench/bench_step.py --use-vllm 1 --deepspeed zero3 --trainers trl,amm \
        --log-dir "$WORK/step_vllm_zero3" --json "$WORK/step_vllm_zero3.json" ;;
    7b3b_sleep) stage 7b3b_sleep 150 330 $PY bench/bench_7b3b.py --vllm-enable-sleep-mode 1 \
        --profile-out "$WORK/7b3b_sleep_profile.txt" --json "$WORK/7b3b_sleep.json" ;;
    7b3b) stage 7b3b 150 330 $PY bench/bench_7b3b.py --json "$WORK/7b3b.json" ;;
    7b3b_offload) stage 7b3b_offload 150 330 $PY bench/bench_7b3b.py --offload-optimizer cpu \
        --profile-out "$WORK/7b3b_offload_profile.txt" --json "$WORK/7b3b_offload.json" ;;
    7b3b_hf) stage 7b3b_hf 150 330 $PY bench/bench_7b3b.py --use-vllm 0 --json "$WORK/7b3b_hf.json" ;;
    smoke) stage smoke 60 600 smoke ;;
    check_workers) stage check_workers 60 600 $PY bench/check_gpu_workers_cpu.py --json "$WORK/check_workers.json" ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
}

for s in "$@"; do run_stage "$s"; done
