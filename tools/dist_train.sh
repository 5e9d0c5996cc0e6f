#!/usr/bin/env bash
# Distributed training over torchrun: tools/dist_train.sh CONFIG GPUS [train.py options]
# With CUDA one process per GPU and NCCL; without, the processes use the CPU and the gloo backend.
set -euo pipefail
CONFIG=$1
GPUS=$2
source "$(dirname "$0")/dist_common.sh"
dist_run train.py "$GPUS" "$CONFIG" --launcher pytorch "${@:3}"
