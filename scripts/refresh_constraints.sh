#!/usr/bin/env bash
# Re-resolve the dependencies from pyproject.toml's lower bounds in a fresh scratch venv, run the
# whole test suite on them, and only if it passes write the resolved set to constraints.txt.
#   scripts/refresh_constraints.sh              # then commit constraints.txt
#   scripts/refresh_constraints.sh -m "not slow" # pytest arguments (the full suite by default)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
source scripts/_env.sh
LLAVA_SMOE_VENV="$scratch/venv" LLAVA_SMOE_CONSTRAINTS=none ensure_venv dev,serve,eval
ensure_browser
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$scratch/venv/bin/python" -m pytest -q "$@"
{
    echo "# The resolved set the test suite passed with on a fresh machine; scripts/_env.sh installs with it."
    echo "# Written by scripts/refresh_constraints.sh on $(date -u +%Y-%m-%d) ($("$scratch/venv/bin/python" -c 'import platform; print(f"Python {platform.python_version()}, {platform.machine()}")'))."
    "$scratch/venv/bin/python" -m pip freeze --exclude-editable
} > constraints.txt
echo "==> wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
