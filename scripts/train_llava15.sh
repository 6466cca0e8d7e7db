#!/usr/bin/env bash
# LLaVA-1.5-style stages at real scale (CLIP-L/336 + Phi-3.5-mini, then CompeteSMoE upcycling),
# one torchrun per stage. Needs GPUs, the LLaVA data under playground/data and the checkpoints
# (local folders or already in the HF cache).
#   scripts/train_llava15.sh                     # all stages on this node's GPUs
#   scripts/train_llava15.sh moe train.micro_batch_size=8 train.grad_accum=2
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 scripts/train_llava15.sh ...
# Keep the global batch: micro_batch_size x grad_accum x GPUS x NNODES = 256 (pretrain) / 128.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
ensure_venv dev,serve,eval
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$GPUS" -ge 1 ] || { echo "error: no GPU found (set GPUS=N)" >&2; exit 1; }
stages=(pretrain finetune moe)
if [ $# -gt 0 ] && [[ " ${stages[*]} " == *" $1 "* ]]; then stages=("$1"); shift; fi
for stage in "${stages[@]}"; do
    echo "==> stage $stage on ${NNODES:-1} node(s) x $GPUS GPU(s)"
    .venv/bin/torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        -m llava_smoe.cli train "train/llava15/$stage.yaml" "$@"
done
