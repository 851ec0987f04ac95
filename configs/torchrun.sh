#!/bin/bash
# Multi-node training with torchrun, one launcher per node (no SLURM: for SLURM use configs/slurm/).
# Run the same line on every node, with NNODES, HEAD (the first node's address) and CONFIGS set, e.g.
#   NNODES=2 HEAD=10.0.0.1 CONFIGS="--config configs/image.yaml --config configs/multinode.yaml" bash configs/torchrun.sh
#   NNODES=4 HEAD=10.0.0.1 CONFIGS="--config configs/fsdp_llama3_8b.yaml --config configs/fsdp_llama3_70b.yaml" bash configs/torchrun.sh
# Lightning reads ranks and world size from torchrun (TorchElasticEnvironment).
set -euo pipefail
GPUS=${GPUS:-8}
# shellcheck disable=SC2086  # CONFIGS holds several arguments
torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS" --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" \
    -m mm_llama.cli fit $CONFIGS --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" "$@"
