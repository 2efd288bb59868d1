#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install the project with pinned, tested versions.
# torch goes first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
#
#   bash scripts/setup.sh           # training, tests but the lmms-eval one, benchmarks, QLoRA
#   bash scripts/setup.sh --eval    # also lmms-eval (`lmms-eval --model visionzip`); the test command uses it
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,bench,qlora
EVAL=0
for arg in "$@"; do
  case "$arg" in
    --eval) EVAL=1; EXTRAS=$EXTRAS,eval ;;
    *) echo "scripts/setup.sh: unknown option $arg (known: --eval)" >&2; exit 2 ;;
  esac
done
pin() { grep -iE "^$1==" constraints.txt | cut -d= -f3; }
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# One stamp per state of pyproject.toml + constraints.txt; "-eval" marks an install with the extra,
# which also satisfies a plain run (the two README commands can alternate without reinstalling).
STAMP=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$STAMP-eval" ] && { [ "$EVAL" = 1 ] || [ ! -f "$STAMP" ]; }; then
  .venv/bin/python -m pip install -q "torch==$(pin torch)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
  if [ "$EVAL" = 1 ]; then
    # lmms-eval without its declared dependencies: 0.7.3 pins wandb==0.25.0 (this project's is newer)
    # and requires torchvision, whose wheels here are CUDA builds that fail to import with the CPU
    # torch. What it needs to run is the [eval] extra, installed above.
    .venv/bin/python -m pip install -q --no-deps "lmms-eval==$(pin lmms-eval)"
    # transformers uses torchvision whenever it is installed (fast image and video processors); a
    # broken one, e.g. left by a plain `pip install lmms-eval`, fails those imports, so it goes.
    if .venv/bin/python -m pip show -q torchvision >/dev/null 2>&1 && ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
      echo "scripts/setup.sh: removing torchvision, which does not import with torch $(pin torch)" >&2
      .venv/bin/python -m pip uninstall -q -y torchvision
    fi
  fi
  rm -f .venv/.installed-* && touch "$STAMP"
  if [ "$EVAL" = 1 ]; then touch "$STAMP-eval"; fi
fi
