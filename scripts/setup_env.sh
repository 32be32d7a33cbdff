#!/usr/bin/env bash
# Create (or reuse) .venv and install apet-trt into it, CPU build of torch first.
# A plain `torch` requirement with nothing installed would pull GBs of CUDA wheels, so the pinned
# CPU build goes in before anything that depends on torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || { echo "[setup] installing torch==2.13.0 (CPU build)"; python -m pip install -q torch==2.13.0; }
echo "[setup] installing apet-trt[test] (editable)"
python -m pip install -q -e ".[test]"
[ "${APET_NO_LMMS_EVAL:-}" = 1 ] || bash scripts/setup_lmms_eval.sh   # the lmms-eval adapter's test (docs/EVAL.md)
