#!/usr/bin/env bash
# Run the test suite from a fresh clone: sets up .venv (if absent, pinned by constraints.txt) with
# the dev, serve and eval extras, then pytest.
#   scripts/test.sh                 # everything (what CI runs)
#   scripts/test.sh -m "not slow"   # the quick subset
#   scripts/test.sh tests/test_moe_routers.py -k competesmoe
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
ensure_venv dev,serve,eval
ensure_browser
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
