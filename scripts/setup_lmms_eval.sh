#!/usr/bin/env bash
# Install lmms-eval 0.7.3 into .venv for the lmms-eval adapter (scripts/eval/lmms_eval_model.py) and
# its test (tests/scripts/test_eval_lmms.py); idempotent, called by setup_env.sh (skip: APET_NO_LMMS_EVAL=1).
#
# The package goes in without its declared dependencies: they include wandb==0.25.0, torchvision
# (which would pull another torch build over the CPU one), opencv, yt-dlp, sentence-transformers and
# more that a generate_until task over local files never imports. What its evaluator and task loader
# do import is installed by name below. filelock stays below 4: lmms-eval 0.7.3's evaluator imports
# filelock._api, which filelock 4 removed. `pip check` reports the skipped dependencies; that is expected.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if python - <<'PY' 2>/dev/null; then exit 0; fi
import importlib.metadata as m
assert m.version("lmms-eval") == "0.7.3" and int(m.version("filelock").split(".")[0]) < 4
for name in ("accelerate", "datasets", "evaluate", "loguru", "sacrebleu", "pytablewriter", "tenacity", "jsonlines"):
    m.version(name)
PY
echo "[setup] installing lmms-eval 0.7.3 (no declared deps) and what its evaluator imports"
python -m pip install -q --no-deps "lmms-eval==0.7.3"
python -m pip install -q accelerate datasets evaluate loguru sacrebleu pytablewriter tenacity jsonlines "filelock>=3.16,<4"
