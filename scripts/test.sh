#!/usr/bin/env bash
# Run the test suite from a fresh clone: sets up .venv (if absent) with the dev extras, then pytest.
#   scripts/test.sh                 # everything (what CI runs)
#   scripts/test.sh -m "not slow"   # the quick subset
#   scripts/test.sh tests/test_moe_routers.py -k competesmoe
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
ensure_venv dev,serve,eval
# Browser tests (Gradio page) drive the distribution's Chromium through Playwright.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
