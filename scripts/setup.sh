#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install the project with pinned, tested versions.
# torch goes first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install -q "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,bench,qlora]"
  rm -f .venv/.installed-* && touch "$STAMP"
fi
