#!/usr/bin/env bash
# Every GPU measurement of bench/ in one run, for a short lease of a GPU machine (no Ray there):
#   bash bench/gpu_session.sh            # JSON lines into ${OUT:-bench-out}/*.json, logs beside
#   bash bench/gpu_session.sh cuda_check stage2_cifar    # only these steps
# All steps' limits add up to about 20 minutes: pick steps to fit the lease you have. One
# 600-s call of a 15-minute lease (start-up included) fits, e.g.:
#   bash bench/gpu_session.sh cuda_check stage1_cifar recipe_mnist stage2_cifar pack_cifar_s2
# Run it from the repository root with datasets/MNIST/raw present (copy the four .gz files).
# Each step has its own time limit, so one slow step cannot eat the whole lease.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WANT=" ${*:-all} "
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [[ $WANT == " all " || $WANT == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?: $(tail -n 1 "$OUT/$name.log")"
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step cuda_check 120 $PY bench/cuda_check.py
step stage1_cifar 100 $PY bench/stage1.py --device cuda --setting synthetic_cifar10_50k --size 30000 --epochs 3 --batch-size 512
step stage1_cifar_compile 180 $PY bench/stage1.py --device cuda --setting synthetic_cifar10_50k --size 30000 --epochs 3 --batch-size 512 --compile
step stage1_mnist 60 $PY bench/stage1.py --device cuda --size 30000 --epochs 3 --batch-size 512
step recipe_mnist 150 $PY bench/recipe.py --device cuda
step stage2_cifar 120 $PY bench/stage2.py --device cuda --setting synthetic_cifar10_50k --size 30000 --eval-limit 10000
step stage2_mnist 90 $PY bench/stage2.py --device cuda --size 30000 --eval-limit 5000
step pack_mnist_s1 90 $PY bench/packing.py --device cuda --stage 1 --size 6000
step pack_mnist_s2 90 $PY bench/packing.py --device cuda --stage 2 --size 6000
step pack_cifar_s1 100 $PY bench/packing.py --device cuda --setting synthetic_cifar10_50k --stage 1 --size 6000 --procs 1 2 4
step pack_cifar_s2 100 $PY bench/packing.py --device cuda --setting synthetic_cifar10_50k --stage 2 --size 6000 --procs 1 2 4
