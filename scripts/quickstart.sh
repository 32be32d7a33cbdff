#!/usr/bin/env bash
# Quick start on a fresh machine (CPU is enough, no network needed beyond PyPI for the install):
#   1. create .venv and install apet-trt (scripts/setup_env.sh: CPU torch first, then the package)
#   2. build the default engine directory: tiny-llava (LLaVA-1.5 architecture, CLIP-336 geometry,
#      576 patches, tiny widths, SEEDED RANDOM WEIGHTS) with ApET keeping 64 of 576 tokens
#   3. run a real photograph (assets/grace_hopper.jpg, public domain, see assets/README.md) through it:
#      prints the tokens kept (576 -> 64), the generated text and per-stage timings, and writes the
#      overlay of the kept patches.
# The preset's weights are random, so its TEXT IS NOISE: the point is the pipeline, the kept set
# and the timings. Real checkpoints go in by local path: apet build --model /path/to/llava-1.5-7b-hf ...
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-engines/tiny-llava-t64}
OVERLAY=${OVERLAY:-engines/tiny-llava-t64-overlay.png}

bash scripts/setup_env.sh
. .venv/bin/activate

if [ -f "$ENGINE/manifest.json" ] && apet inspect "$ENGINE" >/dev/null 2>&1; then
  echo "[quickstart] $ENGINE already built and verified"
else
  echo "[quickstart] building $ENGINE"
  apet build --model tiny-llava --keep 64 --basis 10 --out "$ENGINE" --force
fi
apet inspect "$ENGINE"
apet run --engine "$ENGINE" --image assets/grace_hopper.jpg \
  --prompt "What is the person in this photo wearing?" --max-new-tokens 24 --grid --overlay "$OVERLAY" \
  --force-overlay   # the quick start's own overlay, replaced on every run
