#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, from a fresh clone: sets up .venv (if absent), generates the
# synthetic shapes world into playground/, runs every tiny stage (LM pretraining, projector
# pretraining, MoE instruction tuning), evaluates on the held-out test split and writes
# playground/quickstart/summary.json.
#   scripts/quickstart.sh                       # CompeteSMoE
#   scripts/quickstart.sh --router smoe --out playground/quickstart-smoe
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
ensure_venv dev,serve,eval
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/llava-smoe quickstart "$@"
