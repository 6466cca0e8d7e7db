#!/usr/bin/env bash
# One-command GPU check, sized for ~5 minutes on one H100 / H200 (not yet timed on one): MoE layer vs dense and transformers at
# real sizes, a CLIP-L/336 + Phi-3.5-mini-shaped MoE VLM training step (tokens/s, MFU) and its
# generation speed (see llava_smoe/bench/gpu_check.py). It runs on the machine's own torch and
# transformers: no virtual environment, no constraints, no network (unlike scripts/_env.sh).
#   scripts/gpu_check.sh [--out gpu_check.json] [--lm-layers 16] [--micro-batch 4]
#   scripts/gpu_check.sh --smoke          # tiny sizes, every code path, CPU when there is no GPU
#   PYTHON=/path/to/python3 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m llava_smoe.bench.gpu_check "$@"
