#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, CUDA-graph replay on/off over the zoo's
# models, the zoo against eager torch.func, JAX, and a torch.compile subset -- each step under
# its own time limit, so a slow step leaves the others their share. Logs and JSON go to $OUT
# (default /tmp/gpu_check). STEPS picks steps; the default four fit one 10-minute call (on an
# H100, 2026-11-27: tests 52 s, ab 100 s, train 90 s; the zoo's eager baselines take about
# 18 s a case at --repeat 5, so 240 s at --repeat 3 covers the 14 models):
#
#   STEPS="tests ab train zoo jax compile" T_TESTS=120 T_AB=100 T_TRAIN=90 T_ZOO=240 \
#       T_JAX=90 T_COMPILE=90 TESTS=tests AB_CASES=models TRAIN_CASES=lap_2_64,d3_2_64 \
#       JAX_CASES=resmlp,siren bash asv_bench/gpu_check.sh
#
# The machine's own python3 holds a CUDA build of torch (whatever version it ships); xafunc
# runs from the working tree through PYTHONPATH, nothing is installed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-tests ab train zoo}
MODELS=resmlp,siren,fourier_pinn,convnet,transformer,lstm,gru,flow,mpnn,vmap_hessians
MODELS=$MODELS,vmap_laplacian,param_hessian,biharmonic,jet6

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
$PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__,
torch.version.cuda, torch.cuda.get_device_name(0), torch.get_num_threads())" \
    | tee -a "$OUT/env.txt"

for step in $STEPS; do
  case $step in
  tests)
    echo "== CUDA tests"
    timeout "${T_TESTS:-120}" $PY -m pytest -q -n "${WORKERS:-12}" -k cuda \
        -p no:cacheprovider -o addopts="-ra" ${TESTS:-tests} > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40 ;;
  ab)
    echo "== CUDA-graph replay on/off, interleaved"
    timeout "${T_AB:-100}" $PY asv_bench/cuda_graph_ab.py --cases "${AB_CASES:-models}" \
        --json "$OUT/cuda_graph_ab.json" > "$OUT/ab.log" 2>&1
    echo "ab rc=$?"
    tail -18 "$OUT/ab.log" ;;
  train)
    echo "== training steps: replayed forward and backward graphs vs the recorded interpreter"
    timeout "${T_TRAIN:-90}" $PY asv_bench/cuda_graph_ab.py --training "${TRAIN_CASES:-all}" \
        --repeat 5 --json "$OUT/train_ab.json" > "$OUT/train.log" 2>&1
    echo "train rc=$?"
    tail -16 "$OUT/train.log" ;;
  zoo)
    echo "== zoo on cuda (eager torch.func, xafunc)"
    timeout "${T_ZOO:-240}" $PY asv_bench/zoo_table.py --cases models --device cuda \
        --no-compile --repeat 3 --json "$OUT/zoo_cuda.json" > "$OUT/zoo.log" 2>&1
    echo "zoo rc=$?"
    tail -45 "$OUT/zoo.log" ;;
  jax)
    echo "== JAX zoo on its default device"
    timeout "${T_JAX:-90}" $PY asv_bench/jax_zoo.py --cases "${JAX_CASES:-$MODELS}" --repeat 5 \
        --json "$OUT/jax_cuda.json" > "$OUT/jax.log" 2>&1
    echo "jax rc=$?"
    tail -25 "$OUT/jax.log" ;;
  compile)
    echo "== torch.compile'd nestings, a few order >= 2 cases"
    timeout "${T_COMPILE:-90}" $PY asv_bench/zoo_table.py --cases siren,vmap_hessians,jet6 \
        --device cuda --repeat 5 --json "$OUT/zoo_cuda_compile.json" > "$OUT/compile.log" 2>&1
    echo "compile rc=$?"
    tail -20 "$OUT/compile.log" ;;
  *) echo "unknown step $step" ;;
  esac
done
